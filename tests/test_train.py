"""Distributed pre-training on Ray Train: resume, failure recovery, checkpoints, MLflow, export.

A Train fit costs ~20 s of fixed overhead, so the module runs three, once, and every test reads
them (`runs`):
- `full`: one uninterrupted 2-worker run, through the pipeline's `pretrain` stage;
- `split`: the same config with `stop_after_epochs=1` and the failure drill (`fail_at_step=5`:
  rank 1 SIGKILLs its own process mid-epoch, after the step-4 checkpoint), run twice under one
  name: `fit()` recovers from the failure and stops after epoch 1; then `raysys pretrain` (the CLI)
  with the same --name/--storage resumes and finishes.
Tiny model (2-layer, 32-wide random BERT) and 16-d features: 12 steps per run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from _pretrain_fixtures import make_tiny_dataset, tiny_bert_folder

from raysys.pretrain.config import TrainConfig
from raysys.pretrain.loop import Plan

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12  # 2 epochs × 6


def tiny_config(bert: Path) -> TrainConfig:
    return TrainConfig(model_path=str(bert), batch_size=8, epochs=2, steps_per_epoch=6, checkpoint_every=4,
                       log_every=2, workers=2, experiment="test-train")  # fmt: skip


def cli_args(cfg: TrainConfig, data: Path, name: str, storage: Path) -> list[str]:
    keys = ("model_path", "batch_size", "epochs", "steps_per_epoch", "checkpoint_every", "log_every",
            "experiment", "stop_after_epochs", "fail_at_step")  # fmt: skip
    return ["pretrain", "--data", str(data), "--name", name, "--storage", str(storage), "--workers", "2",
            *[f"{k}={getattr(cfg, k)}" for k in keys]]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return make_tiny_dataset(root / "data", n_images=40, dim=16), tiny_bert_folder(root / "bert"), root


@pytest.fixture(scope="module")
def runs(ray_session, tiny):
    from raysys.cli import main
    from raysys.experiments.pipeline import PipelineConfig, stage_pretrain
    from raysys.pretrain.ray_train import fit

    data, bert, root = tiny
    cfg = tiny_config(bert)
    # uninterrupted, through the pipeline stage (data is read from OUT/data)
    out = root / "pipeline"
    out.mkdir()
    os.symlink(data, out / "data")
    summary: dict = {}
    stage_pretrain(PipelineConfig(pretrain=cfg), out, summary)
    # stopped after epoch 1 with a worker killed mid-epoch, then resumed by the CLI
    split_cfg = replace(cfg, stop_after_epochs=1, fail_at_step=5)
    storage = root / "storage"
    part1 = fit(split_cfg, data, "split", storage)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(cli_args(split_cfg, data, "split", storage))
    assert rc == 0
    part2 = json.loads(buf.getvalue().strip().splitlines()[-1])
    return {"full": summary["pretrain"], "out": out, "part1": part1, "part2": part2, "storage": storage, "cfg": cfg}


# ---------------------------------------------------------------- resume and failure recovery


def test_resume_after_stop_and_worker_kill_equals_uninterrupted_run(runs):
    full, p1, p2 = runs["full"], runs["part1"], runs["part2"]
    assert full["complete"] and full["steps"] == STEPS and full["epochs"] == 2 and full["workers"] == 2
    # invocation 1: the drill killed rank 1 at step 5; Ray Train restarted the group from the step-4
    # checkpoint; the run then stopped at the end of epoch 1
    assert p1["resumed_from_step"] == 4
    assert not p1["complete"] and p1["steps"] == 6 and p1["epochs"] == 1
    markers = list((runs["storage"] / "split").glob(".failure-drill-*"))
    assert len(markers) == 1
    import psutil

    pid = int(markers[0].read_text().split()[3])
    assert not psutil.pid_exists(pid), "the killed worker process is still alive"
    # invocation 2 (CLI, same --name/--storage): resumed at the epoch boundary and finished
    assert p2["resumed_from_step"] == 6 and p2["complete"]
    assert p2["steps"] == full["steps"] == STEPS and p2["epochs"] == full["epochs"]
    assert abs(p2["final_loss"] - full["final_loss"]) < 1e-3, (p2["final_loss"], full["final_loss"])
    assert p2["components"].keys() == full["components"].keys()
    for k, v in full["components"].items():
        assert abs(p2["components"][k] - v) < 1e-3, k
    # the CLI's last line carries the interface keys
    for k in ("final_loss", "steps", "epochs", "checkpoint", "mlflow_run_id", "tracking_uri"):
        assert p2[k] is not None, k
    assert Path(p2["checkpoint"]).name == f"checkpoint-{STEPS:08d}"


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_holds_model_optimizer_scheduler_rng_and_loads_weights_only(runs):
    from raysys.pretrain.model import load_checkpoint
    from raysys.pretrain.ray_train import load_train_state

    ckpt = Path(runs["full"]["checkpoint"])
    files = {p.name for p in ckpt.iterdir()}
    assert {"model.pt", "train_state.pt", "rng-rank0.pt", "rng-rank1.pt", "metrics.json", "config.yaml"} <= files
    for f in ckpt.glob("*.pt"):
        torch.load(f, map_location="cpu", weights_only=True)  # raises on anything but tensors/containers
    state = load_train_state(ckpt)
    assert state["step"] == STEPS and state["epoch"] == 1 and state["world_size"] == 2
    assert state["optimizer"]["state"] and len(state["optimizer"]["param_groups"]) == 2
    assert state["scheduler"]["last_epoch"] == STEPS
    rng = torch.load(ckpt / "rng-rank1.pt", weights_only=True)
    assert rng["torch"].dtype == torch.uint8 and rng["numpy"]["keys"].numel() == 624
    model, extra = load_checkpoint(ckpt / "model.pt")
    assert extra["steps"] == STEPS and extra["pretrain_config"]["workers"] == 2
    assert extra["mlflow_run_id"] == runs["full"]["mlflow_run_id"]  # evaluation logs into this run
    assert model.cfg.feature_dim == 16


class _Payload:
    """A pickle that runs a shell command when unpickled (the attack weights_only blocks)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_tampered_checkpoint_pickle_is_refused(runs, tmp_path):
    from raysys.contract import ContractError
    from raysys.pretrain.model import load_checkpoint
    from raysys.pretrain.ray_train import load_train_state, safe_load

    ckpt = tmp_path / "ckpt"
    shutil.copytree(runs["full"]["checkpoint"], ckpt)
    marker = tmp_path / "pwned"
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    state["optimizer"]["evil"] = _Payload(marker)
    torch.save(state, ckpt / "train_state.pt")
    with pytest.raises(ContractError, match="refused"):
        load_train_state(ckpt)
    with pytest.raises(ContractError, match="refused"):
        safe_load(ckpt / "train_state.pt")
    payload = torch.load(ckpt / "model.pt", weights_only=True)
    payload["extra"] = _Payload(marker)
    torch.save(payload, ckpt / "model.pt")
    with pytest.raises(ContractError, match="not a safe raysys checkpoint, refused: it names the Python object"):
        load_checkpoint(ckpt / "model.pt")
    assert not marker.exists(), "a tampered checkpoint executed code"
    torch.load(ckpt / "model.pt", weights_only=False)  # the payload is live: the unsafe path runs it
    assert marker.exists()


