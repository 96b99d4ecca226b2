"""Glue shared by the `ray job submit` entrypoints in `jobs/`.

Every entrypoint is a thin wrapper: parse `--config PATH [--out DIR] [key=value ...]`, attach to
Ray, call ONE library function, print its result as the last line (JSON). Everything that does
work lives in `raysys/`; this file only holds what all entrypoints repeat, so that a change to how
jobs attach to a cluster or stage their output is made once.

Import-light on purpose (no ray, torch or raysys at import time): `python jobs/x.py --help` must be
instant and must work before the stage it wraps exists.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from raysys.env import apply_offline_env

log = logging.getLogger("raysys.jobs")



class JobError(RuntimeError):
    """A job cannot run as asked (missing stage, missing input): one line, exit status 2."""


def parser(prog: str, description: str, *, out_help: str) -> argparse.ArgumentParser:
    """The arguments every entrypoint shares; entrypoints add their own after this."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument(
        "--config", metavar="PATH", default=None, help="YAML config (yaml.safe_load; unknown keys are errors)"
    )
    p.add_argument("--out", metavar="DIR_OR_URI", required=True, help=out_help)
    p.add_argument(
        "--address",
        default=None,
        metavar="ADDR",
        help="Ray cluster to attach to: 'auto' (default: RAY_ADDRESS, else a cluster "
        "started by `ray start` on this node, else a new local one), 'local' "
        "(always a new private local Ray), or HOST:PORT",
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit (no Ray)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides by dotted path, e.g. world.images=500 seed=1",
    )
    return p


def setup(args: argparse.Namespace) -> None:
    apply_offline_env()
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _bootstrap_address() -> str | None:
    """The address a `ray start --head` on this node recorded (Ray's own lookup file).

    Read directly instead of `ray.init(address="auto")`: "auto" also attaches to ANY Ray
    process it finds on the machine (e.g. someone's pytest session), which is never what a job
    wants.
    """
    base = os.environ.get("RAY_TMPDIR") or (
        os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None
    )
    f = Path(base or "/tmp") / "ray" / "ray_current_cluster"
    try:
        text = f.read_text().strip()
    except OSError:
        return None
    return text or None


def connect_ray(address: str | None = None) -> str:
    """Attach to the Ray cluster this job belongs to, or start a local one; returns a description.

    Inside `ray job submit` the job supervisor sets RAY_ADDRESS, so the driver joins the cluster
    that runs the job. A local fallback gets its own short temp dir (socket paths must stay
    < 107 chars) so it never overwrites the node's `ray_current_cluster` record.
    """
    import ray

    if ray.is_initialized():
        return "already connected"
    if address in (None, "", "auto"):
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address="auto")  # "auto" reads RAY_ADDRESS first
            return f"cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']}"
        boot = _bootstrap_address()
        if boot:
            ray.init(address=boot)
            return f"cluster at {boot} (started by `ray start` on this node)"
        address = "local"
    if address == "local":
        tmp = os.environ.get("RAYSYS_RAY_TMP") or tempfile.mkdtemp(prefix="rsj-", dir="/tmp")
        ray.init(include_dashboard=False, _temp_dir=tmp)
        return f"new local Ray (temp dir {tmp})"
    ray.init(address=address)
    return f"cluster at {address}"


def is_uri(path: str) -> bool:
    return "://" in str(path)


