"""Models being served: bundles loaded, warmed up, each with its own batcher."""
from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import bundle
from ..bundle import Bundle, Manifest
from ..errors import BundleError
from ..machine import cores
from ..spec import IOSpec
from .batcher import BatchConfig, Batcher, LatencyModel
from .metrics import Metrics, ModelMetrics
from .raw import RawInput

_VERSION = re.compile(r"^\d+$")


@dataclass
class Entry:
    name: str
    version: str
    bundle: Bundle  # the private snapshot every load of this entry reads (verified once)
    spec: IOSpec
    batcher: Batcher
    metrics: ModelMetrics
    ready: bool = False  # loaded and in service (False once it is being unloaded)
    close: Callable[[], None] | None = None  # worker processes to stop with the entry
    broken: Callable[[], str | None] = lambda: None  # why its workers cannot run batches now, if they cannot
    reading: int = 0  # requests admitted to its queue whose bodies are still being read and decoded
    pipeline: Any = None  # the bundle's raw-input pipeline (processing: TextPipeline, ImagePipeline), if any
    labels: Any = None  # processing.Labels: a classifier's class names

    @property
    def raw(self) -> RawInput | None:
        """The raw input it takes (text or images), if any."""
        return RawInput(self.pipeline.input, self.pipeline.kind) if self.pipeline is not None else None

    @property
    def embedding(self) -> str | None:
        """The output that answers a text as one vector, where the bundle says so."""
        return getattr(getattr(self.pipeline, "record", None), "output", None)

    @property
    def why(self) -> str | None:
        """None when it can serve; else why not (a 503 says it, and readiness turns false)."""
        return "it is being unloaded" if not self.ready else self.broken()

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    async def stop(self) -> None:
        self.ready = False
        await self.batcher.stop()  # queued requests still run
        loop = asyncio.get_running_loop()
        if self.close:
            await loop.run_in_executor(None, self.close)
        await loop.run_in_executor(None, bundle.remove, self.bundle)


def discover(path: Path, empty_ok: bool = False) -> list[tuple[str, str, Path]]:
    """(name, version, bundle dir) for a bundle, or for a repository laid out as REPO/name/version/ (an empty
    repository is an error unless ``empty_ok``: serving one is a mistake, reloading from one is not)."""
    path = Path(path)
    if bundle.exists(path):
        m = bundle.read_manifest(path)
        return [(m.name, m.version, path)]
    found = [(d.parent.name, d.name, d) for d in sorted(path.glob("*/*")) if d.is_dir() and _VERSION.match(d.name)
             and (d / bundle.MANIFEST).exists()]
    if not found and not (empty_ok and path.is_dir()):
        raise BundleError(f"{path} is neither a bundle nor a model repository (REPO/NAME/VERSION/manifest.json)")
    return found


def paddable(spec: IOSpec) -> tuple[str, ...]:
    """Symbols that may be padded: those shared with an attention mask input."""
    mask = next((t for t in spec.inputs if t.name.endswith("attention_mask")), None)
    return tuple(d for d in (mask.shape[1:] if mask else ()) if isinstance(d, str))


async def load_entry(name: str, version: str, verified: Bundle, config: BatchConfig, metrics: Metrics,
                     threads: int | None, workers: int = 1, trust_code: bool = False, procs: int = 1) -> Entry:
    """Load a verified bundle off the event loop (in this process, or in ``workers`` processes), warm it up,
    start its batcher. ``threads``: intra-op threads per copy of the model (default: the cores shared among the
    ``procs`` server processes and their workers; 1 for a model that runs on the event loop)."""
    loop = asyncio.get_running_loop()
    warm_sizes = tuple(sorted({1, config.max_batch_size}))
    manifest = verified.manifest
    latency = LatencyModel(manifest.profile)
    spec = manifest.spec
    if workers > 1:
        from .workers import ProcessPool
        # a batch running past the request deadline has no one left to answer: its worker is killed and restarted
        share = threads or max(1, cores() // (procs * workers))
        pool = await loop.run_in_executor(None, lambda: ProcessPool(verified, workers, share, warm_sizes, trust_code,
                                                                    run_timeout_s=config.timeout_s + 1.0))
        run, close, broken = pool, pool.close, (lambda: pool.broken)
    else:
        # A model whose full batch runs on the event loop's thread (under inline_s) gets no spinning pool threads:
        # they would take the cores the loop needs between batches (digits-cnn: ~0.8 of a core, 7-18% throughput);
        # and, unless --threads says otherwise, one thread: a pool thread that sleeps between operators only adds a
        # wake-up to each (digits-cnn, ONNX Runtime, 2 cores: batch 8 in 46-51 us on one thread, 72-89 on two).
        fast = bool(latency.points) and latency.predict(config.max_batch_size) < config.inline_s
        share = threads or (1 if fast else max(1, cores() // procs))
        loaded = await loop.run_in_executor(None, lambda: bundle.load(verified, threads=share, spin=not fast,
                                                                      trust_code=trust_code))
        run, close, broken = loaded, None, (lambda: None)
        await loop.run_in_executor(None, lambda: [loaded(spec.sample(bs, manifest.dims)) for bs in warm_sizes])
    from ..processing import pipeline
    from ..processing.lengths import by_length
    text = await loop.run_in_executor(None, pipeline, manifest.processing, verified.path)
    # a padded batch as runs of similar lengths (models with an attention mask), cut where the bundle's measured costs
    # say the calls cost least, where it was timed at several lengths and batch sizes
    run = by_length(run, spec, cost=manifest.pricer())
    series = metrics.model(name, version)
    batcher = Batcher(run, spec, config, paddable=paddable(spec), latency=latency,
                      on_batch=series.on_batch, concurrency=workers)
    series.queue_depth.set_function(lambda: batcher.depth)  # read when scraped: never stale (a dropped request)
    batcher.start()
    labels = manifest.processing.labels if manifest.processing else None
    return Entry(name, version, verified, spec, batcher, series, ready=True, close=close, broken=broken, pipeline=text,
                 labels=labels)


def latest(versions: dict[str, Entry]) -> Entry | None:
    """The newest version that can serve; when none can, the newest (its requests get the 503 that says why)."""
    if len(versions) == 1:  # the common case, on every request
        return next(iter(versions.values()))
    serving = [e for e in versions.values() if e.why is None]
    return max(serving or versions.values(), key=lambda e: int(e.version) if e.version.isdigit() else -1, default=None)
