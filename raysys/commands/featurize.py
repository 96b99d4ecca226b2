"""`raysys featurize`: folders of photos -> the contract's images table (regions, features, tags)."""

from __future__ import annotations

import argparse
import json

from raysys import config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "featurize",
        help="detect regions in real images and write the images table (Ray Data; restartable)",
        description="Read image files, detect objects, pool region features, and write OUT/images/*.parquet "
        "plus OUT/featurize_report.json. A re-run skips finished shards. Bad files are reported, not fatal "
        "(unless --strict).",
    )
    p.add_argument("--images", help="a directory (walked recursively) or a glob pattern (required)")
    p.add_argument("--out", help="dataset directory to write: images/, manifest.json, report (required)")
    p.add_argument("--backend", default=None, help="registered backend, or DETECTOR+FEATURES (default: yolo-effnet)")
    p.add_argument("--detector", default=None, help="override the backend's detector")
    p.add_argument("--features", default=None, help="override the backend's region-feature backend")
    p.add_argument("--plugin", action="append", default=None, metavar="MODULE",
                   help="import MODULE first (it registers backends); repeatable; imported in Ray workers too")
    p.add_argument("--max-regions", type=int, default=None, help="regions per image incl. the whole image (default 20)")
    p.add_argument("--min-score", type=float, default=None, help="detector score threshold (default 0.2)")
    p.add_argument("--shard-size", type=int, default=None, help="images per output shard (default 500)")
    p.add_argument("--batch-size", type=int, default=None, help="images per actor call (default 16)")
    p.add_argument("--actors", type=int, default=None, help="actor pool size (default: one per cluster CPU)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad file")
    p.add_argument("--no-ray", action="store_true", help="run in this process (small inputs, debugging)")
    p.add_argument("--config", default=None, help="YAML file; its `featurize:` section (or top level) is used")
    p.add_argument("--list-backends", action="store_true", help="print registered backends and exit")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config (one JSON line) and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. grid=3 max_side=800")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raysys.data import detectors  # lazy: keeps raysys --help fast
    from raysys.data.featurize import (  # lazy: keeps raysys --help fast
        FeaturizeConfig,
        featurize,
        format_summary,
        import_plugins,
    )
    from raysys.locks import output_lock  # lazy: keeps raysys --help fast

    if args.list_backends:
        import_plugins(args.plugin or [])
        print("backends:", ", ".join(f"{k} = {d}+{f}" for k, (d, f) in detectors.BACKENDS.items()))
        print("detectors:", ", ".join(sorted(detectors.DETECTORS)))
        print("region features:", ", ".join(sorted(detectors.REGION_FEATURES)))
        return 0
    if not args.images or not args.out:
        raise config.ConfigError("featurize: --images and --out are required")
    flags = {
        "backend": args.backend,
        "detector": args.detector,
        "features": args.features,
        "plugins": args.plugin,
        "max_regions": args.max_regions,
        "min_score": args.min_score,
        "shard_size": args.shard_size,
        "batch_size": args.batch_size,
        "actors": args.actors,
        "strict": True if args.strict else None,
    }
    cfg = config.load_section(FeaturizeConfig, args.config, args.overrides, "featurize", flags)
    cfg.check()
    if args.dry_run:
        print(json.dumps(config.to_dict(cfg), separators=(",", ":")))
        return 0
    with output_lock(args.out):  # refuses an --out that is a file, or held by another run, before any work
        report = featurize(cfg, args.images, args.out, use_ray=not args.no_ray)
    print(format_summary(report, args.out))
    keys = ("images", "files", "failed", "shards", "shards_written", "shards_skipped", "seconds")
    print(json.dumps({"out": str(args.out), **{k: report.get(k) for k in keys}}, separators=(",", ":")))
    return 0
