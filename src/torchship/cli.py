"""The ``torchship`` command: a thin shell over the Python API (parse, call, render with rich)."""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import TorchshipError, UsageError
from .runtimes.base import MODULES

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Take a trained PyTorch model to production: optimize, verify, package.")
bundle_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Inspect and check bundles.")
app.add_typer(bundle_app, name="bundle")
console = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 140)


@contextmanager
def progress_bar():
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=False) as bar:
        task = bar.add_task("starting", total=None)

        def update(message: str, done: int, total: int) -> None:
            bar.update(task, description=message, completed=done, total=total)
        yield update


def _user_code_importable() -> None:
    """A source named ``package.module:attr`` imports from the current directory, as ``python -m`` and uvicorn do.
    Only the commands that take a source do this; ``serve`` and ``bundle`` never import from it."""
    import os
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _no_code_from_the_current_directory() -> None:
    """A bundle's code (with --trust-code) imports from the installed packages and PYTHONPATH only: never from the
    directory `serve` was started in, which `python -m` would otherwise put first on sys.path."""
    import os
    if sys.path and sys.path[0] in ("", ".", os.getcwd()):  # the implicit entry; PYTHONPATH's own come after it
        del sys.path[0]


def _log_to_stderr() -> None:
    """torchship's own notices (a zoo model trained on first use, ...) as lines on stderr, never on stdout."""
    import logging
    log = logging.getLogger("torchship")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{what} {text!r}: write comma-separated integers, e.g. 1,8,32") from None
    if not values or min(values) < 1:
        raise UsageError(f"{what} {text!r}: give at least one positive integer")
    return values


