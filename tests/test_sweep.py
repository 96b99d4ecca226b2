"""Ray Tune ablation sweeps and the MLflow-backed report."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import mlflow
import pytest

from raysys import config
from raysys.cli import main
from raysys.config import ConfigError
from raysys.contract import update_manifest
from raysys.experiments.report import write_report
from raysys.experiments.sweep import (
    SweepConfig,
    data_config,
    metric_key,
    shared_data_cpus,
    trains_itm,
    trial_specs,
    twins,
)
from raysys.pretrain.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_trial_specs_axes_and_grid():
    cfg = config.load(SweepConfig, ROOT / "configs" / "demo_sweep.yaml")
    specs = trial_specs(cfg)
    axes = [s["axis"] for s in specs]
    assert len(specs) >= 6 and {"K", "m", "granularities"} <= set(axes)
    assert axes.count("granularities") >= 2
    assert len({s["id"] for s in specs}) == len(specs)
    k = [s for s in specs if s["axis"] == "K"]
    assert [s["overrides"]["k"] for s in k] == [1, 5, 10]
    grid = trial_specs(SweepConfig(mode="grid", axes={"K": [1, 5], "w_itm": [True, False]}, seeds=[0, 1]))
    assert len(grid) == 8 and {s["axis"] for s in grid} == {"grid"}
    pr = trial_specs(SweepConfig(axes={"paired_ratio": [0.0, 0.5]}))
    assert pr[1]["overrides"] == {"recipe": "paired_ratio", "paired_ratio": 0.5, "seed": 0}
    with pytest.raises(ConfigError, match="unknown axis"):
        trial_specs(SweepConfig(axes={"lr": [1]}))


def test_enum_fields_take_only_their_values():
    """Closed sets are `Literal` fields: a bad value is a one-line ConfigError listing the allowed ones."""
    for key, bad, allowed in [("mode", "cartesian", ["axes", "grid"]), ("search", "bayes", ["grid", "random"]),
                              ("scheduler", "pbt", ["none", "asha"])]:  # fmt: skip
        with pytest.raises(ConfigError) as e:
            config.load(SweepConfig, ROOT / "configs" / "demo_sweep.yaml", [f"{key}={bad}"])
        assert str(e.value) == f"{key}: {bad!r} is not one of {allowed}"
    assert config.load(SweepConfig, None, ["mode=grid", "search=random", "scheduler=asha"]).scheduler == "asha"


def test_sweep_k_above_what_retrieval_keeps_fails_at_config_time(tmp_path, capsys):
    """The sweep retrieves once, at the largest k its trials use; a trial's k above what retrieval
    keeps (an explicit pipeline.retrieval.k, an existing dataset's stored retrieval) stops the
    sweep when its config is loaded, under --dry-run too, with one line naming both keys."""
    sweep = ["sweep", "--config", str(ROOT / "configs" / "demo_sweep.yaml"), "--dry-run"]
    tail = ": pre-training can only use pairs that retrieval kept"
    assert main([*sweep, "pipeline.retrieval.k=5"]) == 2  # the K axis goes to 10
    assert capsys.readouterr().err.strip().splitlines() == [f"raysys: error: axes.K=10 exceeds pipeline.retrieval.k=5{tail}"]
    assert main([*sweep, "axes={m: [0, 1]}", "pretrain.k=8", "pipeline.retrieval.k=5"]) == 2
    assert capsys.readouterr().err.strip() == f"raysys: error: pretrain.k=8 exceeds pipeline.retrieval.k=5{tail}"
    data = tmp_path / "data"
    update_manifest(data, "retrieval", provenance={"k": 5, "k_stored": 5})
    assert main([*sweep, f"data={data}"]) == 2
    assert capsys.readouterr().err.strip() == f"raysys: error: axes.K=10 exceeds {data}/manifest.json retrieval k_stored=5{tail}"
    # the sweep's own retrieval (no explicit k) serves every trial: max of the K axis and pretrain.k
    assert main([*sweep, "pretrain.k=12"]) == 0 and "# trial 000-K-1-s0" in capsys.readouterr().out
    assert main([*sweep, "axes={K: [1, 5]}", f"data={data}"]) == 0
    # the sweep's own data stages retrieve at the trials' largest k, also below the pipeline's default k
    small = config.load(SweepConfig, None, ["axes={m: [0, 1]}", "pretrain.k=2"])
    assert data_config(small).retrieval.k == 2 and data_config(config.load(SweepConfig)).retrieval.k == 10


def _fake_sweep_store(uri: str) -> None:
    """A real MLflow store shaped like a sweep's: two K variants × two seeds, a paired-ratio axis."""
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("s")
    client.set_terminated(client.create_run(exp, tags={"raysys.role": "sweep"}).info.run_id)
    for axis, variant, seed, r5 in [("K", "1", 0, 10.0), ("K", "1", 1, 20.0), ("K", "5", 0, 30.0), ("K", "5", 1, 50.0),
                                    ("paired_ratio", "0.0", 0, 5.0), ("paired_ratio", "1.0", 0, 25.0)]:  # fmt: skip
        run = client.create_run(exp, tags={"raysys.axis": axis, "raysys.variant": variant, "raysys.seed": str(seed)})
        client.log_metric(run.info.run_id, "t2i_r5", r5)
        client.log_metric(run.info.run_id, "i2t_r5", r5 / 2)
        client.set_terminated(run.info.run_id)
    unfinished = client.create_run(exp, tags={"raysys.axis": "K", "raysys.variant": "10", "raysys.seed": "0"})
    client.log_metric(unfinished.info.run_id, "t2i_r5", 99.0)  # RUNNING: must not count


def test_report_tables_and_plots(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _fake_sweep_store(uri)
    res = write_report(uri, "s", tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert res["runs"] == 6 and set(res["axes"]) == {"K", "paired_ratio"}
    assert "| 1 | 2 | 15.0 ± 7.1 |" in md  # mean ± sample std of 10 and 20
    assert "| 5 | 2 | 40.0 ± 14.1 |" in md  # the best mean, but not bold: no per-item scores, no interval
    assert "| 0.0 | 1 | 5.0 |" in md  # one seed: no ±
    assert "**" not in md.split("## Directions")[0]
    assert "99.0" not in md
    assert sorted(res["plots"]) == ["K.png", "paired_ratio.png"]
    for p in res["plots"]:
        assert (tmp_path / "rep" / p).stat().st_size > 10_000


def _finished_trial_runs(uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("raysys.role") == "trial"
            and r.info.status == "FINISHED"]  # fmt: skip


def _finished_trials_readonly(db: Path) -> int:
    """Finished trial runs, read without MLflow: an `MlflowClient` on a store that the sweep is
    still creating would run the schema migrations concurrently with it and break them."""
    if not db.exists():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            return con.execute(
                "SELECT COUNT(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                "WHERE t.key = 'raysys.role' AND t.value = 'trial' AND r.status = 'FINISHED'"
            ).fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet, or locked by a writer
        return 0


@pytest.mark.slow
def test_sweep_interrupt_resume_and_mlflow(tmp_path):
    """Interrupt a 2-trial sweep after its first trial, re-run: only the second trial runs."""
    out = tmp_path / "sweep"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    args = [sys.executable, "-m", "raysys", "sweep", "--config", str(ROOT / "configs" / "demo_sweep.yaml"),
            "--out", str(out), "axes={K: [1, 5]}", "pipeline.world.images=120", "pretrain.steps=6",
            "finetune=false", "metric=t2i_r5",  # the zero-shot-only sweep of before the suite stays selectable
            "pretrain.steps_per_epoch=3", "zeroshot.max_images=10", "max_concurrent_trials=1"]  # fmt: skip
    env = {**os.environ, "RAYSYS_RAY_TMP": str(Path("/tmp") / f"rsw{os.getpid()}")}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + 900
    try:
        while time.time() < deadline and proc.poll() is None:
            if _finished_trials_readonly(out / "mlflow.db") >= 1:
                break
            time.sleep(2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the Ray cluster it started
        proc.wait()
    first = _finished_trial_runs(uri, "demo-sweep")
    assert len(first) == 1, "the first trial should have finished before the interrupt"
    done_id = first[0].data.tags["raysys.trial"]

    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["trials"] == 2 and result["experiment"] == "demo-sweep" and result["tracking_uri"] == uri
    runs = _finished_trial_runs(uri, "demo-sweep")
    ids = [x.data.tags["raysys.trial"] for x in runs]
    assert sorted(ids) == ["000-K-1-s0", "001-K-5-s0"]  # one finished run per trial: nothing re-ran
    assert next(x for x in runs if x.data.tags["raysys.trial"] == done_id).info.run_id == first[0].info.run_id
    for x in runs:  # complete MLflow data: params, final metrics, checkpoint link
        assert any(k.startswith("pretrain/") for k in x.data.params) and x.data.params["trial/axis"] == "K"
        assert {"zeroshot.t2i_r5", "zeroshot.i2t_r5", "zeroshot.itm_auc", "final_loss"} <= set(x.data.metrics)
        assert Path(x.data.tags["raysys.checkpoint"]).is_dir()
        assert x.data.tags["mlflow.parentRunId"]
    rep = subprocess.run([sys.executable, "-m", "raysys", "report", "--tracking-uri", uri, "--experiment", "demo-sweep",
                          "--out", str(tmp_path / "rep")], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert (tmp_path / "rep" / "report.md").exists() and (tmp_path / "rep" / "K.png").exists()


def test_concurrent_trials_leave_their_readers_cpus_that_exist():
    """Two streamed trials of one 1-CPU worker on 2 CPUs: nothing is left for their Ray Data
    actors, which must then reserve none (reserving 0.5 each hung the Flickr8k sweep)."""
    cfg = TrainConfig(workers=1, cpus_per_worker=1, data_cpus=0.5)
    assert shared_data_cpus(2, 2, cfg) == 0.0
    assert shared_data_cpus(2, 1, cfg) == 0.5  # one trial: a CPU free, the configured 0.5 fits
    assert shared_data_cpus(8, 2, TrainConfig(workers=2, cpus_per_worker=1, data_cpus=1.0)) == 1.0
    assert shared_data_cpus(5, 2, TrainConfig(workers=2, cpus_per_worker=1, data_cpus=1.0)) == 0.25
    assert shared_data_cpus(2, 2, TrainConfig(workers=1, cpus_per_worker=1, input="memory")) == TrainConfig().data_cpus


def test_trial_metric_config():
    """The fine-tuned metric is the default; the old zero-shot metric stays selectable; a metric the
    trials will not report is a config error."""
    assert metric_key(SweepConfig()) == "ft.meta_average"
    assert metric_key(SweepConfig(metric="t2i_r5", finetune=False)) == "zeroshot.t2i_r5"
    with pytest.raises(ConfigError, match="needs finetune=true"):
        config.load(SweepConfig, None, ["finetune=false"])
    with pytest.raises(ConfigError, match="needs zeroshot_metrics=true"):
        config.load(SweepConfig, None, ["metric=zeroshot.t2i_r5", "zeroshot_metrics=false"])
    assert trains_itm(TrainConfig(recipe="muvla")) == ""
    for recipe in ("base", "random_pairs", "round_robin", "paired_ratio", "rt+rp"):
        assert trains_itm(TrainConfig(recipe=recipe))  # a reason: their ITM head is untrained
    ablation = config.load(SweepConfig, ROOT / "configs" / "demo_ablation.yaml")
    specs = trial_specs(ablation)
    assert {s["axis"] for s in specs} == {"recipe", "granularities", "w_itm", "mixing", "paired_ratio", "K"}
    assert len(ablation.seeds) >= 2 and ablation.metric == "ft.meta_average"
    assert {s["variant"] for s in specs if s["axis"] == "recipe"} == {"base", "random_pairs", "round_robin", "muvla",
                                                                      "mvptr", "muvla+vsc", "codis", "unimo2"}  # fmt: skip
    assert {s["variant"] for s in specs if s["axis"] == "granularities"} == {"R-T", "R-P", "I-S", "R-T+R-P",
                                                                             "R-T+R-P+I-S"}  # fmt: skip
    # rows that name the base config another way are trained once per seed: μ-VLA's trial of that seed
    same = twins(ablation, specs)
    assert sorted(k.split("-", 1)[1] for k in same) == sorted(
        f"{row}-s{seed}" for row in ("granularities-R-T+R-P+I-S", "w_itm-with_w_ITM", "mixing-round_robin", "K-5")
        for seed in (0, 1))  # fmt: skip
    assert {v.split("-", 1)[1] for v in same.values()} == {"recipe-muvla-s0", "recipe-muvla-s1"}
    assert all(k[-2:] == v[-2:] for k, v in same.items())  # never across seeds


@pytest.mark.slow
def test_every_trial_fine_tunes_with_the_same_budget_on_the_same_items(tmp_path):
    """A 2-trial sweep: both trials log the same suite budget (params) and per-item scores on the
    same evaluation items (artifacts); `ft.*` for both, zero-shot only for the recipe that trains ITM.
    A third row, `K: 5`, is the base config again: it is logged as a copy of `muvla`'s trial, not
    trained a second time."""
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "raysys", "sweep", "--config", str(ROOT / "configs" / "demo_sweep.yaml"),
            "--out", str(out), "axes={recipe: [base, muvla], K: [5]}", "pipeline.world.images=100",
            "pipeline.world.eval_fraction=0.5", "pipeline.world.tasks_per_image=2", "pretrain.steps=3",
            "pretrain.steps_per_epoch=3", "pretrain.model_layers=1", "zeroshot.max_images=8", "suite.steps=2",
            "suite.batch_size=8", "suite.retrieval_eval_images=4", "max_concurrent_trials=1"]  # fmt: skip
    env = {**os.environ, "RAYSYS_RAY_TMP": str(Path("/tmp") / f"rsw{os.getpid()}")}
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["finished"] == 3 and result["trained"] == 2 and result["best"]["ft.meta_average"] is not None
    assert len(list((out / "tune" / "demo-sweep").glob("_trial_*"))) == 2  # Tune ran two trials
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    runs = {x.data.tags["raysys.variant"]: x for x in _finished_trial_runs(uri, "demo-sweep")}
    assert set(runs) == {"base", "muvla", "5"}
    twin, src = runs.pop("5"), runs["muvla"]
    assert twin.data.tags["raysys.same_as"] == "001-recipe-muvla-s0" and twin.data.tags["raysys.axis"] == "K"
    assert twin.data.params["trial/overrides/k"] == "5" and twin.data.params["suite/steps"] == "2"
    assert twin.data.metrics == src.data.metrics and twin.data.tags["raysys.checkpoint"] == src.data.tags["raysys.checkpoint"]
    assert twin.data.tags["mlflow.parentRunId"] == src.data.tags["mlflow.parentRunId"]
    twin_items = Path(client.download_artifacts(twin.info.run_id, "suite_items.json", str(tmp_path / "twin")))
    assert json.loads(twin_items.read_text())["items"]
    budgets = [{k: v for k, v in x.data.params.items() if k.startswith("suite/")} for x in runs.values()]
    assert budgets[0] and budgets[0] == budgets[1] and budgets[0]["suite/steps"] == "2"
    items = []
    for x in runs.values():
        assert {"ft.meta_average", "ft.vqa.vqa_accuracy", "ft.refcoco.accuracy", "ft.retrieval.r_mean"} <= set(x.data.metrics)
        doc = json.loads(Path(client.download_artifacts(x.info.run_id, "suite_items.json", str(tmp_path))).read_text())
        items.append({t: v["ids"] for t, v in doc["items"].items()})
    assert items[0] == items[1] and all(items[0].values())
    assert "zeroshot.t2i_r5" in runs["muvla"].data.metrics and "zeroshot.skipped_reason" not in runs["muvla"].data.tags
    assert "zeroshot.t2i_r5" not in runs["base"].data.metrics and "pre-train" in runs["base"].data.tags["zeroshot.skipped_reason"]
    res = write_report(uri, "demo-sweep", tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Δ Meta-Ave vs base" in md and "## Directions" in md and res["plots"] == ["recipe.png"]  # one K row: no plot
    assert "`K 5` is `recipe muvla`" in md
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)  # resume: nothing to do
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["twins_logged"] == 1
    assert len(_finished_trial_runs(uri, "demo-sweep")) == 3  # the twin is not logged twice
