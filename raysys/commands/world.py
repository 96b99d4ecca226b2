"""`raysys world`: write the embedded demo world (images, texts, hidden gold pairs)."""

from __future__ import annotations

import argparse
import json
import time

from raysys import config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("world", help="generate the demo world dataset (deterministic by seed)")
    p.add_argument("--images", type=int, default=None, help="number of images (default 2000)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--out", required=True, help="dataset directory to create")
    p.add_argument("--config", default=None, help="YAML with WorldConfig fields (or a `world:` section)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="WorldConfig overrides, e.g. detector_error=0.2")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raysys.data.world import WorldConfig, write_world  # lazy: keeps raysys --help fast
    from raysys.locks import output_lock  # lazy: keeps raysys --help fast
    from raysys.rss import PeakRSS  # lazy: keeps raysys --help fast

    cfg = config.load_section(WorldConfig, args.config, args.overrides, "world", {"images": args.images, "seed": args.seed})
    if args.dry_run:
        print(config.dump(cfg), end="")
        return 0
    t0 = time.perf_counter()
    with output_lock(args.out), PeakRSS() as rss:  # the generator's worker processes included
        man = write_world(cfg, args.out)
    print(json.dumps({
        "out": args.out, **man["counts"], "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": rss.peak_mb,
    }))  # fmt: skip
    return 0