@contextlib.contextmanager
def local_run_dir(out: str) -> Iterator[Path]:
    """A local directory standing for OUT, which may be a path or a URI (s3://, gs://, hdfs://, file://).

    A path is used as is (on a multi-node cluster it must be a shared mount, because Ray tasks on
    other nodes write into it). A URI goes through pyarrow's filesystems: its current contents
    are downloaded into a scratch directory first (so a re-run resumes from finished shards and a
    later stage sees earlier stages' outputs), and the scratch directory is uploaded back when the
    block exits, also when it fails, since partial output is what a resume needs. Credentials come
    from the environment (AWS_* / instance profile, GOOGLE_APPLICATION_CREDENTIALS / metadata
    server), never from a config.
    """
    if not is_uri(out):
        p = Path(out)
        p.mkdir(parents=True, exist_ok=True)
        yield p
        return
    import pyarrow.fs as pafs

    fs, remote = pafs.FileSystem.from_uri(out)
    root = os.environ.get("RAYSYS_SCRATCH") or tempfile.gettempdir()
    scratch = Path(
        tempfile.mkdtemp(prefix=f"raysys-{hashlib.sha1(out.encode()).hexdigest()[:10]}-", dir=root)
    )
    try:
        if fs.get_file_info(remote).type == pafs.FileType.Directory:
            log.info("downloading %s -> %s", out, scratch)
            pafs.copy_files(
                remote, str(scratch), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
            )
        try:
            yield scratch
        finally:
            _relocate_summary(scratch, out)
            log.info("uploading %s -> %s", scratch, out)
            fs.create_dir(remote, recursive=True)
            pafs.copy_files(
                str(scratch), remote, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _relocate_summary(scratch: Path, out: str) -> None:
    """Stages record paths in summary.json; make them name the URI, not the scratch copy."""
    p = scratch / "summary.json"
    if p.exists():
        p.write_text(p.read_text().replace(str(scratch), out.rstrip("/")))


def require(module: str, attr: str, what: str) -> Any:
    """`module.attr`, or a one-line JobError saying which part of raysys is missing."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name + ".")):
            raise JobError(
                f"{what} is not available in this raysys: module {module} does not exist yet"
            ) from None
        raise
    if not hasattr(mod, attr):
        raise JobError(f"{what} is not available in this raysys: {module} has no `{attr}`")
    return getattr(mod, attr)


def read_summary(out: Path) -> dict[str, Any]:
    p = out / "summary.json"
    return json.loads(p.read_text()) if p.exists() else {}


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    from raysys.contract import write_text_atomic

    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))


def pipeline_stages(names: list[str]) -> dict[str, Callable]:
    """The named stage functions of `raysys.experiments.pipeline.STAGES`, or a JobError naming the missing ones."""
    from raysys.experiments import pipeline

    stages = dict(pipeline.STAGES)
    missing = [n for n in names if n not in stages]
    if missing:
        raise JobError(f"stage(s) {missing} are not in raysys.experiments.pipeline.STAGES yet (it has {list(stages)})")
    return {n: stages[n] for n in names}


def run_stages(cfg: Any, out: Path, names: list[str]) -> dict[str, Any]:
    """Run some of `raysys.experiments.pipeline.STAGES` by name on `out/data`, like `run_pipeline` does.

    The summary is read from `out/summary.json` first and rewritten after every stage, so running
    the stage jobs one after another on the same OUT builds the same summary.json as
    `jobs/pipeline.py` (a later stage finds what an earlier one recorded, e.g. the checkpoint).
    """
    stages = pipeline_stages(names)
    if not (out / "data" / "manifest.json").exists():
        raise JobError(
            f"{out / 'data'}: no dataset here (manifest.json missing); "
            "run jobs/featurize.py or jobs/pipeline.py with this --out first"
        )
    summary = read_summary(out)
    for name in names:
        t0 = time.perf_counter()
        log.info("stage %s ...", name)
        stages[name](cfg, out, summary)
        summary.setdefault(name, {})["seconds"] = round(time.perf_counter() - t0, 2)
        write_summary(out, summary)
    return summary


def stage_job(args: argparse.Namespace, stages: list[str]) -> dict[str, Any] | None:
    """The body of every job that runs pipeline stages: pipeline config -> Ray -> `run_stages`."""
    from raysys import config
    from raysys.experiments.pipeline import PipelineConfig

    cfg = config.load(PipelineConfig, args.config, args.overrides)
    if args.dry_run:
        return dry_run(cfg)
    pipeline_stages(stages)  # fail before starting Ray or downloading anything
    log.info("ray: %s", connect_ray(args.address))
    with local_run_dir(args.out) as out:
        return run_stages(cfg, out, stages)


def section_config(cls: type, path: str | None, overrides: list[str], section: str) -> Any:
    """Load dataclass `cls` from the `section:` of a YAML file (or its top level when it has no
    such section), overrides relative to that section: the same rule as `raysys featurize
    --config`, so one file and one override list mean the same thing to the CLI and the job."""
    from raysys import config

    data = config.load_yaml(path)
    if isinstance(data.get(section), dict):
        data = data[section]
    return config.from_dict(cls, config.apply_overrides(data, overrides))


def main(fn: Callable[[argparse.Namespace], dict[str, Any] | None], args: argparse.Namespace) -> int:
    """Run an entrypoint body; expected failures become one line on stderr and exit status 2."""
    setup(args)
    from raysys.config import ConfigError
    from raysys.contract import ContractError

    prog = f"jobs/{Path(sys.argv[0]).name}"
    try:
        result = fn(args)
    except (JobError, ConfigError, ContractError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, default=str))
    return 0


def dry_run(cfg: Any) -> dict | None:
    from raysys import config

    print(config.dump(cfg), end="")
    return None
