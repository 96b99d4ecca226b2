"""The whole demo pipeline as a Ray job: `raysys.experiments.pipeline.run_pipeline(cfg, out)`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/pipeline.py --config configs/demo.yaml --out /mnt/shared/raysys/demo

Writes OUT/data (the dataset) and OUT/summary.json, the same file `raysys demo` writes, and
prints the summary as its last line (JSON). OUT may be a shared path or an s3:// / gs:// URI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raysys import config

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def run(args: argparse.Namespace) -> dict | None:
    from raysys.experiments.pipeline import PipelineConfig, run_pipeline  # lazy: keeps --help instant

    cfg = config.load(PipelineConfig, args.config, args.overrides)
    if args.dry_run:
        return _common.dry_run(cfg)
    return _common.on_cluster(args, lambda out: run_pipeline(cfg, out))


def build_parser() -> argparse.ArgumentParser:
    return _common.parser(
        "jobs/pipeline.py",
        "Run the whole pipeline (world → retrieval → phrases → pretrain → zeroshot → report, as far as this "
        "raysys has stages) on the Ray cluster this job is attached to.",
        out_help="run directory or URI: dataset in OUT/data, OUT/summary.json",
    )


if __name__ == "__main__":
    sys.exit(_common.main(run, build_parser().parse_args()))
