"""Real images -> regions as a Ray job: `raysys.data.featurize.featurize` writes OUT/data/images/.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/featurize.py --config configs/featurize.yaml \
            --images /mnt/shared/photos --out /mnt/shared/raysys/photos max_regions=36

A Ray Data pipeline (read -> decode -> detect -> region features -> Parquet shards) configured by
the `featurize:` section of the config, or its top level (raysys.data.featurize.FeaturizeConfig:
backend, max_regions, min_score, ...; overrides are relative to that section, as for `raysys
featurize`). The photos must be readable from every node (a shared mount). Restartable: finished
shards are skipped. Add texts with `raysys import texts ... --out OUT/data` before jobs/retrieve.py.
Records the featurize report under "featurize" in OUT/summary.json and prints it as its last line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raysys import config

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def run(args: argparse.Namespace) -> dict | None:
    from raysys.data.featurize import FeaturizeConfig, featurize  # lazy: keeps --help instant
    from raysys.experiments.rundir import record  # lazy: pyarrow; keeps --help instant

    cfg = config.load_section(FeaturizeConfig, args.config, args.overrides, "featurize")
    if args.dry_run:
        return _common.dry_run(cfg)

    def body(out: Path) -> dict:
        report = featurize(cfg, args.images, out / "data")
        record(out, "featurize", report)
        return report

    return _common.on_cluster(args, body)


def build_parser() -> argparse.ArgumentParser:
    p = _common.parser(
        "jobs/featurize.py",
        "Detect regions and pool region features for a folder of photos (Ray Data), writing the "
        "images table of the data contract, on the Ray cluster this job is attached to.",
        out_help="run directory or URI: the dataset is written to OUT/data",
    )
    p.add_argument(
        "--images",
        required=True,
        metavar="DIR_OR_GLOB",
        help="photos to featurize (a folder or a glob; reachable from every node)",
    )
    return p


if __name__ == "__main__":
    sys.exit(_common.main(run, build_parser().parse_args()))
