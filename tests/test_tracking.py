"""MLflow records that reproduce (issue 19): the pre-training run keeps its own record while every
evaluation of its checkpoint becomes a new child run whose params match its metrics; one store
rule for every command (MLFLOW_TRACKING_URI, the config's, OUT/mlflow.db); `raysys report`
refuses an unknown experiment or a missing store in one line.

Real parts throughout: the CLI, a tiny BERT, a small world, a sqlite MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from _pretrain_fixtures import tiny_bert_folder, write_stand_in_pairs, write_stand_in_phrases

from raysys import tracking
from raysys.cli import main
from raysys.data.world import WorldConfig, write_world

STEPS = 3
FAST = ["batch_size=8", "log_every=0", "threads=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
    """A small world with its downstream suite, stand-in pairs and phrases, and a tiny BERT."""
    root = tmp_path_factory.mktemp("tracking")
    data = root / "data"
    write_world(WorldConfig(images=60, seed=3, feature_dim=64, eval_fraction=0.5, tasks_per_image=2, workers=1), data)
    write_stand_in_pairs(data)
    write_stand_in_phrases(data)
    return data, tiny_bert_folder(root / "bert", layers=1)


def _json(argv: list[str], capsys) -> dict:
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _pretrain_local(data: Path, bert: Path, out: Path, capsys, *extra: str) -> dict:
    return _json(["pretrain", "--local", "--data", str(data), "--steps", str(STEPS), "--out", str(out),
                  f"model_path={bert}", *FAST, *extra], capsys)  # fmt: skip


def _ve_files(data: Path) -> list[str]:
    from raysys.evaluate.suite import SuiteConfig, suite_runs

    (run,) = suite_runs(data, SuiteConfig(tasks=["ve"]))
    return ["--task", "ve", "--train", *run.train, "--eval", *run.eval, "--images", str(data), "--format", run.format]


def _zeroshot(ckpt: Path, data: Path, capsys, *extra: str) -> dict:
    return _json(["evaluate", "zeroshot", "--checkpoint", str(ckpt), "--data", str(data), "ray=never", "threads=1",
                  *extra], capsys)  # fmt: skip


def _check_pretrain_run(uri: str, run_id: str, steps: int) -> None:
    """What a pre-training run must hold after its checkpoint was evaluated any number of times."""
    c = tracking.client(uri)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["raysys.stage"] == "pretrain"  # evaluations never overwrite it
    assert run.data.params["steps"] == str(steps)
    assert sorted(m.step for m in c.get_metric_history(run_id, "loss")) == list(range(steps))
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40 and run.data.tags["raysys.git.dirty"] in ("true", "false")
    assert run.data.tags["raysys.command"]
    (ds,) = run.inputs.dataset_inputs
    assert json.loads(ds.dataset.source)["uri"].endswith("data") and ds.dataset.digest != "none"
    assert "loss_curve.png" in {a.path for a in c.list_artifacts(run_id)}
    (out,) = run.outputs.model_outputs
    model = c.get_logged_model(out.model_id)
    assert model.source_run_id == run_id and model.status == "READY"
    # no evaluation wrote into the parent
    assert not any(k.startswith(("zeroshot.", "finetune.", "ve.")) for k in (*run.data.metrics, *run.data.params))


def _children(uri: str, parent: str) -> dict[str, list]:
    """Child runs of `parent` by stage, oldest first (through `mlflow.search_runs`, as a user would)."""
    mlflow.set_tracking_uri(uri)
    df = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
                            order_by=["attributes.start_time ASC"])  # fmt: skip
    c = tracking.client(uri)
    out: dict[str, list] = {}
    for rid in df["run_id"]:
        run = c.get_run(rid)
        out.setdefault(run.data.tags["raysys.stage"], []).append(run)
    return out


def test_local_pretrain_then_evaluations_are_child_runs(world, tmp_path, capsys):
    data, bert = world
    out = tmp_path / "pre"
    pre = _pretrain_local(data, bert, out, capsys)
    uri = f"sqlite:///{out.resolve() / 'mlflow.db'}"  # the default store: OUT/mlflow.db
    assert pre["tracking_uri"] == uri and pre["steps"] == STEPS
    parent = pre["mlflow_run_id"]
    ckpt = out / "model.pt"

    z1 = _zeroshot(ckpt, data, capsys, "max_images=4")
    z2 = _zeroshot(ckpt, data, capsys, "max_images=6", "tie_policy=average")  # other settings: a new child
    ft = _json(["evaluate", "finetune", "--checkpoint", str(ckpt), *_ve_files(data), "steps=2", "ve.batch_size=8",
                "eval_batch_size=32", "threads=1", "log_every=0"], capsys)  # fmt: skip

    _check_pretrain_run(uri, parent, STEPS)
    kids = _children(uri, parent)
    assert [r.info.run_id for r in kids["zeroshot"]] == [z1["mlflow"]["run_id"], z2["mlflow"]["run_id"]]
    for run, z, n in zip(kids["zeroshot"], (z1, z2), (4, 6)):
        assert run.info.status == "FINISHED" and run.data.tags["raysys.parent_run_id"] == parent
        p, m = run.data.params, run.data.metrics
        assert p["zeroshot.max_images"] == str(n) and m["zeroshot.n_images"] == n == z["n_images"]
        assert p["zeroshot.tie_policy"] == z["tie_policy"]
        assert m["zeroshot.t2i_r5"] == pytest.approx(z["t2i_r5"]) and m["zeroshot.itm_auc"] == pytest.approx(z["itm_auc"])
        assert "zeroshot.tracking_uri" not in p
    (fr,) = kids["finetune"]
    task = ft["tasks"]["ve"]
    assert fr.info.run_id == task["mlflow"]["run_id"] and fr.data.tags["raysys.task"] == "ve"
    assert fr.data.params["steps_override"] == "2" and fr.data.params["checkpoint"] == str(ckpt)
    assert fr.data.metrics["accuracy"] == pytest.approx(task["score"])
    assert sorted(m.step for m in tracking.client(uri).get_metric_history(fr.info.run_id, "loss")) == [0, 1]
    # all in the pre-training run's experiment, so the MLflow UI nests them
    assert {r.info.experiment_id for rs in kids.values() for r in rs} == {tracking.client(uri).get_run(parent).info.experiment_id}


def test_mlflow_tracking_uri_wins_for_pretrain_and_evaluate(world, tmp_path, capsys, monkeypatch):
    data, bert = world
    env_uri = f"sqlite:///{tmp_path / 'env' / 'mlflow.db'}"
    (tmp_path / "env").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    out = tmp_path / "pre"
    cfg_uri = f"sqlite:///{tmp_path / 'cfg.db'}"
    pre = _pretrain_local(data, bert, out, capsys, f"tracking_uri={cfg_uri}")
    assert pre["tracking_uri"] == env_uri
    assert not (out / "mlflow.db").exists() and not (tmp_path / "cfg.db").exists()
    assert tracking.client(env_uri).get_run(pre["mlflow_run_id"]).data.tags["raysys.stage"] == "pretrain"
    # the run's params never hold a password
    assert tracking.client(env_uri).get_run(pre["mlflow_run_id"]).data.params["tracking_uri"] == cfg_uri
    z = _zeroshot(out / "model.pt", data, capsys, "max_images=3", f"tracking_uri={cfg_uri}")
    assert z["mlflow"]["tracking_uri"] == env_uri and z["mlflow"]["parent_run_id"] == pre["mlflow_run_id"]
    # tracking_uri=none is a switch, not a store: it beats the variable
    off = _pretrain_local(data, bert, tmp_path / "off", capsys, "tracking_uri=none")
    assert "mlflow_run_id" not in off and not (tmp_path / "off" / "mlflow.db").exists()


def test_the_one_rule(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = tmp_path / "out"
    assert tracking.resolve_tracking_uri("", base) == f"sqlite:///{base.resolve()}/mlflow.db"
    assert tracking.resolve_tracking_uri("sqlite:///x.db", base) == "sqlite:///x.db"
    assert tracking.resolve_tracking_uri("", base, recorded="sqlite:///rec.db") == "sqlite:///rec.db"
    assert tracking.resolve_tracking_uri("off", base) is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert tracking.resolve_tracking_uri("sqlite:///x.db", base, recorded="sqlite:///rec.db") == "sqlite:///env.db"
    assert tracking.resolve_tracking_uri("none", base) is None
    assert tracking.redact("postgresql://me:s3cret@db:5432/mlflow") == "postgresql://me:***@db:5432/mlflow"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # a checkpoint's store without its password cannot be used
    assert tracking.resolve_tracking_uri("", base, recorded="postgresql://me:***@db/mlflow") == f"sqlite:///{base.resolve()}/mlflow.db"


def test_a_password_in_the_configured_uri_is_redacted(world, tmp_path, monkeypatch):
    data, _ = world
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.default_tracking_uri(tmp_path)
    rid = tracking.start_pretrain_run(uri, "exp", "r", {"tracking_uri": "postgresql://me:s3cret@db/mlflow", "lr": 1}, data)
    run = tracking.client(uri).get_run(rid)
    assert run.data.params["tracking_uri"] == "postgresql://me:***@db/mlflow"
    assert "s3cret" not in json.dumps(run.data.tags)


def test_report_errors_are_one_line(world, tmp_path, capsys):
    data, bert = world
    missing = tmp_path / "nowhere" / "mlflow.db"
    rc = main(["report", "--tracking-uri", f"sqlite:///{missing}", "--experiment", "x", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "does not exist" in err and "Traceback" not in err
    assert not missing.exists() and not missing.parent.exists() and not (tmp_path / "r").exists()  # no store conjured

    uri = tracking.default_tracking_uri(tmp_path / "store")
    tracking.start_run(uri, "sweep-a", "r")
    tracking.start_run(uri, "sweep-b", "r")
    capsys.readouterr()  # the store's creation log, not the command's
    rc = main(["report", "--tracking-uri", uri, "--experiment", "sweep-c", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "'sweep-c'" in err and "'sweep-a'" in err and "'sweep-b'" in err
    rc = main(["report", "--tracking-uri", uri, "--experiment", "sweep-a", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "no finished trial runs" in err and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_ray_train_pretrain_then_evaluations_are_child_runs(world, ray_session, tmp_path, capsys):
    data, bert = world
    out = tmp_path / "out"
    pre = _json(["pretrain", "--data", str(data), "--name", "tracked", "--storage", str(tmp_path / "storage"),
                 "--workers", "2", "--steps", str(STEPS), "--out", str(out), f"model_path={bert}", "batch_size=8",
                 "log_every=1", "checkpoint_every=0"], capsys)  # fmt: skip
    uri = f"sqlite:///{out.resolve() / 'mlflow.db'}"
    assert pre["tracking_uri"] == uri and pre["steps"] == STEPS and pre["complete"]
    z = _zeroshot(out / "model.pt", data, capsys, "max_images=4")
    ft = _json(["evaluate", "finetune", "--checkpoint", str(out / "model.pt"), *_ve_files(data), "steps=2",
                "ve.batch_size=8", "eval_batch_size=32", "threads=1", "log_every=0"], capsys)  # fmt: skip
    _check_pretrain_run(uri, pre["mlflow_run_id"], STEPS)
    kids = _children(uri, pre["mlflow_run_id"])
    assert [r.info.run_id for r in kids["zeroshot"]] == [z["mlflow"]["run_id"]]
    assert [r.info.run_id for r in kids["finetune"]] == [ft["tasks"]["ve"]["mlflow"]["run_id"]]
    assert kids["zeroshot"][0].data.metrics["zeroshot.t2i_r5"] == pytest.approx(z["t2i_r5"])
