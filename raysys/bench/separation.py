"""Does the downstream suite tell pre-training on true pairs from no pre-training? (issue 17's gate)

The suite can rank recipes only if it separates the two ends the paper's Fig. 1 spans: `base` (no
pre-training) and `paired_ratio: 1` (every image with its own captions). This bench builds a demo
world in `--work` (or reuses it), pre-trains both with one config, fine-tunes each on the suite with
one budget and prints the meta-average of each, then, last, the JSON with their difference and its
95 % paired bootstrap interval over evaluation items: `separates` is true when the interval lies
above 0. A re-run reuses the world and both checkpoints in `--work` (the suite runs again). It is
a bench, not a test: at the settings of docs/evaluation.md it takes ~30 min on 2 cores.

One fine-tuning draw moves the difference by up to 2.4 points (issue 17), which the interval over
items cannot see: `--suite repeats=2` averages two draws per item, at twice the suite's time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work", required=True, help="directory for the world, the checkpoints and the scores")
    p.add_argument("--images", type=int, default=1500, help="images of the demo world")
    p.add_argument("--world-seed", type=int, default=0, help="choose settings on another seed than the one reported")
    p.add_argument("--eval-fraction", type=float, default=0.2, help="the world's held-out (suite) images")
    p.add_argument("--pretrain", nargs="*", default=[], metavar="key=value",
                   help="pre-training overrides of both runs (defaults: 2 layers, batch 32, 300 steps)")
    p.add_argument("--suite", nargs="*", default=[], metavar="key=value", help="suite budget overrides")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")


PRETRAIN = {"model_layers": 2, "batch_size": 32, "steps": 300, "lr": 1e-4, "log_every": 0, "input": "memory"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch  # lazy: keeps raysys --help fast

    from raysys import config  # lazy: as above
    from raysys.config import ConfigError  # lazy: as above
    from raysys.contract import read_manifest  # lazy: as above
    from raysys.data.world import WorldConfig, write_world  # lazy: as above
    from raysys.evaluate.metrics import META_TASKS  # lazy: as above
    from raysys.evaluate.suite import SuiteConfig, run_suite, write_items  # lazy: as above
    from raysys.experiments.report import paired_bootstrap  # lazy: as above
    from raysys.pretrain.config import PretrainConfig  # lazy: as above
    from raysys.pretrain.loop import train_local  # lazy: as above

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    data = work / "data"
    want = {"images": args.images, "seed": args.world_seed, "eval_fraction": args.eval_fraction}
    if not (data / "manifest.json").exists():
        write_world(WorldConfig(**want), data)
    have = {k: read_manifest(data).get("world", {}).get(k) for k in want}
    if have != want:
        raise ConfigError(f"{data}: a world of {have} is there, not {want}: use another --work")
    over = config.apply_overrides({}, args.pretrain)
    scfg = config.load(SuiteConfig, None, [f"tasks={list(META_TASKS)}", *args.suite])
    scores, items, t0 = {}, {}, time.perf_counter()
    # base reads only R-T (images and tags), so the world needs no retrieval: the model is the same
    recipes = [("base", {"recipe": "base", "steps": 1, "granularities": ["rt"]}),
               ("paired", {"recipe": "paired_ratio", "paired_ratio": 1.0})]  # fmt: skip
    for name, recipe in recipes:
        cfg = config.from_dict(PretrainConfig, {**PRETRAIN, **over, **recipe})
        out = work / name
        if not (out / "model.pt").exists():
            train_local(cfg, data, out)
        res = run_suite(out / "model.pt", data, scfg)
        write_items(res, work / f"{name}.items.json")
        scores[name] = {"meta_average": round(res["meta_average"], 2), **{t: round(v, 2) for t, v in res["scores"].items()}}
        items[name] = {t: dict(zip(v["ids"], v["scores"])) for t, v in res["items"].items()}
        print(f"{name:<7} " + "  ".join(f"{k} {v:.1f}" for k, v in scores[name].items()), file=sys.stderr, flush=True)
    point, lo, hi = paired_bootstrap(items["paired"], items["base"], [t for t in META_TASKS if t in scfg.tasks])
    return {"base": scores["base"], "paired": scores["paired"], "delta": round(point, 2), "ci95": [round(lo, 2), round(hi, 2)],
            "separates": bool(lo > 0), "world": want,
            "pretrain": {k: getattr(cfg, k) for k in {**PRETRAIN, **over}}, "suite": scfg.budget(), "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip

