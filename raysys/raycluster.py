"""Attaching to Ray: one module for every stage, the CLI, the jobs and the benches.

`ensure_ray` (the stages, the CLI, the benches): `RAY_ADDRESS` set (a cluster, or a `ray job
submit` driver) → attach to it; Ray already initialised in this process → reuse it; otherwise
start a small local Ray with no dashboard (keep it off any interface) in a per-user temp dir
(`RAYSYS_RAY_TMP` overrides), so two users or two test runs on one machine do not share `/tmp/ray`.

`connect_ray` (the `jobs/` entrypoints' `--address`): the same, plus a cluster that `ray start`
recorded on this node; a job attaches first, and the stages' `ensure_ray` then reuses it.
"""

from __future__ import annotations

import getpass
import logging
import os
import sys
import tempfile
from pathlib import Path

from raysys import progress


def ensure_ray(num_cpus: int | None = None, *, log_to_driver: bool = False, object_store_mb: int = 512) -> bool:
    """Returns True when this call started Ray (the caller then shuts it down).

    `log_to_driver`: stream workers' stdout/stderr here (training progress wants it; Ray Data's
    actor pools are noisy without it off)."""
    import ray  # lazy: ~2 s; importers that never start Ray (featurize --no-ray, dry runs) skip it

    if ray.is_initialized():
        return False
    progress.configure_ray()  # progress bars and Ray's log format follow raysys's rule (raysys.progress)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=log_to_driver, logging_format=progress.LOG_FORMAT)
        progress.after_ray_init(_verbose())
        return True
    ray.init(
        logging_format=progress.LOG_FORMAT,
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        log_to_driver=log_to_driver,
        object_store_memory=object_store_mb * 2**20,
        _temp_dir=os.environ.get("RAYSYS_RAY_TMP", f"/tmp/raysys-{getpass.getuser()}"),
    )
    progress.after_ray_init(_verbose())
    return True


def _verbose() -> bool:
    """`-v` (the root logger at DEBUG) keeps every line Ray streams from its workers."""
    return logging.getLogger().getEffectiveLevel() <= logging.DEBUG


def _bootstrap_address() -> str | None:
    """The address a `ray start --head` on this node recorded (Ray's own lookup file).

    Read directly instead of `ray.init(address="auto")`: "auto" also attaches to ANY Ray
    process it finds on the machine (e.g. someone's pytest session), which is never what a job
    wants.
    """
    base = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    f = Path(base or "/tmp") / "ray" / "ray_current_cluster"
    try:
        text = f.read_text().strip()
    except OSError:
        return None
    return text or None


def connect_ray(address: str | None = None) -> str:
    """Attach to the Ray cluster a job belongs to, or start a local one; returns a description.

    `address`: None / "" / "auto" = RAY_ADDRESS, else a cluster started by `ray start` on this
    node, else a new local one; "local" = always a new private local Ray; else HOST:PORT.
    Inside `ray job submit` the job supervisor sets RAY_ADDRESS, so the driver joins the cluster
    that runs the job. A local fallback gets its own short temp dir (socket paths must stay
    < 107 chars) so it never overwrites the node's `ray_current_cluster` record.
    """
    import ray  # lazy: ~2 s; see ensure_ray

    if ray.is_initialized():
        return "already connected"
    progress.configure_ray()
    where = _connect(address)
    progress.after_ray_init(_verbose())
    return where


def _connect(address: str | None) -> str:
    import ray  # lazy: ~2 s; see ensure_ray

    if address in (None, "", "auto"):
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address="auto", logging_format=progress.LOG_FORMAT)  # "auto" reads RAY_ADDRESS first
            return f"cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']}"
        boot = _bootstrap_address()
        if boot:
            ray.init(address=boot, logging_format=progress.LOG_FORMAT)
            return f"cluster at {boot} (started by `ray start` on this node)"
        address = "local"
    if address == "local":
        tmp = os.environ.get("RAYSYS_RAY_TMP") or tempfile.mkdtemp(prefix="rsj-", dir="/tmp")
        ray.init(include_dashboard=False, _temp_dir=tmp, logging_format=progress.LOG_FORMAT)
        return f"new local Ray (temp dir {tmp})"
    ray.init(address=address, logging_format=progress.LOG_FORMAT)
    return f"cluster at {address}"
