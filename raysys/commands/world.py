"""`raysys world`: write the embedded demo world (images, texts, hidden gold pairs)."""

from __future__ import annotations

import argparse


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
    import json
    import time

    from raysys import config
    from raysys.data.world import WorldConfig, write_world
    from raysys.rss import PeakRSS

    data = config.load_yaml(args.config)
    data = data.get("world", data) if isinstance(data.get("world"), dict) else data
    for k in ("images", "seed"):
        if getattr(args, k) is not None:
            data[k] = getattr(args, k)
    cfg = config.from_dict(WorldConfig, config.apply_overrides(data, args.overrides))
    if args.dry_run:
        print(config.dump(cfg), end="")
        return 0
    t0 = time.perf_counter()
    with PeakRSS() as rss:  # the generator's worker processes included
        man = write_world(cfg, args.out)
    print(json.dumps({
        "out": args.out, **man["counts"], "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": rss.peak_mb,
    }))  # fmt: skip
    return 0
