"""Shared fixtures: one local Ray session for the whole test run, the shared data folder, and a
small demo world built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raysys.env import apply_offline_env

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RAYSYS_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"

apply_offline_env()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def ray_session():
    """One Ray session per test run (starting Ray costs seconds; tests must not each pay it)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=256 * 2**20,
            log_to_driver=False,
            _temp_dir=os.environ.get("RAYSYS_TEST_RAY_TMP", "/tmp/raysys-ray"),
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    """A 200-image demo world with 2048-d features, built once per run."""
    from raysys.data.world import WorldConfig, write_world

    out = tmp_path_factory.mktemp("world") / "data"
    write_world(WorldConfig(images=200, seed=7), out)
    return out


@pytest.fixture(autouse=True)
def _isolate_mlflow_tracking_uri():
    """`mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI; a test that sets it must not
    redirect the next test's runs (code resolves the env var before a checkpoint's own store)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    import sys

    if "mlflow" in sys.modules:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(before or "")
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