def _dims(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, sep, val = item.partition("=")
        if not sep or not val.strip().isdigit() or int(val) < 1:
            raise UsageError(f"--dim {item!r}: write NAME=SIZE, e.g. --dim seq=128")
        out[name.strip()] = int(val)
    return out


def render(result, target: int) -> None:
    from .report import rows
    table = Table(title=f"torchship optimize: {result.model} (batch size {target})", show_lines=False)
    data = rows(result, target)
    cols = ["variant", "status", f"items/s @{target}", "interval", f"p99 ms @{target}", "vs eager", "cosine", "top-1", "size MB",
            "cold start s"]
    if any(row["raw input"] != "-" for row in data):  # checked on raw input in the search
        cols.insert(cols.index("top-1"), "raw input")
    for c in cols:
        table.add_column(c, no_wrap=True, justify="right" if c not in ("variant", "status") else "left")
    colors = {"ok": "green", "rejected": "red", "failed": "red", "skipped": "yellow", "reference": "cyan"}
    notes = []
    for row in data:
        if row["why"]:
            notes.append(f"[bold]{escape(row['variant'].rstrip(' *'))}[/]: {escape(row['why'])}")
        row["status"] = f"[{colors.get(row['status'], 'white')}]{row['status']}[/]"
        table.add_row(*[str(row[c]) if c == "status" else escape(str(row[c])) for c in cols])
    console.print(table)
    for note in notes:
        console.print("  " + note, highlight=False)
    console.print("  * chosen, = tied with the fastest within the noise; interval: 90% confidence interval of the median",
                  highlight=False)
    if result.decision is not None:
        console.print(escape(result.decision.why), highlight=False)
    for note in result.notes:
        console.print(f"[yellow]note[/]: {escape(note)}", highlight=False)
    if result.noise is not None:
        line = result.noise.describe(result.machine["cores"])
        console.print(f"[yellow]{escape(line)}[/]" if result.noise.noisy else escape(line), highlight=False)


@app.command()
def optimize(
    source: str = typer.Argument(..., help="zoo:NAME, package.module:attr, a .pt2/.onnx/TorchScript file, or a HF model directory"),
    input: List[str] = typer.Option([], "--input", "-i", help="NAME:DTYPE[DIMS], e.g. x:float32[batch,3,28,28] (repeat per input)"),
    weights: Optional[str] = typer.Option(None, help="state dict for a module:attr source (.safetensors, or a torch.save file loaded with weights_only=True)"),
    dim: List[str] = typer.Option([], "--dim", help="size of a dynamic dimension for timing, e.g. seq=128"),
    lengths: Optional[str] = typer.Option(None, help="the sizes of a dynamic dimension users send, to time every "
                                          "contender at and choose on: seq=16,32,64 or seq=16..128 (powers of two), "
                                          "each weighed alike; example: the example's only (default: the lengths of "
                                          "the held-out items, where an attention mask says them)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    budget: Optional[str] = typer.Option(None, help="fidelity budget, e.g. cosine=0.999,top1=0.99,accuracy_drop=0.01; retrieval=0.95 for an embedding model "
                                  "(nearest neighbours kept)"),
    batch_sizes: str = typer.Option("1,8,32", help="batch sizes to time, comma-separated"),
    target_batch_size: Optional[int] = typer.Option(None, help="choose by throughput at this batch size (default: the largest)"),
    latency_slo: Optional[float] = typer.Option(None, "--latency-slo", help="choose the best throughput whose p99 stays under this many ms"),
    runtimes: Optional[str] = typer.Option(None, help=f"comma-separated subset of {','.join(MODULES)}"),
    threads: Optional[int] = typer.Option(None, help="intra-op threads, as serving will use (default: all cores)"),
    transforms: str = typer.Option("int8,bf16,qat,channels,distill",
                                   help="compression variants to try, comma-separated, or none: int8, bf16 (CPU with native bf16), "
                                        "prune (unstructured); with --train-data also qat, channels (pruning + fine-tuning), distill"),
    eval_data: Optional[Path] = typer.Option(None, help=".npz/.safetensors of held-out inputs named as the model's (+ 'labels' for accuracy)"),
    calibration_data: Optional[Path] = typer.Option(None, help=".npz/.safetensors of representative inputs for static int8"),
    train_data: Optional[str] = typer.Option(None, help="training data as `torchship train --data` takes it (zoo:digits or .npz): "
                                                        "adds variants trained from the model"),
    student: Optional[str] = typer.Option(None, help="the smaller architecture to distil into (package.module:attr)"),
    train_epochs: Optional[int] = typer.Option(None, help="epochs for each trained variant (default: 3 for QAT, 8 after pruning, 15 for a student)"),
    timeout: float = typer.Option(600.0, help="seconds allowed to build one variant (and for each timing request)"),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="seconds for the whole search: builds stop at "
                                                "3/4 of it, once one candidate is built (the rest are rows that say so), timing rounds at all of it"),
    exhaustive: bool = typer.Option(False, help="also build compressed variants whose runtime runs too far behind the "
                                    "leader for the transform to close the gap"),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="reuse builds of the same model, weights, data and options "
                               "($TORCHSHIP_CACHE/builds, default ~/.cache/torchship)"),
    out: Path = typer.Option(Path("torchship-bundle"), "--out", "-o", help="bundle directory to write"),
    name: Optional[str] = typer.Option(None, help="model name in the bundle and when served (default: from the source)"),
    tokenizer: Optional[Path] = typer.Option(None, help="a tokenizer directory (tokenizer.json) for a text model whose "
                                             "source has none: the bundle then takes text"),
    image_processor: Optional[Path] = typer.Option(None, help="an image processor directory (preprocessor_config.json) "
                                                   "for a vision model whose source has none: the bundle then takes "
                                                   "image files"),
    processing: bool = typer.Option(True, "--processing/--no-processing", help="package the raw-input pipeline (the "
                                    "tokenizer, the image processor's steps) and a classifier's labels where the source "
                                    "has them, so the bundle and server take text or images; --no-processing: tensors "
                                    "only"),
    allow_specialization: bool = typer.Option(False, "--allow-specialization", help="for a model that branches on its "
                                              "values: let traced and exported variants (ONNX Runtime, OpenVINO, "
                                              "AOTInductor) compete anyway, keeping the path of their example; the "
                                              "manifest records it"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON instead of a table"),
):
    """Build every applicable way of running the model, verify, time, choose, and package the best."""
    _user_code_importable()
    from .optimize import OptimizeOptions
    from .optimize import optimize as run
    from .mix import parse as parse_lengths
    from .verify import Budget
    opts = OptimizeOptions(device=device, budget=Budget.parse(budget), batch_sizes=_ints(batch_sizes, "--batch-sizes"),
                           target_batch_size=target_batch_size, latency_slo_ms=latency_slo,
                           runtimes=tuple(r.strip() for r in runtimes.split(",")) if runtimes else None,
                           threads=threads, timeout_s=timeout, train_epochs=train_epochs, time_budget_s=time_budget,
                           exhaustive=exhaustive, cache=cache, processing=processing,
                           allow_specialization=allow_specialization, lengths=parse_lengths(lengths),
                           transforms=() if transforms.strip() == "none" else tuple(t.strip() for t in transforms.split(",") if t.strip()))
    with progress_bar() as update:
        result = run(source, opts, inputs=input or None, weights=weights, dims=_dims(dim), out=out, name=name, progress=update,
                     eval_data=eval_data, calibration_data=calibration_data, train_data=train_data, student=student,
                     tokenizer=tokenizer, image_processor=image_processor, warn=lambda line: err.print(f"[yellow]warning:[/] {escape(line)}", highlight=False))
    if as_json:
        console.print_json(json.dumps(result.to_dict(), default=str))
    else:
        render(result, opts.target)
        console.print(escape(result.message))
    if result.bundle is None:
        raise TorchshipError(f"{result.message}; no bundle was written (loosen --budget, or see the table for why)")
    (err if as_json else console).print(f"bundle: [bold]{escape(str(result.bundle))}[/]  report: [bold]{escape(str(result.report))}[/]")  # stdout: JSON only


