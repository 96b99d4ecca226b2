"""The whole pipeline as one function: world → retrieval → phrases → pre-training → zero-shot → report.

`raysys demo`, `jobs/pipeline.py` and the stage jobs (`jobs/retrieve.py`, `jobs/pretrain.py`,
`jobs/evaluate.py`: a subset of the stages) all call `run_pipeline`. Each stage is a function
`(cfg, out_dir, summary) -> None` that runs its stage on `out_dir/data` and records its figures
under `summary[<stage>]`; `summary.json` is rewritten after every stage so a partial run still
shows what finished.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysys import tracking
from raysys.config import ConfigError
from raysys.contract import MANIFEST, read_manifest, validate_dataset, write_text_atomic
from raysys.corpus.assemble import AssembleConfig, assemble
from raysys.corpus.phrases import PhrasesConfig, extract_phrases
from raysys.corpus.retrieval import RetrievalConfig, retrieve
from raysys.data.world import WorldConfig, write_world
from raysys.evaluate.zeroshot import ZeroShotConfig, demo_zeroshot_config, format_table, zeroshot_stage
from raysys.experiments.rundir import read_summary, write_summary
from raysys.pretrain import ray_train
from raysys.pretrain.config import TrainConfig
from raysys.pretrain.ray_train import demo_config
from raysys.raycluster import ensure_ray

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

    def __post_init__(self) -> None:
        check_k("pretrain.k", self.pretrain.k, "retrieval.k", self.retrieval.k)


def check_k(key: str, k: int, retrieval_key: str, retrieved: int) -> None:
    """K is owned by retrieval: pre-training filters `rank < k` of the pairs retrieval stored, so
    a larger k would silently train on fewer pairs than asked. Checked when a config is loaded
    (so `--dry-run` fails too), by `PipelineConfig` and by the sweep."""
    if k > retrieved:
        raise ConfigError(
            f"{key}={k} exceeds {retrieval_key}={retrieved}: pre-training can only use pairs that retrieval kept"
        )


def stage_world(cfg: PipelineConfig, out: Path, summary: dict[str, Any]) -> None:
    data = out / "data"
    if not (data / "manifest.json").exists():
        write_world(cfg.world, data)
    counts = validate_dataset(data)
    summary["world"] = {"data": str(data), "counts": counts, **_world_figures(data)}


def _world_figures(data: Path) -> dict[str, Any]:
    man = read_manifest(data)
    return {k: man.get(k) for k in ("feature_dim", "world") if k in man}


def stage_retrieval(cfg: PipelineConfig, out: Path, summary: dict[str, Any]) -> None:
    """Embed tag queries and texts, top-K sharded FAISS search → data/pairs; summary holds the diagnostics."""
    ensure_ray()
    summary["retrieval"] = retrieve(out / "data", cfg.retrieval)


def stage_phrases(cfg: PipelineConfig, out: Path, summary: dict[str, Any]) -> None:
    """Noun phrases of the retrieved sentences linked to regions → data/phrases; then the training
    examples pre-training streams (`raysys assemble`) → data/examples."""
    ensure_ray()
    summary["phrases"] = extract_phrases(out / "data", cfg.phrases)
    summary["phrases"]["assemble"] = assemble(out / "data", AssembleConfig(seed=cfg.pretrain.seed, exclude_eval=cfg.pretrain.exclude_eval))


def stage_pretrain(cfg: PipelineConfig, out: Path, summary: dict[str, Any]) -> None:
    """Ray Train pre-training (TorchTrainer, DDP) → OUT/train/pretrain/checkpoint-*; the MLflow run
    goes to `pretrain.tracking_uri` (default sqlite:///OUT/mlflow.db). A re-run resumes."""
    ray_train.ensure_ray()
    storage = cfg.pretrain.storage or str(out / "train")
    res = ray_train.fit(cfg.pretrain, out / "data", name="pretrain", storage=storage, tracking_base=out)
    keys = ("final_loss", "steps", "epochs", "complete", "checkpoint", "mlflow_run_id", "tracking_uri", "experiment",
            "workers", "global_batch", "components", "samples_per_s", "device")  # fmt: skip
    summary["pretrain"] = {k: res.get(k) for k in keys}
    if res.get("tracking_uri"):
        where = tracking.describe(res["tracking_uri"], res["mlflow_run_id"], res.get("experiment"))
        summary["pretrain"]["mlflow"] = where
        print(where, flush=True)


def stage_zeroshot(cfg: PipelineConfig, out: Path, summary: dict[str, Any]) -> None:
    """Zero-shot image<->text retrieval on the gold eval pairs: the pre-trained checkpoint vs `base`
    (same layers, fresh heads); prints a small table, logs into the pre-training MLflow run."""
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


def check_stages(stages: Sequence[str]) -> None:
    """Unknown stage names are a config error, raised before anything starts."""
    known = [name for name, _ in STAGES]
    if set(stages) - set(known):
        raise ConfigError(f"unknown stage(s) {sorted(set(stages) - set(known))}; known: {known}")


def run_pipeline(cfg: PipelineConfig, out: str | Path, stages: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the stages (all, or the named subset in pipeline order) on `out/data`.

    A subset keeps the figures already in OUT/summary.json, so running the stage jobs one after
    another on one OUT builds the same summary.json as one whole run (a later stage finds what an
    earlier one recorded, e.g. the checkpoint). A subset without `world` needs the dataset there."""
    out = Path(out)
    if stages is not None:
        check_stages(stages)
        if "world" not in stages and not (out / "data" / MANIFEST).exists():
            raise ConfigError(
                f"{out / 'data'}: no dataset here ({MANIFEST} missing); run the whole pipeline (raysys demo, "
                "jobs/pipeline.py) or featurize (raysys featurize, jobs/featurize.py) into it first"
            )
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = read_summary(out) if stages is not None else {}
    for name, fn in STAGES:
        if stages is not None and name not in stages:
            continue
        t0 = time.perf_counter()
        log.info("stage %s ...", name)
        fn(cfg, out, summary)
        summary.setdefault(name, {})["seconds"] = round(time.perf_counter() - t0, 2)
        write_summary(out, summary)
    return summary
