"""The whole pipeline as one function: world → retrieval → phrases → pre-training → zero-shot.

`raysys demo` and `jobs/pipeline.py` both call `run_pipeline`. Each stage is a function
`(cfg, out_dir, summary) -> None` that runs its stage on `out_dir/data` and records its figures
under `summary[<stage>]`; `summary.json` is rewritten after every stage so a partial run still
shows what finished.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysys.contract import write_text_atomic
from raysys.world import WorldConfig

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    """Top-level config of `raysys demo` / `jobs/pipeline.py`; one section per stage."""

    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)


def stage_world(cfg: PipelineConfig, out: Path, summary: dict[str, Any]) -> None:
    from raysys.contract import validate_dataset
    from raysys.world import write_world

    data = out / "data"
    if not (data / "manifest.json").exists():
        write_world(cfg.world, data)
    counts = validate_dataset(data)
    summary["world"] = {"data": str(data), "counts": counts, **_world_figures(data)}


def _world_figures(data: Path) -> dict[str, Any]:
    from raysys.contract import read_manifest

    man = read_manifest(data)
    return {k: man.get(k) for k in ("feature_dim", "world") if k in man}


STAGES: list[tuple[str, Callable[[PipelineConfig, Path, dict], None]]] = [
    ("world", stage_world),
]


def run_pipeline(cfg: PipelineConfig, out: str | Path) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    for name, fn in STAGES:
        t0 = time.perf_counter()
        log.info("stage %s ...", name)
        fn(cfg, out, summary)
        summary.setdefault(name, {})["seconds"] = round(time.perf_counter() - t0, 2)
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary
