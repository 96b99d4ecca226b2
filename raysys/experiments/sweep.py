"""Ray Tune ablation sweeps: the paper's ablations as one command, one MLflow run per trial.

Shape of a sweep (`configs/demo_sweep.yaml`):

1. The data stages (world or an existing dataset → retrieval at K = max of the K axis and the base
   `pretrain.k` → phrases) run **once**, before any trial; a K sweep filters `rank < K` of that one
   retrieval. A trial's k above what retrieval keeps (an explicit `pipeline.retrieval.k`, or the
   existing dataset's stored retrieval) is a config error.
2. The trials are the union of the ablation axes (`mode: axes`, one factor at a time around the
   base config, like the paper's tables) or their cartesian product (`mode: grid`), times the
   seeds. A configuration that several axes share (in `mode: axes`, the base config is the default
   value of every axis) is trained once: its *twins* are logged after the sweep as runs of their own
   axis that copy its params, metrics and items (tag `raysys.same_as`), so each table of the report
   is complete by itself and no seed of it is trained twice.
3. Each trial is a Tune *function* trial that builds the pre-training `TorchTrainer` (Train V2
   pattern: `TuneReportCallback` in the trainer's `RunConfig`), pre-trains, then fine-tunes the
   checkpoint on the dataset's downstream suite (`raysys.evaluate.suite`: the same `SuiteConfig`
   budget and the same evaluation items for every trial) and reports `ft.meta_average` (the trial
   metric: the paper ranks recipes by fine-tuned scores), `ft.<task>.<metric>` and, for recipes
   that train the ITM head, the zero-shot retrieval metrics `zeroshot.*` (others: the tag
   `zeroshot.skipped_reason`, their ITM head is untrained so they would score at chance). Each
   eval item's score is logged as the trial's `suite_items.json` artifact, from which `raysys
   report` bootstraps differences. `metric: zeroshot.t2i_r5` with `finetune: false` is the old,
   zero-shot-only sweep.
4. `MLflowLoggerCallback` (subclassed to tag each run with its ablation axis, variant and seed, to
   nest it under the sweep's parent run, and to record the checkpoint) logs every trial.
5. Re-running the same command resumes: `Tuner.restore` continues unfinished trials and never
   re-runs finished ones.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ray
from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.integration.ray_train import TuneReportCallback

from raysys import config as rconfig
from raysys import tracking
from raysys.config import ConfigError
from raysys.contract import MANIFEST, read_manifest
from raysys.evaluate.suite import SuiteConfig, downstream, items_doc, run_suite
from raysys.evaluate.zeroshot import ZeroShotConfig, evaluate_zeroshot
from raysys.experiments.pipeline import PipelineConfig, check_k, run_pipeline
from raysys.pretrain.config import TrainConfig
from raysys.pretrain.ray_train import data_cpus_that_fit, ensure_ray, fit
from raysys.pretrain.recipes import resolve

log = logging.getLogger(__name__)

# axis name -> how one value of it becomes pre-training overrides
AXES = {
    "K": lambda v: {"k": int(v)},
    "m": lambda v: {"m": int(v)},
    "granularities": lambda v: {"recipe": "muvla", "granularities": list(v)},
    "w_itm": lambda v: {"w_itm": bool(v)},
    "recipe": lambda v: {"recipe": str(v)},
    "paired_ratio": lambda v: {"recipe": "paired_ratio", "paired_ratio": float(v)},
    "mixing": lambda v: {"recipe": "muvla", "mixing": str(v)},  # Table 5: round-robin vs joint batches
}
GRAN_NAMES = {"rt": "R-T", "rp": "R-P", "is": "I-S"}


def variant_name(axis: str, value: Any) -> str:
    if axis == "granularities":
        return "+".join(GRAN_NAMES.get(g, g) for g in value)
    if axis == "w_itm":
        return "with w_ITM" if value else "without w_ITM"
    return str(value)


@dataclass
class SweepConfig:
    """A sweep: the data it runs on, the base pre-training config, the axes and the scheduling."""

    name: str = "sweep"
    experiment: str = ""  # MLflow experiment ("" = name)
    tracking_uri: str = ""  # MLFLOW_TRACKING_URI wins; "" = sqlite:///<out>/mlflow.db
    mode: Literal["axes", "grid"] = "axes"  # axes: one factor at a time (paper tables) | grid: cartesian product
    axes: dict[str, list[Any]] = field(default_factory=lambda: {"K": [1, 5, 10], "m": [0, 1]})
    seeds: list[int] = field(default_factory=lambda: [0])
    search: Literal["grid", "random"] = "grid"  # grid | random (random: `num_samples` trials drawn from the trial list)
    num_samples: int = 0
    scheduler: Literal["none", "asha"] = "none"  # none | asha (early-stops trials on the training loss)
    asha_grace_period: int = 2  # reports before ASHA may stop a trial
    metric: str = "ft.meta_average"  # what `best` means: ft.<…> (fine-tuned suite) or zeroshot.<…> (bare t2i_r5 = zeroshot.t2i_r5)
    finetune: bool = True  # run the downstream suite on every trial (its budget: `suite`)
    zeroshot_metrics: bool = True  # zero-shot ITM retrieval too, for recipes that train the ITM head
    max_concurrent_trials: int = 0  # 0 = derived from the cluster's CPUs/GPUs and the trial's workers
    data: str = ""  # an existing dataset dir; "" = build the demo world from `pipeline.world`
    pipeline: dict[str, Any] = field(default_factory=dict)  # PipelineConfig sections for the data stages
    pretrain: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields shared by all trials
    zeroshot: dict[str, Any] = field(default_factory=dict)  # ZeroShotConfig fields
    suite: dict[str, Any] = field(default_factory=dict)  # SuiteConfig fields: the one fine-tuning budget of every trial

    def __post_init__(self) -> None:
        check_sweep_k(self)
        if metric_key(self).startswith("ft.") and not self.finetune:
            raise ConfigError(f"metric: {self.metric!r} needs finetune=true (or pick a zeroshot.* metric)")
        if metric_key(self).startswith("zeroshot.") and not self.zeroshot_metrics:
            raise ConfigError(f"metric: {self.metric!r} needs zeroshot_metrics=true")


def metric_key(cfg: SweepConfig) -> str:
    """The trial metric's name as trials report it: a bare zero-shot name (`t2i_r5`, what sweeps
    used before the suite) means `zeroshot.t2i_r5`."""
    m = cfg.metric
    return m if m.startswith(("ft.", "zeroshot.")) or m in ("final_loss", "pretrain_steps") else f"zeroshot.{m}"


def trains_itm(tcfg: TrainConfig) -> str:
    """"" when the recipe trains the ITM head (zero-shot ITM retrieval measures it), else why not."""
    recipe = resolve(tcfg)
    if not recipe.update:
        return f"recipe {recipe.name} does not pre-train (its ITM head is untrained)"
    if "is" not in recipe.granularities:
        return f"recipe {recipe.name} ({'+'.join(recipe.granularities)}) does not train the ITM head (no I-S)"
    return ""


def trial_specs(cfg: SweepConfig) -> list[dict[str, Any]]:
    """The list of trials: axis, variant, seed and the pre-training overrides of each."""
    unknown = set(cfg.axes) - set(AXES)
    if unknown:
        raise ConfigError(f"axes: unknown axis {sorted(unknown)}; known: {sorted(AXES)}")
    specs: list[dict[str, Any]] = []
    if cfg.mode == "axes":
        for axis, values in cfg.axes.items():
            for v, seed in itertools.product(values, cfg.seeds):
                specs.append({"axis": axis, "variant": variant_name(axis, v), "seed": seed,
                              "overrides": {**AXES[axis](v), "seed": seed}})  # fmt: skip
    elif cfg.mode == "grid":
        names = list(cfg.axes)
        for combo in itertools.product(*(cfg.axes[n] for n in names)):
            for seed in cfg.seeds:
                ov: dict[str, Any] = {"seed": seed}
                for n, v in zip(names, combo):
                    ov.update(AXES[n](v))
                specs.append({"axis": "grid", "variant": ", ".join(f"{n}={variant_name(n, v)}" for n, v in zip(names, combo)),
                              "seed": seed, "overrides": ov})  # fmt: skip
    else:
        raise ConfigError(f"mode: {cfg.mode!r} is not one of ['axes', 'grid']")
    if cfg.search == "random" and cfg.num_samples and cfg.num_samples < len(specs):
        specs = random.Random(0).sample(specs, cfg.num_samples)
    elif cfg.search not in ("grid", "random"):
        raise ConfigError(f"search: {cfg.search!r} is not one of ['grid', 'random']")
    for i, s in enumerate(specs):
        s["id"] = f"{i:03d}-{s['axis']}-{s['variant']}-s{s['seed']}".replace(" ", "_").replace("/", "_")
    return specs


def twins(cfg: SweepConfig, specs: list[dict[str, Any]]) -> dict[str, str]:
    """Trial id → id of the first trial whose resolved pre-training config is the same.

    Why resolved configs: `{recipe: muvla, granularities: [rt, rp, is]}` and `{w_itm: true}` name
    the base config in two ways. Training both would spend a trial on a result the seed already
    fixes (the same config and seed give the same output), 8 of the demo ablation's 46."""
    first: dict[str, str] = {}
    out: dict[str, str] = {}
    for s in specs:
        resolved = rconfig.to_dict(rconfig.from_dict(TrainConfig, {**cfg.pretrain, **s["overrides"]}))
        key = json.dumps(resolved, sort_keys=True, default=str)
        if key in first:
            out[s["id"]] = first[key]
        else:
            first[key] = s["id"]
    return out


