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
from raysys.phrases import PhrasesConfig
from raysys.retrieval import RetrievalConfig
from raysys.train import TrainConfig, demo_config
from raysys.world import WorldConfig
from raysys.zeroshot import ZeroShotConfig, demo_zeroshot_config

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    """Top-level config of `raysys demo` / `jobs/pipeline.py`; one section per stage."""

    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    phrases: PhrasesConfig = field(default_factory=PhrasesConfig)
    pretrain: TrainConfig = field(default_factory=demo_config)  # brief: 2 workers, 2 × 20 steps
    zeroshot: ZeroShotConfig = field(default_factory=demo_zeroshot_config)  # pre-trained vs base, gold eval pairs


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


def stage_retrieval(cfg: PipelineConfig, out: Path, summary: dict[str, Any]) -> None:
    """Embed tag queries and texts, top-K sharded FAISS search → data/pairs; summary holds the diagnostics."""
    from raysys.embedding import ensure_ray
    from raysys.retrieval import retrieve

    ensure_ray()
    summary["retrieval"] = retrieve(out / "data", cfg.retrieval)


def stage_phrases(cfg: PipelineConfig, out: Path, summary: dict[str, Any]) -> None:
    """Noun phrases of the retrieved sentences linked to regions → data/phrases."""
    from raysys.embedding import ensure_ray
    from raysys.phrases import extract_phrases

    ensure_ray()
    summary["phrases"] = extract_phrases(out / "data", cfg.phrases)


def stage_pretrain(cfg: PipelineConfig, out: Path, summary: dict[str, Any]) -> None:
    """Ray Train pre-training (TorchTrainer, DDP) → OUT/train/pretrain/checkpoint-*; the MLflow run
    goes to `pretrain.tracking_uri` (default sqlite:///OUT/mlflow.db). A re-run resumes."""
    from raysys.tracking import describe
    from raysys.train import ensure_ray, fit

    ensure_ray()
    storage = cfg.pretrain.storage or str(out / "train")
    res = fit(cfg.pretrain, out / "data", name="pretrain", storage=storage, tracking_base=out)
    keys = ("final_loss", "steps", "epochs", "complete", "checkpoint", "mlflow_run_id", "tracking_uri", "experiment",
            "workers", "global_batch", "components", "samples_per_s", "device")  # fmt: skip
    summary["pretrain"] = {k: res.get(k) for k in keys}
    if res.get("tracking_uri"):
        where = describe(res["tracking_uri"], res["mlflow_run_id"], res.get("experiment"))
        summary["pretrain"]["mlflow"] = where
        print(where, flush=True)


def stage_zeroshot(cfg: PipelineConfig, out: Path, summary: dict[str, Any]) -> None:
    """Zero-shot image<->text retrieval on the gold eval pairs: the pre-trained checkpoint vs `base`
    (same layers, fresh heads); prints a small table, logs into the pre-training MLflow run."""
    from raysys.zeroshot import zeroshot_stage

    summary["zeroshot"] = zeroshot_stage(cfg.zeroshot, out / "data", summary.get("pretrain") or {})


STAGES: list[tuple[str, Callable[[PipelineConfig, Path, dict], None]]] = [
    ("world", stage_world),
    ("retrieval", stage_retrieval),
    ("phrases", stage_phrases),
    ("pretrain", stage_pretrain),
    ("zeroshot", stage_zeroshot),
]


def run_pipeline(cfg: PipelineConfig, out: str | Path, stages: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run the stages (all, or the named subset in pipeline order) on `out/data`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    known = [name for name, _ in STAGES]
    if stages is not None and set(stages) - set(known):
        raise ValueError(f"unknown stage(s) {sorted(set(stages) - set(known))}; known: {known}")
    # A partial run (one stage job after another) keeps the figures of the stages already run.
    prev = out / "summary.json"
    summary: dict[str, Any] = json.loads(prev.read_text()) if stages is not None and prev.exists() else {}
    for name, fn in STAGES:
        if stages is not None and name not in stages:
            continue
        t0 = time.perf_counter()
        log.info("stage %s ...", name)
        fn(cfg, out, summary)
        summary.setdefault(name, {})["seconds"] = round(time.perf_counter() - t0, 2)
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary
