"""MLflow helpers shared by every stage that records results (pre-training, evaluation, sweeps).

Why a module of its own: each stage needs the same four decisions, and they must agree so that one
MLflow UI shows the whole project —

- **where** runs go, one rule for every command (`resolve_tracking_uri`): `MLFLOW_TRACKING_URI`
  when set, else the config's `tracking_uri`, else `sqlite:///<storage or out>/mlflow.db` next to
  the stage's output (MLflow 3's `file:` store refuses to work without an opt-in, and a sqlite file
  travels with the run directory); `tracking_uri=none` switches tracking off. Artifacts of a
  sqlite store default to `<dir>/mlartifacts`, not MLflow's `./mlartifacts` of whatever the
  current directory happens to be;
- **what** a config becomes: flattened dotted keys (`world.images`), values as short strings;
- **which** run a re-run continues: a run is found again by a *link key* tag (e.g. the Ray Train
  storage path + run name), so a resumed or restarted job logs into the run it started instead
  of creating a second one;
- **how** metrics are written: buffered `log_batch` calls (one sqlite transaction per batch, not
  per value) so that per-step logging costs the training loop next to nothing.

Only the MLflow client API is used (`MlflowClient`), never the global "active run" state: a Ray
worker, a Tune trial and the driver may each hold a run at once without stepping on each other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from raysys import config as rconfig

log = logging.getLogger(__name__)

REDACTED = "***"  # what `redact` puts in place of a URI's password
LINK_TAG = "raysys.link"  # the tag a re-run uses to find its run again
MAX_PARAM_LEN = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_KEY_LEN = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
OFF = ("none", "off", "false", "disabled")
ENV_VAR = "MLFLOW_TRACKING_URI"


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def default_tracking_uri(base: str | os.PathLike) -> str:
    """`sqlite:///<abs base>/mlflow.db` (the directory is created)."""
    p = Path(base).expanduser().resolve()
    p.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{p / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None, base: str | os.PathLike | None, recorded: str | None = None) -> str | None:
    """The MLflow store of every raysys command, by one rule:

    1. `uri` is `none`/`off`: None, tracking is off (a switch, not a store: it beats the
       environment, so a sweep's trials and the benches stay out of the user's store);
    2. `MLFLOW_TRACKING_URI` when set (the variable MLflow itself reads, so `mlflow ui` and raysys
       agree without flags);
    3. `uri`, the config's `tracking_uri`;
    4. `recorded`, the store a checkpoint's pre-training run used (evaluations land beside it),
       unless its password was redacted (checkpoints never hold one);
    5. `sqlite:///<base>/mlflow.db`, `base` being the command's storage or `--out` directory (a
       remote `base` such as s3:// has no place for a sqlite file: the current directory then).
    """
    if uri and uri.strip().lower() in OFF:
        return None
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return env
    if uri:
        return uri
    if recorded and f":{REDACTED}@" in recorded:
        log.warning("the checkpoint's MLflow store %s was recorded without its password: using the default store; "
                    "set %s (or tracking_uri=) to log beside the pre-training run", recorded, ENV_VAR)  # fmt: skip
    elif recorded:
        return recorded
    if base is None or is_uri(base):
        base = Path.cwd()
    return default_tracking_uri(base)


def require_store(uri: str) -> str:
    """`uri` when it names an existing store. A reader (`raysys report`) must not conjure an empty
    store out of a typo: MLflow creates a missing sqlite file or file-store directory on first
    touch. Remote stores (http, databricks, …) are checked by MLflow itself."""
    path = sqlite_path(uri)
    if path is None and uri.startswith("file:"):
        path = Path(uri.removeprefix("file://").removeprefix("file:"))
    elif path is None and not is_uri(uri):
        path = Path(uri)
    if path is not None and not path.exists():
        raise rconfig.ConfigError(f"{redact(uri)}: no MLflow store there ({path} does not exist)")
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///…` store (`sqlite:////abs` and `sqlite:///rel` alike), else None."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    return None


def sqlite_dir(uri: str) -> Path | None:
    """The directory holding a `sqlite:///…` store's file (for its artifacts), else None."""
    path = sqlite_path(uri)
    return path.parent if path is not None else None


def describe(uri: str, run_id: str, experiment: str | None = None) -> str:
    """One line telling a user where a run is and how to look at it."""
    where = f"run {run_id}" + (f" in experiment '{experiment}'" if experiment else "")
    uri = redact(uri)
    return f"MLflow: {where} at {uri}  (view: mlflow ui --backend-store-uri {uri})"


# ---------------------------------------------------------------- params


def _param_value(v: Any) -> str:
    if isinstance(v, (list, tuple, dict)):
        s = json.dumps(v, default=str)
    elif v is None:
        s = "None"
    else:
        s = str(v)
    return s if len(s) <= MAX_PARAM_LEN else s[: MAX_PARAM_LEN - 3] + "..."


def flatten_params(d: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, str]:
    """Nested config dict → `{"a.b": "value"}` with MLflow-safe string values (lists as JSON,
    over-long values truncated, over-long keys cut). `sep="/"` gives the keys Tune's MLflow
    callback logs a trial config under."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten_params(v, key + sep, sep))
        else:
            out[key[:MAX_KEY_LEN]] = _param_value(v)
    return out


def config_params(cfg: Any, prefix: str = "") -> dict[str, str]:
    """A typed config (dataclass) or a dict, flattened for `log_params`."""
    d = rconfig.to_dict(cfg)
    return flatten_params(d, prefix)


# ---------------------------------------------------------------- runs


def client(uri: str):
    from mlflow.tracking import MlflowClient  # lazy: seconds to import; tracking_uri=none never pays

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(c, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id, creating it (with its artifact root) when missing; a deleted one is
    restored rather than failing on the name clash."""
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name, artifact_location=artifact_location)
        except Exception:  # created concurrently by another process: look it up again
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        c.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def find_run(c, experiment_id: str, link: str):
    """The most recent run of the experiment tagged with this link key, or None."""
    q = f"tags.`{LINK_TAG}` = '{link.replace(chr(39), chr(39) * 2)}'"
    runs = c.search_runs([experiment_id], filter_string=q, max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    link: str | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    reopen: bool = True,
) -> tuple[str, bool]:
    """Create a run, or reopen the run carrying the same `link` key. Returns (run_id, reopened).
    `reopen=False` always creates a new run (tagged with the link, so the *next* re-run finds it):
    for a caller that knows the work it tracks starts from scratch.

    Params of a reopened run are only added, never changed (MLflow forbids changing a param):
    keys that already hold another value are kept and the difference is logged as a warning.
    """
    from mlflow.entities import RunStatus  # lazy: see client()

    c = client(uri)
    root = sqlite_dir(uri)
    exp_id = ensure_experiment(c, experiment, (root / "mlartifacts").as_uri() if root else None)
    run = find_run(c, exp_id, link) if (link and reopen) else None
    all_tags = {**(tags or {}), **({LINK_TAG: link} if link else {})}
    if run is None:
        run = c.create_run(exp_id, run_name=run_name, tags=all_tags)
        run_id, reopened, existing = run.info.run_id, False, {}
    else:
        run_id, reopened, existing = run.info.run_id, True, dict(run.data.params)
        c.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        log_tags(uri, run_id, all_tags)
    if params:
        new = {k: v for k, v in flatten_params(params).items() if k not in existing}
        changed = {k for k, v in flatten_params(params).items() if k in existing and existing[k] != v}
        if changed:
            log.warning("MLflow run %s keeps its first value of changed params %s", run_id, sorted(changed))
        log_params(uri, run_id, new)
    return run_id, reopened


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param  # lazy: see client()

    c = client(uri)
    items = [Param(k, _param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        c.log_batch(run_id, params=items[i : i + PARAMS_PER_BATCH])


def log_tags(uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag  # lazy: see client()

    c = client(uri)
    items = [RunTag(k, str(v)) for k, v in tags.items()]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        c.log_batch(run_id, tags=items[i : i + PARAMS_PER_BATCH])


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    with MetricBuffer(uri, run_id) as buf:
        buf.add(metrics, step or 0)


def log_artifacts(uri: str, run_id: str, paths: Iterable[str | os.PathLike], artifact_path: str | None = None) -> None:
    c = client(uri)
    for p in paths:
        p = Path(p)
        if p.is_dir():
            c.log_artifacts(run_id, str(p), artifact_path)
        else:
            c.log_artifact(run_id, str(p), artifact_path)


# ---------------------------------------------------------------- provenance: source, data, curve, model


def redact(text: str) -> str:
    """A URI's password never reaches MLflow: `scheme://user:secret@host` → `scheme://user:***@host`."""
    return re.sub(r"(://[^/\s:@]+:)[^@/\s]+@", rf"\1{REDACTED}@", text)


def source_tags(argv: Iterable[str] | None = None) -> dict[str, str]:
    """Where a run came from: the git commit of the raysys checkout (when it is one), whether it
    had uncommitted changes, and the command line (passwords in URIs redacted)."""
    root = Path(__file__).resolve().parents[1]
    tags = {"mlflow.source.name": "raysys", "mlflow.source.type": "LOCAL",
            "raysys.command": redact(" ".join(argv if argv is not None else sys.argv))[:5000]}  # fmt: skip
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)  # fmt: skip
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
            tags["raysys.git.dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def log_dataset(uri: str, run_id: str, data: str | os.PathLike, context: str = "training") -> None:
    """The dataset directory as an MLflow dataset input, its digest the manifest's hash (the
    manifest records every stage's inputs and counts, so equal digests mean equal data)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag  # lazy: see client()

    root = Path(data).expanduser().resolve()
    manifest = root / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:36] if manifest.exists() else "none"
    ds = Dataset(name=root.name or str(root), digest=digest, source_type="local", source=json.dumps({"uri": str(root)}))
    client(uri).log_inputs(run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])])


def log_loss_curve(uri: str, run_id: str, keys: Iterable[str] = ("loss",), artifact: str = "loss_curve.png") -> bool:
    """The logged history of `keys` as one figure artifact; False when nothing was logged."""
    import matplotlib  # lazy: only a finished run draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = client(uri)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    drawn = False
    for k in keys:
        hist = sorted(c.get_metric_history(run_id, k), key=lambda m: m.step)
        if hist:
            ax.plot([m.step for m in hist], [m.value for m in hist], label=k)
            drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        c.log_figure(run_id, fig, artifact)
    plt.close(fig)
    return drawn


def log_model_files(uri: str, run_id: str, files: Iterable[str | os.PathLike], name: str = "model",
                    params: Mapping[str, Any] | None = None) -> str:  # fmt: skip
    """The documented equivalent of `mlflow.pytorch.log_model` for raysys checkpoints: an MLflow
    *logged model* (MLflow 3) linked to the run, holding the weights-only `model.pt` and its
    config. `mlflow.pytorch.log_model` would pickle the module, and loading that runs code; a
    raysys checkpoint loads with `weights_only=True` (`raysys.pretrain.model.load_checkpoint`).
    Returns the model id."""
    from mlflow.entities import LoggedModelOutput  # lazy: see client()

    c = client(uri)
    run = c.get_run(run_id)
    model = c.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id, model_type="raysys",
                                  params={k: _param_value(v) for k, v in (params or {}).items()})  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="raysys-model-") as tmp:
        for f in files:
            shutil.copy(f, Path(tmp) / Path(f).name)
        c.log_model_artifacts(model.model_id, tmp)
    c.finalize_logged_model(model.model_id, "READY")
    c.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return model.model_id


def start_pretrain_run(uri: str, experiment: str, name: str, params: Mapping[str, Any], data: str | os.PathLike,
                       tags: Mapping[str, str] | None = None) -> str:  # fmt: skip
    """A new pre-training run of `raysys pretrain --local`, recorded like a Ray Train one: the
    config as params (a tracking URI's password redacted), `raysys.stage=pretrain`, the source
    tags and the dataset as an input. Returns the run id."""
    params = dict(params)
    if "tracking_uri" in params:
        params["tracking_uri"] = redact(str(params["tracking_uri"]))
    run_id, _ = start_run(uri, experiment, run_name=name, params=params, reopen=False,
                          tags={"raysys.stage": "pretrain", "raysys.name": name, **source_tags(), **(tags or {})})  # fmt: skip
    log_dataset(uri, run_id, data)
    return run_id


def finish_pretrain_run(uri: str, run_id: str, history: Iterable[Mapping[str, Any]], summary: Mapping[str, Any],
                        files: Iterable[str | os.PathLike] = ()) -> None:  # fmt: skip
    """The local run's per-step components (step = the optimizer step), its summary numbers, the
    loss curve, the config and model files (as artifacts and as a logged model), then FINISHED."""
    with MetricBuffer(uri, run_id) as buf:
        for row in history:
            buf.add({k: v for k, v in row.items() if k != "step"}, int(row.get("step", 0)))
        buf.add({k: v for k, v in summary.items() if k in ("steps", "updates", "epochs", "final_loss",
                                                           "final_loss_mean10", "samples_per_s")}, 0)  # fmt: skip
    files = [Path(f) for f in files if Path(f).exists()]
    log_tags(uri, run_id, {"raysys.complete": "true", "raysys.steps": str(summary.get("steps"))})
    log_loss_curve(uri, run_id, ["loss"])
    if files:
        log_artifacts(uri, run_id, [f for f in files if f.suffix != ".pt"])
        log_model_files(uri, run_id, files, params={"recipe": summary.get("recipe", ""), "steps": summary.get("steps")})
    end_run(uri, run_id, "FINISHED")


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


class MetricBuffer:
    """Per-step metrics collected in memory and written with `log_batch` (≤ 1000 per call) when
    `flush()` is called or the buffer holds `max_items`. Non-finite values are skipped (MLflow
    stores them, but they break its charts); keys are cut to MLflow's limit."""

    def __init__(self, uri: str, run_id: str, max_items: int = 2000):
        self.uri, self.run_id, self.max_items = uri, run_id, max_items
        self._items: list[Any] = []
        self._client = None

    def add(self, metrics: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric  # lazy: see client()

        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            self._items.append(Metric(k[:MAX_KEY_LEN], float(v), ts, int(step)))
        if len(self._items) >= self.max_items:
            self.flush()

    def flush(self) -> None:
        if not self._items:
            return
        if self._client is None:
            self._client = client(self.uri)
        items, self._items = self._items, []
        for i in range(0, len(items), METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=items[i : i + METRICS_PER_BATCH])

    def __enter__(self) -> MetricBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()