@app.command()
def demo(out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="where the demo bundle goes")):
    """Train digits-cnn (if not cached), optimize it, and answer a few test images through the bundle."""
    _user_code_importable()
    from . import load_bundle
    from .optimize import OptimizeOptions
    from .optimize import optimize as run
    from .zoo.digits import dataset
    started = time.perf_counter()
    console.print("[bold]torchship demo[/]: digits-cnn, a small CNN trained on scikit-learn's digits")
    with progress_bar() as update:
        result = run("zoo:digits-cnn", OptimizeOptions(), out=out, progress=update)
    render(result, OptimizeOptions().target)
    console.print(escape(result.message))
    if result.bundle is None:
        raise TorchshipError(result.message)
    loaded = load_bundle(result.bundle, trust_code=True)  # built by this run, seconds ago
    x, y = dataset()["test"]
    pred = loaded({"image": x[:16]})["logits"].argmax(1)
    console.print(f"bundle {escape(str(result.bundle))} ({loaded.manifest.runtime}) predicts {pred.tolist()}")
    console.print(f"            labels {y[:16].tolist()}")
    console.print(f"report: [bold]{escape(str(result.report))}[/] (and latency.png beside it); demo took {time.perf_counter() - started:.0f}s")


def _admin_token(path: Optional[Path]) -> Optional[str]:
    """The admin API's token: from a file, else from TORCHSHIP_ADMIN_TOKEN; at least 16 characters."""
    if path is not None:
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise UsageError(f"cannot read --admin-token-file {path}: {exc.strerror}") from None
    else:
        token = os.environ.get("TORCHSHIP_ADMIN_TOKEN", "").strip()
    if token and len(token) < 16:
        raise UsageError("the admin token must be at least 16 characters (e.g. `openssl rand -hex 16`)")
    return token or None