def trial_ks(cfg: SweepConfig) -> list[tuple[str, int]]:
    """The k values the trials pre-train with, each with the key that sets it."""
    return [("pretrain.k", int(cfg.pretrain.get("k", 5))), *(("axes.K", int(v)) for v in cfg.axes.get("K", []))]


def max_k(cfg: SweepConfig) -> int:
    """What the sweep's own retrieval keeps: every trial's k."""
    return max(k for _, k in trial_ks(cfg))


def retrieved_k(cfg: SweepConfig) -> tuple[str, int] | None:
    """What retrieval keeps when the sweep does not decide it: an explicit `pipeline.retrieval.k`
    (the sweep's own retrieval), or the stored retrieval of the existing dataset `data` (its
    manifest's last `retrieval` record, when there is one to read); else None."""
    if cfg.data:
        prov = [p for p in read_manifest(cfg.data).get("provenance", []) if p.get("stage") == "retrieval"]
        key, k = f"{Path(cfg.data) / MANIFEST} retrieval k_stored", prov[-1].get("k_stored") if prov else None
    else:
        retrieval = cfg.pipeline.get("retrieval")
        key, k = "pipeline.retrieval.k", retrieval.get("k") if isinstance(retrieval, dict) else None
    return (key, k) if isinstance(k, int) and not isinstance(k, bool) else None