# ---------------------------------------------------------------- MLflow


def test_mlflow_run_holds_params_losses_throughput_and_model(runs):
    import mlflow
    from mlflow.tracking import MlflowClient

    full = runs["full"]
    assert full["tracking_uri"] == f"sqlite:///{runs['out'].resolve() / 'mlflow.db'}"
    assert full["mlflow_run_id"] in full["mlflow"]
    mlflow.set_tracking_uri(full["tracking_uri"])
    df = mlflow.search_runs(experiment_names=["test-train"], filter_string=f"attributes.run_id = '{full['mlflow_run_id']}'")
    assert len(df) == 1
    row = df.iloc[0]
    assert row["status"] == "FINISHED" and row["tags.raysys.complete"] == "true"
    for k, v in {"workers": "2", "batch_size": "8", "lr": "6e-05", "granularities": '["rt", "rp", "is"]',
                 "recipe": "muvla", "grad_accum": "1", "name": "pretrain"}.items():  # fmt: skip
        assert row[f"params.{k}"] == v, k
    for k in ("loss", "rt.mlm", "rt.mrc", "rt.mrfr", "rp.mlm", "rp.pmrtc", "is.mlm", "is.itm", "is.w_itm",
              "rp.w_itm", "w_itm", "lr", "samples_per_s", "tokens_per_s", "loss_all_ranks"):  # fmt: skip
        assert f"metrics.{k}" in df.columns and row[f"metrics.{k}"] == row[f"metrics.{k}"], k  # present, not NaN
    c = MlflowClient(full["tracking_uri"])
    steps = sorted(m.step for m in c.get_metric_history(full["mlflow_run_id"], "loss"))
    assert steps == list(range(STEPS)), "one loss value per step"
    w = c.get_metric_history(full["mlflow_run_id"], "w_itm")
    assert w and min(m.step for m in w) >= 6, "w_ITM applies from epoch m = 1"
    arts = {a.path for a in c.list_artifacts(full["mlflow_run_id"])}
    assert {"config.yaml", "loss_curve.png"} <= arts  # the loss curve as a figure
    run = c.get_run(full["mlflow_run_id"])
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40 and run.data.tags["raysys.git.dirty"] in ("true", "false")
    assert "raysys.command" in run.data.tags
    (ds,) = run.inputs.dataset_inputs  # the dataset directory, its digest the manifest's hash
    assert json.loads(ds.dataset.source)["uri"].endswith("data") and ds.dataset.digest != "none"
    (out,) = run.outputs.model_outputs  # the logged model: weights-only model.pt + config.yaml
    model = c.get_logged_model(out.model_id)
    assert model.source_run_id == full["mlflow_run_id"] and model.status == "READY"
    local = mlflow.artifacts.download_artifacts(f"{model.artifact_location}/model.pt")
    assert torch.load(local, weights_only=True)["format"] == "raysys.vlmodel/1"
    # the stopped, failed and resumed run is ONE MLflow run, with every step logged exactly once
    split = runs["part2"]["mlflow_run_id"]
    assert split == runs["part1"]["mlflow_run_id"]
    assert runs["part2"]["tracking_uri"] == f"sqlite:///{runs['storage'].resolve() / 'mlflow.db'}"
    c2 = MlflowClient(runs["part2"]["tracking_uri"])
    assert sorted(m.step for m in c2.get_metric_history(split, "loss")) == list(range(STEPS))
    assert c2.get_run(split).info.status == "FINISHED"