@app.command()
def serve(
    bundles: List[Path] = typer.Argument(..., help="bundle directories, or model repositories laid out as REPO/NAME/VERSION/"),
    host: str = typer.Option("127.0.0.1", help="address to bind (default: loopback only)"),
    port: int = typer.Option(8000, help="port to bind"),
    grpc_port: Optional[int] = typer.Option(None, "--grpc-port", help="also serve the protocol over gRPC on this port "
                                            "(pip install 'torchship[grpc]'): tritonclient.grpc, same limits and metrics"),
    procs: int = typer.Option(1, help="server processes sharing the ports (SO_REUSEPORT), each a whole server with its own "
                              "copy of every model: for models that take less time than handling their requests"),
    workers: int = typer.Option(1, help="model worker processes, each with its own copy and cores/N threads"),
    threads: Optional[int] = typer.Option(None, help="intra-op threads per worker (default: cores / (procs x workers); 1 for a model whose batches run on the event loop)"),
    max_batch_size: Optional[int] = typer.Option(None, help="largest batch (default: the bundle's chosen batch size)"),
    max_batch_tokens: Optional[int] = typer.Option(None, help="largest batch in real tokens, for bundles that take "
                                                   "text (their attention masks' ones; a request over it runs alone); "
                                                   "default: items alone bound a batch"),
    max_queue_delay_us: int = typer.Option(0, help="longest wait for a batch to fill, in microseconds (0: batch what is queued when a worker is free)"),
    busy_delay_us: int = typer.Option(2000, help="with --max-queue-delay-us 0: how long a batch waits to fill while the "
                                      "event loop is saturated (gRPC calls arrive one a turn); 0: never"),
    preferred_batch_sizes: Optional[str] = typer.Option(None, help="dispatch as soon as one of these sizes is reached, e.g. 8,16"),
    max_queue: int = typer.Option(1024, help="queued requests per model before 503"),
    timeout_ms: float = typer.Option(30000, help="default request deadline; a request's 'timeout' parameter may only lower it"),
    slo_ms: Optional[float] = typer.Option(None, help="SLO mode: batch and shed by the bundle's latency profile to meet this p99"),
    inline_under_ms: float = typer.Option(1.0, help="run batches predicted to take less on the event loop's thread "
                                          "(no hand-off to a thread); 0: always on a thread"),
    max_body_mb: float = typer.Option(64, help="largest request body (413 beyond)"),
    max_json_mb: float = typer.Option(16, help="largest JSON in a request: a JSON body, or the JSON header before "
                                      "binary tensors (413 beyond; binary tensors parse far faster)"),
    max_items: int = typer.Option(1024, help="most text items (strings) in one request to a bundle that takes text"),
    max_item_kb: float = typer.Option(64, help="largest text item in KB of UTF-8 (400 beyond; text over the model's "
                                      "length is truncated by the bundle's tokenizer)"),
    max_image_mb: float = typer.Option(16, help="largest image item in MB (an encoded file; 400 beyond), besides "
                                       "the pixel limit its bundle checks before decoding"),
    drain_timeout: float = typer.Option(30, help="seconds to finish queued requests after SIGTERM"),
    repository: Optional[Path] = typer.Option(None, help="model repository for the load/unload API"),
    admin_token_file: Optional[Path] = typer.Option(None, "--admin-token-file", help="file holding the token of the "
                                                    "load/unload API (or set TORCHSHIP_ADMIN_TOKEN; never on the command "
                                                    "line, where ps shows it)"),
    trust_code: bool = typer.Option(False, "--trust-code", help="allow bundles whose loading runs code: Python imported "
                                    "from outside torchship (eager and compile bundles of a package.module:attr source) "
                                    "or native code (AOTInductor)"),
    verify_key: Optional[Path] = typer.Option(None, "--verify-key", help="serve only bundles signed by this public key "
                                              "(PEM, from `torchship bundle keygen`); a verified signature also counts as "
                                              "consent to run the bundle's code"),
    ray: bool = typer.Option(False, "--ray", help="deploy on Ray Serve (pip install 'torchship[ray]'): replicas, autoscaling"),
    replicas: int = typer.Option(1, help="--ray: replicas (the least, with --max-replicas)"),
    max_replicas: Optional[int] = typer.Option(None, help="--ray: autoscale from --replicas up to this many"),
    ray_address: Optional[str] = typer.Option(None, help="--ray: join this cluster (auto, ray://HOST:PORT); default: start a local one"),
):
    """Serve bundles over the Open Inference Protocol (KServe v2) with dynamic batching."""
    from .serve.app import ServeConfig
    from .serve.batcher import BatchConfig
    from .serve.server import serve as run
    _no_code_from_the_current_directory()
    if workers < 1 or procs < 1:
        raise UsageError(f"--workers and --procs must be at least 1, got {workers} and {procs}")
    if max_batch_size is not None and max_batch_size < 1:
        raise UsageError(f"--max-batch-size must be at least 1, got {max_batch_size}")
    if drain_timeout <= 0:
        raise UsageError(f"--drain-timeout must be a positive number of seconds, got {drain_timeout:g}")
    batch = BatchConfig(max_batch_tokens=max_batch_tokens, max_queue_delay_s=max_queue_delay_us / 1e6, max_queue_requests=max_queue, timeout_s=timeout_ms / 1e3,
                        slo_s=slo_ms / 1e3 if slo_ms is not None else None, inline_s=inline_under_ms / 1e3, busy_delay_s=busy_delay_us / 1e6,
                        preferred_batch_sizes=_ints(preferred_batch_sizes, "--preferred-batch-sizes") if preferred_batch_sizes else ())
    if max_body_mb <= 0 or max_json_mb <= 0:
        raise UsageError("--max-body-mb and --max-json-mb must be positive")
    if max_items < 1 or max_item_kb <= 0 or max_image_mb <= 0:
        raise UsageError(f"--max-items, --max-item-kb and --max-image-mb must be positive, got {max_items}, "
                         f"{max_item_kb} and {max_image_mb}")
    from .serve.raw import RawLimits
    config = ServeConfig(batch=batch, max_batch_size=max_batch_size, max_body_bytes=int(max_body_mb * 2**20),
                         max_json_bytes=int(min(max_json_mb, max_body_mb) * 2**20), threads=threads, workers=workers,
                         repository=repository, admin_token=_admin_token(admin_token_file), trust_code=trust_code,
                         verify_key=verify_key, raw=RawLimits(max_items, int(max_item_kb * 1024), int(max_image_mb * 2**20)))
    if ray:
        if procs > 1:
            raise UsageError("--procs is for one machine; on Ray Serve, scale with --replicas")
        from .bundle import verify
        from .serve.ray import RayConfig, application, serve_ray
        from .serve.registry import discover
        found = [(n, v) for path in bundles for n, v, b in discover(path) if verify(b)]  # each replica verifies its own copy
        rc = RayConfig(replicas=replicas, max_replicas=max_replicas, address=ray_address)
        application(bundles, config, rc)  # the settings' errors before a cluster starts
        scale = f"{replicas}-{max_replicas} replicas, autoscaled" if max_replicas else f"{replicas} replica{'s' if replicas > 1 else ''}"
        err.print(f"serving {escape(', '.join(f'{n} v{v}' for n, v in found))} on Ray Serve at http://{host}:{port}/v2 ({scale}); "
                  "ready once warmed up at /v2/health/ready", highlight=False)
        serve_ray(bundles, config, rc, host=host, port=port, drain_timeout=drain_timeout)
        return

    def announce(found):
        over = f" and grpc://{host}:{grpc_port}" if grpc_port is not None else ""
        err.print(f"serving {escape(', '.join(f'{n} v{v}' for n, v, _ in found))} on http://{host}:{port}/v2{over} "
                  f"({f'{procs} server processes, ' if procs > 1 else ''}{workers} worker{'s' if workers > 1 else ''}"
                  f"{' each' if procs > 1 else ''}); ready once warmed up at /v2/health/ready", highlight=False)
    if grpc_port is not None:
        import importlib
        importlib.import_module("torchship.serve.grpc")  # the extra installed, before any model loads
    run(bundles, config, host=host, port=port, drain_timeout=drain_timeout, on_verified=announce, grpc_port=grpc_port,
        procs=procs)


