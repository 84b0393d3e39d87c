"""Models being served: bundles loaded, warmed up, each with its own batcher."""
from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .. import bundle
from ..errors import BundleError
from ..machine import cores
from ..spec import IOSpec
from .batcher import BatchConfig, Batcher, LatencyModel
from .metrics import Metrics, ModelMetrics

_VERSION = re.compile(r"^\d+$")


@dataclass
class Entry:
    name: str
    version: str
    path: Path
    manifest: dict
    spec: IOSpec
    batcher: Batcher
    metrics: ModelMetrics
    ready: bool = False
    close: Callable[[], None] | None = None  # worker processes to stop with the entry

    async def stop(self) -> None:
        self.ready = False
        await self.batcher.stop()  # queued requests still run
        if self.close:
            await asyncio.get_running_loop().run_in_executor(None, self.close)


def discover(path: Path) -> list[tuple[str, str, Path]]:
    """(name, version, bundle dir) for a bundle, or for a repository laid out as REPO/name/version/."""
    path = Path(path)
    if (path / bundle.MANIFEST).exists():
        m = bundle.read_manifest(path)
        return [(m["name"], str(m.get("version", "1")), path)]
    found = [(d.parent.name, d.name, d) for d in sorted(path.glob("*/*")) if d.is_dir() and _VERSION.match(d.name)
             and (d / bundle.MANIFEST).exists()]
    if not found:
        raise BundleError(f"{path} is neither a bundle nor a model repository (REPO/NAME/VERSION/manifest.json)")
    return found


def paddable(spec: IOSpec) -> tuple[str, ...]:
    """Symbols that may be padded: those shared with an attention mask input."""
    mask = next((t for t in spec.inputs if t.name.endswith("attention_mask")), None)
    return tuple(d for d in (mask.shape[1:] if mask else ()) if isinstance(d, str))


async def load_entry(name: str, version: str, path: Path, config: BatchConfig, metrics: Metrics, threads: int | None,
                     workers: int = 1) -> Entry:
    """Load a bundle off the event loop (in this process, or in ``workers`` processes), warm it up,
    start its batcher."""
    loop = asyncio.get_running_loop()
    warm_sizes = tuple(sorted({1, config.max_batch_size}))
    latency = LatencyModel(bundle.read_manifest(path).get("profile"))
    if workers > 1:
        from .workers import ProcessPool
        manifest = await loop.run_in_executor(None, bundle.verify, path)
        pool = await loop.run_in_executor(None, lambda: ProcessPool(path, workers, threads, warm_sizes))
        run, close, spec = pool, pool.close, IOSpec.from_dict(manifest["spec"])
    else:
        # A model whose full batch runs on the event loop's thread (under inline_s) gets no spinning pool threads:
        # they would take the cores the loop needs between batches (digits-cnn: ~0.8 of a core, 7-18% throughput).
        fast = bool(latency.points) and latency.predict(config.max_batch_size) < config.inline_s
        loaded = await loop.run_in_executor(None, lambda: bundle.load(path, threads=threads or cores(), spin=not fast))
        manifest, spec, run, close = loaded.manifest, loaded.spec, loaded, None
        await loop.run_in_executor(None, lambda: [loaded(spec.sample(bs, manifest.get("dims") or {})) for bs in warm_sizes])
    series = metrics.model(name, version)
    batcher = Batcher(run, spec, config, paddable=paddable(spec), latency=latency,
                      on_batch=series.on_batch, concurrency=workers)
    batcher.start()
    return Entry(name, version, path, manifest, spec, batcher, series, ready=True, close=close)


def latest(versions: dict[str, Entry]) -> Entry | None:
    ready = [e for e in versions.values() if e.ready]
    return max(ready, key=lambda e: int(e.version) if e.version.isdigit() else -1, default=None)


def nonfinite(feeds: dict[str, np.ndarray]) -> list[str]:
    return [k for k, v in feeds.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
