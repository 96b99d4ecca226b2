"""`raysys pretrain`: pre-train the single-stream model.

`--local` runs the plain-PyTorch loop in this process (debugging, tests, the baselines at small
scale). Without it, Ray Train runs the same core on `--workers` DDP ranks (raysys.pretrain.ray_train).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from raysys import config
from raysys.config import ConfigError
from raysys.locks import output_lock
from raysys.pretrain.config import PretrainConfig, TrainConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pre-train the V+L model (--local: single process); last line is JSON",
        description="Pre-train with a recipe (muvla, base, random_pairs, paired_ratio, round_robin, or a "
        "'+'-joined subset of rt, rp, is). Prints loss components while training and, as its last line, "
        "one JSON object with recipe, steps, final_loss and the final value of each loss component.",
    )
    p.add_argument("--local", action="store_true", help="run in this process (plain PyTorch, no Ray)")
    p.add_argument("--data", required=True, help="dataset directory (images/, texts/, pairs/, phrases/, gold/)")
    p.add_argument("--recipe", default=None, help="recipe name (default: the config's, muvla)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: epochs × steps per epoch)")
    p.add_argument("--config", default=None, help="YAML with PretrainConfig fields (or a 'pretrain:' section)")
    p.add_argument("--out", default=None, help="write model.pt (torch.load weights_only) and pretrain.yaml here")
    p.add_argument("--history", default=None, help="write the per-step components as JSON lines to this file")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    # distributed (Ray Train; without --local) — see raysys/pretrain/ray_train.py and docs/training.md
    p.add_argument("--name", default=None, help="Ray Train run name; re-running the same name and --storage resumes")
    p.add_argument("--storage", default=None, help="Ray Train storage path: a directory or a URI (s3://, gs://)")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (DDP ranks; default: the config's, 2)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. m=0 batch_size=16")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    data = config.load_yaml(args.config)
    if "pretrain" in data and isinstance(data["pretrain"], dict):
        data = data["pretrain"]
    data = config.apply_overrides(data, args.overrides)
    if args.recipe is not None:
        data["recipe"] = args.recipe
    if not args.local:  # Ray Train (TorchTrainer); its config adds the cluster keys to PretrainConfig
        return run_cli(args, data)
    # the MLflow keys of TrainConfig, so one YAML serves --local and Ray Train
    track_uri, experiment = str(data.pop("tracking_uri", "") or ""), str(data.pop("experiment", "") or "raysys-pretrain")
    cfg = config.from_dict(PretrainConfig, data)
    if args.dry_run:
        print(config.dump(cfg), end="")
        return 0
    if args.steps is not None:  # recorded as run (params and pretrain.yaml alike)
        cfg = dataclasses.replace(cfg, steps=args.steps)
    with output_lock(args.out) if args.out else contextlib.nullcontext():  # one run per --out
        result = _train_local_tracked(cfg, args, track_uri, experiment)
    history = result.pop("history")
    if args.history:
        from raysys.contract import write_text_atomic

        write_text_atomic(args.history, "".join(json.dumps(h) + "\n" for h in history))
    print(json.dumps(result))
    return 0


def _train_local_tracked(cfg: PretrainConfig, args: argparse.Namespace, track_uri: str, experiment: str) -> dict[str, Any]:
    """`train_local`, recorded in MLflow like a Ray Train run (raysys.tracking's one store rule,
    `--out` the default store's directory). Without `--out` and with no store configured there is
    no checkpoint to evaluate and nothing is recorded; the checkpoint names its run, so
    evaluations find their parent."""
    from raysys import tracking  # lazy: keeps raysys --help fast
    from raysys.pretrain.loop import train_local  # lazy: torch; keeps raysys --help fast

    explicit = track_uri or os.environ.get(tracking.ENV_VAR)
    uri = tracking.resolve_tracking_uri(track_uri, args.out) if (args.out or explicit) else None
    if uri is None:
        return train_local(cfg, args.data, out=args.out, steps=args.steps)
    out = Path(args.out).resolve() if args.out else None
    params = {**config.to_dict(cfg), "data": str(Path(args.data).resolve()), "tracking_uri": track_uri, "local": True}
    run_id = tracking.start_pretrain_run(uri, experiment, out.name if out else "pretrain-local", params, args.data,
                                         tags={"raysys.checkpoint": str(out)} if out else None)  # fmt: skip
    try:
        result = train_local(cfg, args.data, out=args.out, steps=args.steps,
                             extra={"mlflow_run_id": run_id, "tracking_uri": uri})  # fmt: skip
    except BaseException:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    files = [out / "model.pt", out / "pretrain.yaml"] if out else []
    tracking.finish_pretrain_run(uri, run_id, result["history"], result, files)
    print(tracking.describe(uri, run_id, experiment), file=sys.stderr)
    result.update(mlflow_run_id=run_id, tracking_uri=tracking.redact(uri), experiment=experiment)
    return result


def run_cli(args: argparse.Namespace, data: dict[str, Any]) -> int:
    """`raysys pretrain` without `--local`: `data` is the config mapping after overrides."""
    if getattr(args, "workers", None) is not None:
        data["workers"] = args.workers
    if getattr(args, "steps", None) is not None:
        data["steps"] = args.steps
    cfg = config.from_dict(TrainConfig, data)
    from raysys.pretrain.ray_train import validate  # lazy: torch and Ray; keeps raysys --help fast

    validate(cfg)
    if args.dry_run:
        print(config.dump(cfg), end="")
        return 0
    if getattr(args, "history", None):
        raise ConfigError("--history is for --local runs; a Ray Train run logs every step to MLflow")
    storage = args.storage or cfg.storage
    if not args.name or not storage:
        raise ConfigError("distributed pre-training needs --name and --storage (or use --local)")
    from raysys.pretrain.ray_train import MODEL_FILE, ensure_ray, fit  # lazy: as above

    started = ensure_ray()
    try:
        result = fit(cfg, args.data, args.name, storage, tracking_base=getattr(args, "out", None) or None)
        if getattr(args, "out", None) and result["complete"]:
            _copy_final_model(result["checkpoint"], Path(args.out), cfg)
            result["model"] = str(Path(args.out) / MODEL_FILE)
    finally:
        if started:
            import ray  # lazy: as above

            ray.shutdown()
    if result["tracking_uri"]:
        from raysys.tracking import describe, redact  # lazy: keeps raysys --help fast

        print(describe(result["tracking_uri"], result["mlflow_run_id"], result["experiment"]), file=sys.stderr)
        result["tracking_uri"] = redact(result["tracking_uri"])  # the printed line never holds a password
    print(json.dumps(result))
    return 0


def _copy_final_model(checkpoint: str, out: Path, cfg: TrainConfig) -> None:
    """`--out`: the final model.pt and resolved config next to each other, as `--local` writes."""
    from ray.train import Checkpoint  # lazy: Ray; keeps raysys --help fast

    from raysys.contract import write_text_atomic
    from raysys.pretrain.ray_train import MODEL_FILE

    out.mkdir(parents=True, exist_ok=True)
    with Checkpoint(checkpoint).as_directory() as d:
        tmp = out / f".{MODEL_FILE}.tmp"
        shutil.copyfile(Path(d) / MODEL_FILE, tmp)
        os.replace(tmp, out / MODEL_FILE)
    write_text_atomic(out / "pretrain.yaml", config.dump(cfg))