def check_sweep_k(cfg: SweepConfig) -> None:
    """Every trial's k (the base `pretrain.k`, the K axis) within what retrieval keeps."""
    kept = retrieved_k(cfg)
    try:
        ks = trial_ks(cfg)
    except (TypeError, ValueError):  # a k that is no integer: the typed TrainConfig check names it
        return
    if kept is not None:
        for key, k in ks:
            check_k(key, k, *kept)


def data_config(cfg: SweepConfig) -> PipelineConfig:
    """The pipeline config of the sweep's own data stages: `pipeline`, retrieving at `max_k`. Its
    `pretrain` section is not what the trials train with (that is the sweep's `pretrain`), so its
    k follows the retrieval's and `PipelineConfig`'s K check holds whatever the trials' k."""
    k = max_k(cfg)
    pdata = rconfig.apply_overrides(dict(cfg.pipeline), [f"retrieval.k={k}"])
    return rconfig.from_dict(PipelineConfig, {**pdata, "pretrain": {**(pdata.get("pretrain") or {}), "k": k}})


def dry_run(cfg: SweepConfig) -> str:
    """`--dry-run` of `raysys sweep` and `jobs/sweep.py`: the resolved config, then the trial list."""
    specs = trial_specs(cfg)
    same = twins(cfg, specs)
    return rconfig.dump(cfg) + "".join(
        f"# trial {s['id']}: {s['overrides']}" + (f" (same as {same[s['id']]}: logged, not trained)" if s["id"] in same else "")
        + "\n" for s in specs)  # fmt: skip


