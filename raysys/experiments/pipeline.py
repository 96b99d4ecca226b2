"""The whole pipeline as one function: world → retrieval → phrases → pre-training → zero-shot → report.

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
from raysys.corpus.phrases import PhrasesConfig
from raysys.corpus.retrieval import RetrievalConfig
from raysys.data.world import WorldConfig
from raysys.evaluate.zeroshot import ZeroShotConfig, demo_zeroshot_config
from raysys.pretrain.ray_train import TrainConfig, demo_config

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    """Top-level config of `raysys demo` / `jobs/pipeline.py`; one section per stage."""

    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    phrases: PhrasesConfig = field(default_factory=PhrasesConfig)
    pretrain: TrainConfig = field(default_factory=demo_config)  # brief: 2 workers, 2 × 75 joint steps
    zeroshot: ZeroShotConfig = field(default_factory=demo_zeroshot_config)  # pre-trained vs base, gold eval pairs


def stage_world(cfg: PipelineConfig, out: Path, summary: dict[str, Any]) -> None:
    from raysys.contract import validate_dataset
    from raysys.data.world import write_world

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
    from raysys.corpus.retrieval import retrieve
    from raysys.raycluster import ensure_ray

    ensure_ray()
    summary["retrieval"] = retrieve(out / "data", cfg.retrieval)


def stage_phrases(cfg: PipelineConfig, out: Path, summary: dict[str, Any]) -> None:
    """Noun phrases of the retrieved sentences linked to regions → data/phrases."""
    from raysys.corpus.phrases import extract_phrases
    from raysys.raycluster import ensure_ray

    ensure_ray()
    summary["phrases"] = extract_phrases(out / "data", cfg.phrases)


def stage_pretrain(cfg: PipelineConfig, out: Path, summary: dict[str, Any]) -> None:
    """Ray Train pre-training (TorchTrainer, DDP) → OUT/train/pretrain/checkpoint-*; the MLflow run
    goes to `pretrain.tracking_uri` (default sqlite:///OUT/mlflow.db). A re-run resumes."""
    from raysys.pretrain.ray_train import ensure_ray, fit
    from raysys.tracking import describe

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
    from raysys.evaluate.zeroshot import zeroshot_stage

    summary["zeroshot"] = zeroshot_stage(cfg.zeroshot, out / "data", summary.get("pretrain") or {})


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return "–" if v is None else str(v)


def pipeline_report(summary: dict[str, Any]) -> str:
    """The run on one page (Markdown), from `summary.json` alone: what each stage produced, the
    figures to judge it by, and where its MLflow run is."""
    lines = ["# raysys pipeline report", ""]
    world = summary.get("world") or {}
    if world:
        counts = world.get("counts") or {}
        lines += ["## Data", "", "| table | rows |", "|---|---:|", *[f"| {k} | {v} |" for k, v in counts.items()], ""]
    ret = summary.get("retrieval") or {}
    if ret:
        lines += [f"## Retrieval (top-{ret.get('k')}, index `{ret.get('index')}`, {ret.get('shards')} shard(s))", "",
                  "| figure | value |", "|---|---:|",
                  f"| tag coverage, retrieved pairs | {_fmt(ret.get('tag_coverage_retrieved'))} |",
                  f"| tag coverage, random pairs | {_fmt(ret.get('tag_coverage_random'))} |",
                  f"| gold recall@{ret.get('k')} | {_fmt(ret.get('gold_recall_at_k'))} |",
                  f"| gold recall, random | {_fmt(ret.get('gold_recall_random'))} |",
                  f"| pairs | {_fmt(ret.get('pairs'))} |", ""]  # fmt: skip
        for ex in (ret.get("examples") or [])[:3]:
            lines.append(f"- **{ex.get('image_id')}** tags: {', '.join(map(str, ex.get('tags') or []))}")
            for r in (ex.get("retrieved") or [])[:3]:
                text = r.get("text") if isinstance(r, dict) else r
                lines.append(f"  - {text}" + (" (gold)" if isinstance(r, dict) and r.get("gold") else ""))
        lines.append("")
    ph = summary.get("phrases") or {}
    if ph:
        lines += ["## Phrases", "", ", ".join(f"{k}: {_fmt(v)}" for k, v in ph.items() if not isinstance(v, (dict, list))), ""]
    pre = summary.get("pretrain") or {}
    if pre:
        lines += [f"## Pre-training ({pre.get('steps')} steps, {pre.get('workers')} worker(s), global batch "
                  f"{pre.get('global_batch')}, {pre.get('device')})", "",
                  f"final loss {_fmt(pre.get('final_loss'))}; checkpoint `{pre.get('checkpoint')}`", "",
                  "| term | last value |", "|---|---:|",
                  *[f"| {k} | {_fmt(v)} |" for k, v in sorted((pre.get("components") or {}).items())], ""]  # fmt: skip
        if pre.get("mlflow"):
            lines += [f"MLflow: {pre['mlflow']}", ""]
    zs = summary.get("zeroshot") or {}
    if zs.get("pretrained") and zs.get("base"):
        from raysys.evaluate.zeroshot import format_table

        lines += ["## Zero-shot retrieval, pre-trained vs base", "", "```", format_table({k: zs[k] for k in ("pretrained", "base")}),
                  "```", "", f"margin text→image R@5: {_fmt(zs.get('margin_t2i_r5'), 1)} points; "
                  f"image→text R@5: {_fmt(zs.get('margin_i2t_r5'), 1)} points", ""]  # fmt: skip
    secs = {k: v.get("seconds") for k, v in summary.items() if isinstance(v, dict) and v.get("seconds") is not None}
    if secs:
        lines += ["## Stage times (s)", "", " · ".join(f"{k} {_fmt(v, 1)}" for k, v in secs.items()), ""]
    return "\n".join(lines)


def stage_report(cfg: PipelineConfig, out: Path, summary: dict[str, Any]) -> None:
    """OUT/report.md from the summary, also logged as an artifact of the pre-training MLflow run."""
    path = out / "report.md"
    write_text_atomic(path, pipeline_report(summary))
    summary["report"] = {"path": str(path), "mlflow_artifact": False}
    pre = summary.get("pretrain") or {}
    if pre.get("tracking_uri") and pre.get("mlflow_run_id"):
        from raysys import tracking

        tracking.log_artifacts(pre["tracking_uri"], pre["mlflow_run_id"], [path])
        summary["report"]["mlflow_artifact"] = True


STAGES: list[tuple[str, Callable[[PipelineConfig, Path, dict], None]]] = [
    ("world", stage_world),
    ("retrieval", stage_retrieval),
    ("phrases", stage_phrases),
    ("pretrain", stage_pretrain),
    ("zeroshot", stage_zeroshot),
    ("report", stage_report),
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
