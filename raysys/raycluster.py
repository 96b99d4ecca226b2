"""Attaching to Ray: one rule for every stage, the CLI, the jobs and the benches.

`RAY_ADDRESS` set (a cluster, or a `ray job submit` driver) → attach to it; Ray already initialised
in this process → reuse it; otherwise start a small local Ray with no dashboard (keep it off any
interface) in a per-user temp dir (`RAYSYS_RAY_TMP` overrides), so two users or two test runs on
one machine do not share `/tmp/ray`.
"""

from __future__ import annotations

import os


def ensure_ray(num_cpus: int | None = None, *, log_to_driver: bool = False, object_store_mb: int = 512) -> bool:
    """Returns True when this call started Ray (the caller then shuts it down).

    `log_to_driver`: stream workers' stdout/stderr here (training progress wants it; Ray Data's
    actor pools are noisy without it off)."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=log_to_driver)
        return True
    import getpass

    ray.init(
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        log_to_driver=log_to_driver,
        object_store_memory=object_store_mb * 2**20,
        _temp_dir=os.environ.get("RAYSYS_RAY_TMP", f"/tmp/raysys-{getpass.getuser()}"),
    )
    return True