# ---------------------------------------------------------------- export


def test_export_loads_with_transformers_and_raysys_with_the_same_logits(runs, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from raysys.cli import main
    from raysys.experiments.export import fixed_batch, load_exported, logits
    from raysys.pretrain.model import load_checkpoint

    ckpt = runs["full"]["checkpoint"]
    out = tmp_path / "hf"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["export", ckpt, "--out", str(out)]) == 0
    res = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert res["verified"] and {"config.json", "model.safetensors", "raysys_heads.safetensors", "tokenizer.json"} <= set(res["files"])
    for f in ("model.safetensors", "raysys_heads.safetensors"):  # shared like the JSON beside them, not 0600
        assert (out / f).stat().st_mode & 0o777 == 0o644, f
    ref, _ = load_checkpoint(Path(ckpt) / "model.pt")
    ref.eval()
    exp = load_exported(out)
    tok = AutoTokenizer.from_pretrained(out)
    batch = fixed_batch(ref, tok, seed=3)
    a, b = logits(ref, batch), logits(exp, batch)
    for k in ("itm", "mlm", "mrc"):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    auto = AutoModel.from_pretrained(out).eval()
    assert type(auto).__name__ == "BertModel" and auto.config.num_hidden_layers == 2
    with torch.no_grad():
        ids, mask = batch["input_ids"], batch["text_mask"].long()
        torch.testing.assert_close(auto(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   ref.lm.bert(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   rtol=0, atol=1e-5)  # fmt: skip


# ---------------------------------------------------------------- no Ray needed


@pytest.mark.parametrize("source", ["stream", "memory"])
def test_one_rank_step_is_the_local_loop(tiny, source):
    """The Ray Train loop's step (`Trainee.step`) is issue 5's local loop, step for step, on either
    input: the worker builds its trainee as below (`_worker_trainee`), with its feed read from Ray
    Data instead of collated in-process (the same `Collate.steps`, tests/test_stream.py)."""
    import numpy as np

    from raysys.pretrain.loop import (
        make_trainee,
        prepare,
        prepare_stream,
        stream_feed,
        stream_run_plan,
        train_local,
    )

    data, bert, _ = tiny
    cfg = replace(tiny_config(bert), threads=1, steps=8, input=source)  # same schedule length on both sides
    local = train_local(cfg, data)["history"]
    torch.set_num_threads(1)
    np.random.seed(cfg.seed)
    if source == "stream":
        setup, sp = prepare_stream(cfg, data, 1)
        plan = stream_run_plan(cfg, sp)
        tr = make_trainee(cfg, setup, torch.device("cpu"), {}, plan=plan, feed=stream_feed(cfg, setup, sp, plan))
    else:
        setup = prepare(cfg, data)
        tr = make_trainee(cfg, setup, torch.device("cpu"), {g: len(s) for g, s in setup.streams.items()})
    torch.manual_seed(cfg.seed)
    mine = [tr.step(s)[0] for s in range(8)]
    assert len(local) == len(mine) == 8
    for h, m in zip(local, mine):
        assert h["loss"] == m["loss"], (h, m)


def test_plan_counts_optimizer_steps_with_grad_accumulation():
    cfg = TrainConfig(grad_accum=4, epochs=3)
    p = Plan.of(cfg, mixer_steps_per_epoch=42)
    assert (p.per_epoch, p.total) == (10, 30) and p.epoch(29) == 2 and p.epochs_done(21) == 3
    assert Plan.of(replace(cfg, steps=7, steps_per_epoch=5), 42).total == 7


def test_demo_config_file_matches_the_pipeline_default():
    from raysys import config
    from raysys.experiments.pipeline import PipelineConfig
    from raysys.pretrain.ray_train import demo_config

    assert config.load(TrainConfig, ROOT / "configs" / "pretrain_demo.yaml") == demo_config() == PipelineConfig().pretrain


def test_cli_dry_run_and_missing_storage(tmp_path, capsys):
    from raysys.cli import main

    assert main(["pretrain", "--data", str(tmp_path), "--workers", "3", "--dry-run", "grad_accum=2"]) == 0
    out = capsys.readouterr().out
    assert "workers: 3" in out and "grad_accum: 2" in out
    assert main(["pretrain", "--data", str(tmp_path), "--name", "x"]) == 2
    assert "--storage" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(tmp_path), "--dry-run", "no_such_key=1"]) == 2
    assert main(["pretrain", "--data", str(tmp_path), "--name", "x", "--storage", str(tmp_path), "grad_accum=0"]) == 2
    assert "grad_accum" in capsys.readouterr().err


