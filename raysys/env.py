"""The process environment every raysys entry point runs with, defined once.

The CLI, the `jobs/` entrypoints and the test suite apply it; the Makefile runs only those, so it
needs no copy. The runtime-env YAMLs under `jobs/` carry the same variables for Ray's workers on a
cluster (YAML cannot import Python): `tests/test_cluster_files.py` checks they agree with this dict.
Values are defaults: a variable the caller already set wins.
"""

from __future__ import annotations

import os

#: Models come from installed packages only (DESIGN §4), logs stay quiet and greppable, and a local
#: cluster keeps every socket on 127.0.0.1.
OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}

#: The subset a cluster's runtime env must carry (the rest are local-process tuning).
CLUSTER_ENV_KEYS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MLFLOW_DISABLE_TELEMETRY",
                    "RAY_DATA_DISABLE_PROGRESS_BARS", "TOKENIZERS_PARALLELISM", "RAY_TRAIN_ENABLE_PRINT_PATCH")  # fmt: skip


def apply_offline_env() -> None:
    """Set every variable of `OFFLINE_ENV` the caller has not set."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