def concurrency(cfg: SweepConfig, train_cfg) -> int:
    """Trials that fit the cluster at once: each holds `workers` Ray Train workers."""
    if cfg.max_concurrent_trials:
        return cfg.max_concurrent_trials
    res = ray.cluster_resources()
    if train_cfg.use_gpu and res.get("GPU", 0) > 0:
        return max(1, int(res["GPU"] // train_cfg.workers))
    return max(1, int(res.get("CPU", 1) // (train_cfg.workers * train_cfg.cpus_per_worker)))


def shared_data_cpus(cpus: float, trials: int, train_cfg) -> float:
    """The streamed input's `data_cpus` when `trials` trials run at once on `cpus` CPUs."""
    return data_cpus_that_fit(cpus, train_cfg, trials) if train_cfg.input == "stream" else train_cfg.data_cpus


def _numbers(d: dict[str, Any], prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def trial_metrics(tcfg: TrainConfig, checkpoint: str, data: str, config: dict[str, Any]) -> dict[str, Any]:
    """What a trial reports after pre-training: the suite's `ft.*` (same budget, same items for
    every trial), its per-item scores as JSON text (`suite_items`: the driver's MLflow callback logs
    them as an artifact, so no file has to cross nodes) and `zeroshot.*` or why it was skipped."""
    out: dict[str, Any] = {}
    if config.get("finetune", True):
        scfg = rconfig.from_dict(SuiteConfig, {**config["suite"], "mlflow": False})
        ft = run_suite(checkpoint, data, scfg)
        out.update(_numbers(ft["metrics"], "ft."))
        out["ft.meta_average"] = float(ft["meta_average"] if ft["meta_average"] is not None else math.nan)
        out["suite_items"] = json.dumps(items_doc(ft))
    reason = trains_itm(tcfg) if config.get("zeroshot_metrics", True) else "zeroshot_metrics=false"
    if reason:
        out["zeroshot_skipped_reason"] = reason
    else:
        zcfg = rconfig.from_dict(ZeroShotConfig, {**config["zeroshot"], "mlflow": False, "ray": "never"})
        out.update(_numbers(evaluate_zeroshot(checkpoint, data, zcfg), "zeroshot."))
    return out


def _trial(config: dict[str, Any]) -> None:
    """One Tune trial: pre-train on Ray Train (reporting through to Tune), then the suite and zero-shot."""
    spec = config["trial"]
    tcfg = rconfig.from_dict(TrainConfig, {**config["pretrain"], **spec["overrides"], "tracking_uri": "none"})
    result = fit(tcfg, config["data"], spec["id"], config["storage"], callbacks=[TuneReportCallback()])
    metrics = trial_metrics(tcfg, result["checkpoint"], config["data"], config)
    metrics.update({"final_loss": float(result["final_loss"] or math.nan), "pretrain_steps": float(result["steps"] or 0)})
    tune.report({**metrics, "checkpoint_uri": result["checkpoint"], "done_eval": 1.0})


def _mlflow_callback(uri: str, experiment: str, parent_run_id: str):
    class SweepMLflowCallback(MLflowLoggerCallback):
        """One run per trial, tagged with its ablation axis/variant/seed, nested under the sweep
        run, with the checkpoint recorded; on resume a trial's existing run is reused."""

        def log_trial_start(self, trial):
            spec = trial.config.get("trial", {})
            if trial not in self._trial_runs:
                existing = self.mlflow_util._mlflow.search_runs(
                    experiment_ids=[self.mlflow_util.experiment_id],
                    filter_string=f"tags.`raysys.trial` = '{spec.get('id')}'", output_format="list",
                )  # fmt: skip
                if existing:
                    self._trial_runs[trial] = existing[0].info.run_id
            self.tags = {**(self.tags or {}), "mlflow.parentRunId": parent_run_id, "raysys.trial": spec.get("id", ""),
                         "raysys.axis": spec.get("axis", ""), "raysys.variant": spec.get("variant", ""),
                         "raysys.seed": str(spec.get("seed", "")), "raysys.role": "trial"}  # fmt: skip
            super().log_trial_start(trial)

        def log_trial_result(self, iteration, trial, result):
            super().log_trial_result(iteration, trial, result)
            client = self.mlflow_util._mlflow.MlflowClient()
            run_id = self._trial_runs[trial]
            if "checkpoint_uri" in result:
                client.set_tag(run_id, "raysys.checkpoint", str(result["checkpoint_uri"]))
            if "zeroshot_skipped_reason" in result:  # zero-shot ITM is null for this recipe, and why
                client.set_tag(run_id, "zeroshot.skipped_reason", str(result["zeroshot_skipped_reason"]))
            if result.get("suite_items"):  # each eval item's score: what the report bootstraps
                with tempfile.TemporaryDirectory() as d:
                    (Path(d) / "suite_items.json").write_text(str(result["suite_items"]))
                    client.log_artifact(run_id, str(Path(d) / "suite_items.json"))

    return SweepMLflowCallback(tracking_uri=uri, experiment_name=experiment, save_artifact=False)


def _log_twins(uri: str, experiment: str, parent_id: str, out: Path, specs: list[dict[str, Any]],
               same: dict[str, str]) -> int:  # fmt: skip
    """Log each twin trial as a FINISHED run of its own axis that copies its source's params
    (other than `trial/*`), final metrics, tags and `suite_items.json`. A twin whose source has not
    finished is left for the re-run that finishes it; a twin already logged is not logged again.
    Returns how many twin runs exist."""
    if not same:
        return 0
    c = tracking.client(uri)
    exp_id = tracking.ensure_experiment(c, experiment)
    by_id = {s["id"]: s for s in specs}

    def finished(trial_id: str):
        q = f"tags.`raysys.trial` = '{trial_id}' and attributes.status = 'FINISHED'"
        runs = c.search_runs([exp_id], filter_string=q, max_results=1)
        return runs[0] if runs else None

    logged = 0
    for dup, src_id in same.items():
        src = finished(src_id)
        if finished(dup) is not None:
            logged += 1
            continue
        if src is None:
            continue
        spec = by_id[dup]
        own = {"raysys.trial": dup, "raysys.axis": spec["axis"], "raysys.variant": spec["variant"],
               "raysys.seed": str(spec["seed"]), "raysys.same_as": src_id, "mlflow.parentRunId": parent_id}  # fmt: skip
        tags = {k: v for k, v in src.data.tags.items() if not k.startswith("mlflow.") and k != tracking.LINK_TAG}
        run_id, _ = tracking.start_run(uri, experiment, run_name=dup, link=f"sweep-twin:{out}:{dup}",
                                       tags={**tags, **own})  # fmt: skip
        params = {k: v for k, v in src.data.params.items() if not k.startswith("trial/")}
        tracking.log_params(uri, run_id, {**params, **tracking.flatten_params(spec, "trial/", sep="/")})
        tracking.log_metrics(uri, run_id, dict(src.data.metrics))
        if any(a.path == "suite_items.json" for a in c.list_artifacts(src.info.run_id)):  # a zero-shot-only sweep logs none
            with tempfile.TemporaryDirectory() as d:
                c.log_artifact(run_id, c.download_artifacts(src.info.run_id, "suite_items.json", d))
        tracking.end_run(uri, run_id, "FINISHED")
        logged += 1
    return logged


def run_sweep(cfg: SweepConfig, out: str | os.PathLike) -> dict[str, Any]:
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    specs = trial_specs(cfg)
    experiment = cfg.experiment or cfg.name
    uri = tracking.resolve_tracking_uri(cfg.tracking_uri, out)  # MLFLOW_TRACKING_URI, the config's, OUT/mlflow.db
    if uri is None:
        raise ConfigError(f"tracking_uri: {cfg.tracking_uri!r}: a sweep records its trials in MLflow (`raysys report` "
                          "reads them); give a store or leave it empty for OUT/mlflow.db")  # fmt: skip
    base = rconfig.from_dict(TrainConfig, dict(cfg.pretrain))  # validates the shared config early
    same = twins(cfg, specs)  # also validates every trial's config
    if same:
        log.info("%d of %d trials share another's configuration and seed: trained once, logged per axis",
                 len(same), len(specs))  # fmt: skip
    rconfig.from_dict(SuiteConfig, dict(cfg.suite), "suite")
    started = ensure_ray()
    try:
        # 1. Data stages, once (each is restartable: a resumed sweep skips them).
        if cfg.data:
            data = Path(cfg.data).resolve()
            summary = {}
        else:
            summary = run_pipeline(data_config(cfg), out, stages=("world", "retrieval", "phrases"))
            data = out / "data"
        if cfg.finetune:
            downstream(data, cfg.suite.get("task_files"))  # a dataset without a suite fails here, not in every trial
        # 2. The sweep's parent MLflow run: config and retrieval diagnostics as artifacts.
        parent_id, _ = tracking.start_run(uri, experiment, run_name=cfg.name, link=f"sweep:{out}",
                                          params={"sweep.trials": len(specs), "sweep.mode": cfg.mode},
                                          tags={"raysys.role": "sweep"})  # fmt: skip
        rconfig_path = out / "sweep.yaml"
        rconfig_path.write_text(rconfig.dump(cfg))
        arts = [rconfig_path]
        diag = data / "diagnostics" / "retrieval.json"
        if diag.exists():
            arts.append(diag)
        tracking.log_artifacts(uri, parent_id, arts)
        # 3. Tune over function trials that each run a TorchTrainer.
        pretrain = dict(cfg.pretrain)
        n = concurrency(cfg, base)
        if not (base.use_gpu and ray.cluster_resources().get("GPU", 0) > 0):
            dc = shared_data_cpus(ray.cluster_resources().get("CPU", 0.0), n, base)
            if dc < base.data_cpus:
                log.info("%d trials at once: the streamed input's data_cpus %s -> %.2f", n, base.data_cpus, dc)
                pretrain["data_cpus"] = dc
        param_space = {
            "trial": tune.grid_search([s for s in specs if s["id"] not in same]),
            # Tune's MLflow callback logs the trial config as params: no password of a URI in them
            "pretrain": {**pretrain, **({"tracking_uri": tracking.redact(str(cfg.pretrain["tracking_uri"]))}
                                        if "tracking_uri" in cfg.pretrain else {})},
            "zeroshot": dict(cfg.zeroshot),
            "suite": rconfig.to_dict(rconfig.from_dict(SuiteConfig, dict(cfg.suite))),  # resolved: params record it
            "finetune": cfg.finetune,
            "zeroshot_metrics": cfg.zeroshot_metrics,
            "data": str(data),
            "storage": str(out / "train"),
        }
        trainable = tune.with_resources(_trial, tune.PlacementGroupFactory([{"CPU": 0, "memory": 64 * 2**20}]))
        scheduler = None
        if cfg.scheduler == "asha":
            scheduler = tune.schedulers.ASHAScheduler(metric="loss", mode="min", grace_period=cfg.asha_grace_period)
        elif cfg.scheduler != "none":
            raise ConfigError(f"scheduler: {cfg.scheduler!r} is not one of ['none', 'asha']")
        run_config = tune.RunConfig(name=cfg.name, storage_path=str(out / "tune"),
                                    callbacks=[_mlflow_callback(uri, experiment, parent_id)])  # fmt: skip
        path = str(out / "tune" / cfg.name)
        if tune.Tuner.can_restore(path):
            log.info("resuming sweep from %s", path)
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, param_space=param_space)
        else:
            tuner = tune.Tuner(trainable, param_space=param_space, run_config=run_config,
                               tune_config=tune.TuneConfig(scheduler=scheduler,
                                                           max_concurrent_trials=n))  # fmt: skip
        grid = tuner.fit()
        n_twins = _log_twins(uri, experiment, parent_id, out, specs, same)
        key = metric_key(cfg)
        rows = []
        for r in grid:
            m = r.metrics or {}
            spec = (r.config or {}).get("trial", {})
            rows.append({"id": spec.get("id"), "axis": spec.get("axis"), "variant": spec.get("variant"),
                         "seed": spec.get("seed"), key: m.get(key), "error": str(r.error) if r.error else None})  # fmt: skip
        row_of, spec_of = {r["id"]: r for r in rows}, {s["id"]: s for s in specs}
        for dup, src_id in same.items():
            spec, src = spec_of[dup], row_of.get(src_id, {})
            rows.append({"id": dup, "axis": spec["axis"], "variant": spec["variant"], "seed": spec["seed"],
                         key: src.get(key), "error": src.get("error"), "same_as": src_id})  # fmt: skip
        done = [r for r in rows if r[key] is not None and not (isinstance(r[key], float) and math.isnan(r[key]))]
        best = max(done, key=lambda r: r[key]) if done else None
        tracking.end_run(uri, parent_id, "FINISHED")
        result = {"experiment": experiment, "tracking_uri": tracking.redact(uri), "trials": len(rows),
                  "trained": len(rows) - len(same), "twins_logged": n_twins, "finished": len(done),
                  "errors": sum(r["error"] is not None for r in rows), "best": best, "out": str(out),
                  "data": str(data), "retrieval": summary.get("retrieval")}  # fmt: skip
        (out / "sweep_result.json").write_text(json.dumps({**result, "rows": rows}, indent=2, default=str))
        return result
    finally:
        if started:
            ray.shutdown()