@app.command()
def perf(
    url: str = typer.Argument(..., help="server address, e.g. 127.0.0.1:8000"),
    model: str = typer.Option(..., "--model", "-m", help="model name"),
    concurrency: str = typer.Option("1,2,4,8", help="closed loop: concurrent clients per step, comma-separated"),
    rate: Optional[float] = typer.Option(None, help="open loop: requests per second instead of a concurrency sweep"),
    poisson: bool = typer.Option(False, help="open loop with Poisson (exponential) inter-arrival times"),
    duration: float = typer.Option(5.0, help="seconds per step"),
    batch: int = typer.Option(1, help="items per request"),
    dim: List[str] = typer.Option([], "--dim", help="size of other dynamic dimensions, e.g. seq=128"),
    json_data: bool = typer.Option(False, "--json-data", help="send JSON numbers instead of binary tensors"),
    as_json: bool = typer.Option(False, "--json", help="print the rows as JSON"),
):
    """Load a running server and report throughput, latency percentiles, errors and its average batch size."""
    from .perf import perf as run
    rows = run(url, model, concurrency=list(_ints(concurrency, "--concurrency")), rate=rate, poisson=poisson,
               duration=duration, batch=batch, dims=_dims(dim), binary=not json_data)
    if as_json:
        console.print_json(json.dumps([r.to_dict() for r in rows]))
        return
    table = Table(title=f"torchship perf: {model} at {url} ({batch} item(s) per request, {duration:g}s per step)")
    for c in ("load", "requests", "ok", "req/s", "p50 ms", "p90 ms", "p99 ms", "avg batch", "errors"):
        table.add_column(c, justify="left" if c in ("load", "errors") else "right")
    for r in rows:
        f = lambda v, spec="{:.2f}": "-" if v is None else spec.format(v)  # noqa: E731
        table.add_row(r.mode, str(r.requests), str(r.ok), f(r.throughput, "{:.1f}"), f(r.p50_ms), f(r.p90_ms), f(r.p99_ms),
                      f(r.avg_batch), ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "none")
    console.print(table)