def test_tracking_helpers(tmp_path):
    from raysys import tracking

    assert tracking.resolve_tracking_uri("none", tmp_path) is None
    assert tracking.resolve_tracking_uri("http://mlflow:5000", tmp_path) == "http://mlflow:5000"
    assert tracking.resolve_tracking_uri("", tmp_path / "s") == f"sqlite:///{(tmp_path / 's').resolve()}/mlflow.db"
    flat = tracking.flatten_params({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": "x" * 7000})
    assert flat["a.b"] == "1" and flat["a.c"] == "[1, 2]" and flat["d"] == "None" and len(flat["e"]) == 6000
    uri = tracking.default_tracking_uri(tmp_path)
    rid, reopened = tracking.start_run(uri, "exp", "r", link="L", params={"x": 1})
    assert not reopened
    rid2, reopened2 = tracking.start_run(uri, "exp", "r", link="L", params={"x": 2, "y": 3})
    assert reopened2 and rid2 == rid
    run = tracking.client(uri).get_run(rid)
    assert run.data.params == {"x": "1", "y": "3"}  # a param is never changed, new ones are added
    rid3, _ = tracking.start_run(uri, "exp", "r", link="L", reopen=False)
    assert rid3 != rid
    with tracking.MetricBuffer(uri, rid3) as buf:
        for s in range(1500):
            buf.add({"a": float(s), "nan": float("nan"), "flag": True}, s)
    hist = tracking.client(uri).get_metric_history(rid3, "a")
    assert len(hist) == 1500 and not tracking.client(uri).get_metric_history(rid3, "nan")


@pytest.mark.slow
def test_bench_train_smoke(ray_session, tiny, tmp_path):
    import argparse

    from raysys.bench import train as bench_train

    data, bert, _ = tiny
    p = argparse.ArgumentParser()
    bench_train.add_arguments(p)
    args = p.parse_args(["--steps", "12", "--warmup", "2", "--batch-size", "4", "--data", str(data), "--recipe", "muvla",
                         "--model-path", str(bert), "--keep", str(tmp_path)])  # fmt: skip
    r = bench_train.run(args)
    for k in ("ray_samples_per_s", "plain_samples_per_s", "ratio", "two_worker_samples_per_s"):
        assert r[k] and r[k] > 0, k
    assert r["mfu"] is None and r["tflops"] is None and r["device"] == "cpu"


def test_storage_paths_and_uris(tmp_path, monkeypatch):
    from raysys.pretrain.ray_train import resolve_storage, run_exists

    monkeypatch.chdir(tmp_path)
    assert resolve_storage("s3://bucket/raysys") == "s3://bucket/raysys"  # passed through to RunConfig
    assert resolve_storage("gs://bucket/x") == "gs://bucket/x"
    local = resolve_storage("rel/store")
    assert local == str(tmp_path / "rel" / "store") and Path(local).is_dir()
    assert not run_exists(local, "r")
    (Path(local) / "r").mkdir()
    (Path(local) / "r" / "checkpoint_manager_snapshot.json").write_text("{}")
    assert run_exists(local, "r") and run_exists(f"file://{local}", "r")