@app.command("train")
def train_cmd(
    source: str = typer.Argument(..., help="zoo:digits-cnn or package.module:attr (an nn.Module or a factory)"),
    data: str = typer.Option(..., help="zoo:digits, or a .npz with x_train/y_train/x_val/y_val[/x_test/y_test] or x/y"),
    task: str = typer.Option("classify", help="classify, regress or embed"),
    epochs: int = typer.Option(30, help="most epochs (early stopping may end sooner, keeping the best epoch)"),
    batch_size: int = typer.Option(64, help="items per step (per process)"),
    lr: float = typer.Option(3e-3, help="AdamW learning rate"),
    weight_decay: float = typer.Option(1e-4, help="AdamW weight decay (not on biases and norms)"),
    schedule: str = typer.Option("cosine", help="cosine (with warm-up), step, poly or none"),
    grad_clip: Optional[float] = typer.Option(1.0, help="gradient norm clipping (0: off)"),
    precision: str = typer.Option("auto", help="auto (mixed precision on a GPU, fp32 on the CPU), 32-true, bf16-mixed or 16-mixed"),
    patience: int = typer.Option(5, help="early-stopping patience in epochs (0: off)"),
    augment: bool = typer.Option(False, help="random shifts, small rotations and noise for images"),
    seed: int = typer.Option(0, help="a fixed seed makes a run repeatable"),
    devices: int = typer.Option(1, help="processes (data parallel with --strategy ddp)"),
    strategy: str = typer.Option("auto", help="auto or ddp"),
    teacher: Optional[str] = typer.Option(None, help="distil from this teacher (zoo:digits-cnn or package.module:attr)"),
    teacher_weights: Optional[str] = typer.Option(None, help="the teacher's state dict (.safetensors)"),
    weights: Optional[str] = typer.Option(None, help="start from these weights (e.g. to fine-tune a pruned model)"),
    qat: bool = typer.Option(False, help="quantization-aware training (torchao): writes an int8 model_int8.pt2 for optimize"),
    keep_sparsity: bool = typer.Option(False, help="fine-tune a pruned model (--weights): zero weights stay zero"),
    prune_channels: Optional[float] = typer.Option(None, help="remove this fraction of channels (Torch-Pruning), then fine-tune; writes model.pt2"),
    out: Path = typer.Option(Path("torchship-run"), "--out", "-o", help="run directory: model.safetensors, metrics.csv, summary.json"),
):
    """Train with PyTorch Lightning and the production recipe; the weights feed `torchship optimize --weights`."""
    _user_code_importable()
    from .train import TrainConfig
    from .train import train as run
    config = TrainConfig(task=task, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, schedule=schedule,
                         grad_clip=grad_clip or None, precision=precision, patience=patience or None, augment=augment, seed=seed,
                         devices=devices, strategy=strategy, qat=qat,
                         keep_sparsity=keep_sparsity, prune_channels=prune_channels)
    teacher_model = teacher
    if teacher and teacher_weights:
        from .train import _module
        teacher_model = _module(teacher, weights=teacher_weights)
    result = run(source, data, config, out=out, teacher=teacher_model, weights=weights)
    r = result.summary
    console.print(f"trained {r['epochs_run']} epochs in {r['seconds']:.1f}s ({r['recipe']['precision']}: "
                  f"{escape(r['recipe']['precision_reason'])}); validation {_metrics(r['val'])}; test {_metrics(r['test']) or '-'}",
                  highlight=False)
    model_file = out / ("model_int8.pt2" if qat else "model.pt2" if prune_channels else "model.safetensors")
    console.print(f"{'weights' if model_file.suffix == '.safetensors' else 'model'}: [bold]{escape(str(model_file))}[/]  metrics: {out / 'metrics.csv'}  "
                  f"summary: {out / 'summary.json'}")


def _metrics(d: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in d.items())


@app.command("inspect")
def inspect_cmd(
    source: str = typer.Argument(..., help="zoo:NAME, package.module:attr, a .pt2/TorchScript file, or a HF model directory"),
    input: List[str] = typer.Option([], "--input", "-i", help="NAME:DTYPE[DIMS] (repeat per input)"),
    weights: Optional[str] = typer.Option(None, help="state dict for a module:attr source"),
    dim: List[str] = typer.Option([], "--dim", help="size of a dynamic dimension, e.g. seq=128"),
    batch: int = typer.Option(2, help="items in the forward pass"),
    include: Optional[str] = typer.Option(None, help="only modules whose name matches this glob, e.g. 'encoder.layer.0.*'"),
    dump: Optional[Path] = typer.Option(None, help="save every hooked module's output to DIR/activations.safetensors"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
):
    """One forward pass with hooks on every leaf module: shapes, FLOPs, time, activation statistics, first NaN/Inf."""
    _user_code_importable()
    from .inspect import inspect as run
    w = run(source, input or None, weights=weights, dims=_dims(dim), batch=batch, include=include,
            dump=str(dump) if dump else None)
    if as_json:
        console.print_json(json.dumps(w.to_dict()))
    else:
        table = Table(title=f"torchship inspect: {source} (batch {batch})")
        for c in ("module", "type", "output", "params", "MFLOPs", "ms", "min", "max", "mean", "std", "zeros", "non-finite"):
            table.add_column(c, justify="left" if c in ("module", "type", "output") else "right", no_wrap=c != "module")
        f = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
        for l in w.layers.values():
            s = l.stats
            table.add_row(escape(l.name), escape(l.type), escape(" ".join(f"{d}{sh}" for d, sh in zip(l.dtypes, l.shapes))), f"{l.params:,}",
                          f"{l.flops / 1e6:.3g}", f"{l.ms:.3f}", f(s["min"]), f(s["max"]), f(s["mean"]), f(s["std"]),
                          f"{s['zeros']:.0%}", f"[red]{s['nonfinite']}[/]" if s["nonfinite"] else "0")
        console.print(table)
        total = sum(l.flops for l in w.layers.values())
        console.print(f"{len(w.layers)} modules, {sum(l.params for l in w.layers.values()):,} parameters, "
                      f"about {total / 1e6:.3g} MFLOPs per forward pass of {batch}")
    if w.first_nonfinite:
        n = w.first_nonfinite
        ins = "; ".join(f"min {s['min']}, max {s['max']}, non-finite {s['nonfinite']}" for s in n["inputs"])
        err.print(f"[red]first non-finite output[/]: {escape(n['module'])} ({escape(n['type'])}); its input: {ins}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    if dump:
        console.print(f"activations: {escape(str(dump / 'activations.safetensors'))}")


@app.command("check")
def check_cmd(
    source: str = typer.Argument(..., help="zoo:NAME, package.module:attr, a .pt2/TorchScript file, or a HF model directory"),
    input: List[str] = typer.Option([], "--input", "-i", help="NAME:DTYPE[DIMS] (repeat per input)"),
    weights: Optional[str] = typer.Option(None, help="the checkpoint you deploy (checked for unpickling too)"),
    dim: List[str] = typer.Option([], "--dim", help="size of a dynamic dimension, e.g. seq=128"),
    device: str = typer.Option("cpu", help="the device you serve on: cpu or cuda"),
    workers: int = typer.Option(1, help="worker processes you serve with (for the thread check)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a list"),
):
    """Find the classic production mistakes, each with measured evidence and the fix. Exit 1 when any is found
    (an effect inside the noise is 'unsure', and does not fail)."""
    _user_code_importable()
    from .inspect.check import check as run
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    findings = run(source, input or None, weights=weights, dims=_dims(dim), device=device, workers=workers)
    if as_json:
        console.print_json(json.dumps([f.to_dict() for f in findings]))
    else:
        marks = {"found": "[red]FOUND[/]", "ok": "[green]ok[/]   ", "inconclusive": "[yellow]unsure[/]", "n/a": "[dim]n/a[/]  "}
        for f in findings:
            console.print(f"{marks[f.status]} [bold]{escape(f.check)}[/]: {escape(f.evidence)}", highlight=False)
            if f.found:
                console.print(f"       fix: {escape(f.fix)}", highlight=False)
        found = sum(1 for f in findings if f.found)
        unsure = sum(1 for f in findings if f.status == "inconclusive")
        summary = f"{found} problem(s) found" if found else "no problems found"
        console.print(summary + (f"; {unsure} inconclusive (the measured effect is inside the noise)" if unsure else ""))
    if any(f.found for f in findings):
        raise typer.Exit(1)


@bundle_app.command("verify")
def bundle_verify(path: Path = typer.Argument(..., help="bundle directory"),
                  key: Optional[Path] = typer.Option(None, "--key", help="also require a valid signature by this public key (PEM)")):
    """Check every file of a bundle against the sha256 in its manifest (and its signature, with --key)."""
    from .bundle import read
    b = read(path, key)
    m = b.manifest
    signed = f"; signed by key {b.signer}" if b.signer else ""
    console.print(f"[green]ok[/]: {escape(str(path))} ({escape(m.name)} v{m.version}, {m.runtime}, {len(m.files)} files "
                  f"verified{signed})", highlight=False)
    if m.executes:
        console.print(f"[yellow]note[/]: loading it {escape(m.executes)}: serve it with --trust-code, or sign it and serve "
                      "with --verify-key", highlight=False)
    for name in b.unlisted:
        console.print(f"[yellow]unlisted[/]: {escape(name)} is in the directory but not in the manifest: never read, not "
                      "verified", highlight=False)


@bundle_app.command("info")
def bundle_info(path: Path = typer.Argument(..., help="bundle directory")):
    """Print a bundle's manifest (spec, runtime, what loading executes, fidelity, profile)."""
    from .bundle import info, read_manifest
    console.print_json(info(read_manifest(path)).decode())


@bundle_app.command("sign")
def bundle_sign(path: Path = typer.Argument(..., help="bundle directory"),
                key: Path = typer.Option(..., "--key", help="private key (PEM, from `torchship bundle keygen`)")):
    """Sign a bundle (after verifying it): BUNDLE/signature.json, an Ed25519 signature of its manifest."""
    from .bundle import sign
    sig = sign(path, key)
    console.print(f"signed {escape(str(path))} with key {sig.key}: {escape(str(path / 'signature.json'))}", highlight=False)


@bundle_app.command("keygen")
def bundle_keygen(out: Path = typer.Option(..., "--out", "-o", help="private key file to write (the public key goes to OUT.pub)")):
    """Make an Ed25519 key pair for signing bundles."""
    from .signing import keygen
    private, public = keygen(out)
    console.print(f"private key: {escape(str(private))} (keep it secret)  public key: {escape(str(public))}", highlight=False)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    _log_to_stderr()
    path = list(sys.path)  # each command sets the import path it needs; a caller in Python gets its own back
    try:
        code = app(argv, standalone_mode=False)  # click returns a typer.Exit's code here
        return code if isinstance(code, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        return 130
    except typer.TyperException as exc:  # click's usage errors, as Typer ships them
        exc.show()
        return getattr(exc, "exit_code", 2)
    except TorchshipError as exc:
        if debug:
            raise
        err.print(f"[red]error[/]: {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, ModuleNotFoundError):  # an optional package this command needs (a slim install: no torch)
            from .errors import missing_extra
            found = missing_extra(exc, f"torchship {argv[0]}" if argv else "torchship")
            if isinstance(found, TorchshipError):
                err.print(f"[red]error[/]: {escape(str(found))}", highlight=False, soft_wrap=True)
                return found.exit_code
        err.print(f"[red]error[/]: {type(exc).__name__}: {escape(str(exc))} (rerun with --debug for the traceback)", highlight=False, soft_wrap=True)
        return 1
    finally:
        sys.path[:] = path


if __name__ == "__main__":
    sys.exit(main())
