"""The streamed pre-training input (`input=stream`, raysys.pretrain.stream): windows cover the
eligible images once per epoch with no rank reading another's, ranks run equal step counts, a
resumed plan continues with the very batches of an uninterrupted one, bad examples fail before
training, and a 2-worker Ray Train run reads only its windows. The `kill -9` resume of a
`raysys pretrain --config configs/pretrain_demo.yaml` run is the slow end-to-end check."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from _pretrain_fixtures import make_tiny_dataset, tiny_bert_folder

from raysys.config import to_dict
from raysys.contract import ContractError, read_table
from raysys.corpus.assemble import ensure_examples
from raysys.pretrain.config import PretrainConfig, TrainConfig
from raysys.pretrain.recipes import resolve
from raysys.pretrain.stream import Collate, plan, plan_json, rank_items, total_micro

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    data = make_tiny_dataset(root / "data", n_images=60, dim=16)
    ensure_examples(data)
    return data, tiny_bert_folder(root / "bert"), root


def _cfg(bert: Path, **kw) -> TrainConfig:
    base = dict(model_path=str(bert), batch_size=4, window_images=12, epochs=2, seed=5)
    return TrainConfig(**{**base, **kw})


def _windows_of(p, items) -> list[tuple[int, int]]:
    return sorted({(i.epoch, i.window) for i in items})


def test_windows_cover_eligible_images_once_per_epoch_and_ranks_never_share(tiny):
    data, bert, _ = tiny
    cfg = _cfg(bert)
    p = plan(data, cfg, resolve(cfg), world=2)
    gold = read_table(data, "gold", ["image_id", "split"])
    evals = {i for i, s in zip(gold.column("image_id").to_pylist(), gold.column("split").to_pylist()) if s == "eval"}
    ids = pq.read_table(p.windows[0].file, columns=["image_id"]).column(0).to_pylist()
    rows = [r for w in p.windows for r in w.rows]
    assert sorted(rows) == sorted(set(rows)), "a row in two windows"
    assert {ids[r] for r in rows} == set(ids) - evals  # every eligible image, no eval image
    assert max(len(w.rows) for w in p.windows) <= cfg.window_images
    end = total_micro(p, cfg)
    a, b = rank_items(p, cfg.seed, 0, end), rank_items(p, cfg.seed, 1, end)
    for epoch in range(2):
        wa = {i.window for i in a if i.epoch == epoch and i.cycle == 0}
        wb = {i.window for i in b if i.epoch == epoch and i.cycle == 0}
        assert not wa & wb, "two ranks read one window in one epoch"
        assert len({r for w in wa for r in p.windows[w].rows}) < len(rows)  # no rank reads the whole table
        # every rank runs exactly per_epoch micro-steps per epoch
        assert sum(i.count for i in a if i.epoch == epoch) == sum(i.count for i in b if i.epoch == epoch) == p.per_epoch
    # the epoch order is a seeded permutation: epochs differ, the same seed repeats it
    assert _windows_of(p, a) == _windows_of(p, rank_items(p, cfg.seed, 0, end))
    assert [i.window for i in a if i.epoch == 0] != [i.window for i in a if i.epoch == 1] or len(p.windows) < 4


def test_max_images_and_exclude_eval(tiny):
    data, bert, _ = tiny
    p = plan(data, _cfg(bert, max_images=10), resolve(_cfg(bert)), world=1)
    assert p.images == 10
    p_all = plan(data, _cfg(bert, exclude_eval=False), resolve(_cfg(bert)), world=1)
    assert p_all.images == 60 and plan(data, _cfg(bert), resolve(_cfg(bert)), world=1).images == 54


def _steps(data, cfg, p, items):
    col = Collate(plan_json(p), to_dict(cfg))
    return [(m, e, batches) for item in items for m, e, _, batches in col.steps(item)]


def test_resumed_items_give_the_batches_of_an_uninterrupted_run(tiny):
    """Resume at micro-step 7 (mid-window): the items from there are the uninterrupted run's tail,
    and collating them gives the same tensors."""
    data, bert, _ = tiny
    cfg = _cfg(bert, mixing="joint")
    p = plan(data, cfg, resolve(cfg), world=2)
    end = total_micro(p, cfg)
    full = _steps(data, cfg, p, rank_items(p, cfg.seed, 1, end))
    tail = _steps(data, cfg, p, rank_items(p, cfg.seed, 1, end, start_micro=7))
    assert [m for m, _, _ in full] == list(range(end)) and [m for m, _, _ in tail] == list(range(7, end))
    for (m, e, bs), (m2, e2, bs2) in zip(full[7:], tail):
        assert (m, e) == (m2, e2) and len(bs) == len(bs2) == 3  # joint: rt + rp + is every step
        for x, y in zip(bs, bs2):
            assert x["granularity"] == y["granularity"]
            for k, v in x.items():
                if isinstance(v, np.ndarray):
                    np.testing.assert_array_equal(v, y[k], err_msg=f"step {m} {k}")


def test_itm_negatives_come_from_the_same_window(tiny):
    data, bert, _ = tiny
    cfg = _cfg(bert, granularities=["is"], is_neg_prob=1.0)
    p = plan(data, cfg, resolve(cfg), world=1)
    item = rank_items(p, cfg.seed, 0, 1)[0]
    (_, _, (batch,)), = _steps(data, cfg, p, [item])
    window = p.windows[item.window]
    feats = pq.read_table(window.file, columns=["features"]).column(0).to_pylist()
    mine = {np.asarray(feats[r], np.float16).tobytes()[:64] for r in window.rows}
    assert (batch["itm_labels"] == 0).all()
    for b in range(batch["region_feats"].shape[0]):
        n = int(batch["region_mask"][b].sum())
        assert batch["region_feats"][b, :n].tobytes()[:64] in mine


@pytest.mark.parametrize("damage", ["missing", "truncated", "schema"])
def test_bad_examples_shard_fails_before_training_in_one_line(tiny, tmp_path, damage):
    data, bert, _ = tiny
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    shard = bad / "examples" / "part-00000.parquet"
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:200])
    else:
        t = pq.read_table(shard).drop_columns(["links"])
        pq.write_table(t, shard)
    with pytest.raises(ContractError) as e:
        plan(bad, _cfg(bert), resolve(_cfg(bert)), world=1)
    msg = str(e.value)
    assert "part-00000.parquet" in msg and "\n" not in msg
    if damage == "schema":
        assert "links" in msg
    r = subprocess.run([sys.executable, "-m", "raysys", "pretrain", "--local", "--data", str(bad), "--steps", "1",
                        f"model_path={bert}"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode != 0 and "Traceback" not in r.stderr and "part-00000.parquet" in r.stderr.strip().splitlines()[-1]


def test_local_stream_matches_itself_and_the_memory_path_learns_alike(tiny):
    """Same seed, same data → the same losses; the streamed and in-memory inputs train the same
    model to losses of the same size (different orders, so not equal)."""
    from raysys.pretrain.loop import train_local

    data, bert, _ = tiny
    cfg = PretrainConfig(model_path=str(bert), batch_size=4, window_images=12, steps=6, seed=3, log_every=0)
    a, b = train_local(cfg, data), train_local(cfg, data)
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    m = train_local(PretrainConfig(**{**cfg.__dict__, "input": "memory"}), data)
    assert abs(np.mean([h["loss"] for h in a["history"]]) / np.mean([h["loss"] for h in m["history"]]) - 1) < 0.3


def test_two_workers_read_only_their_windows(ray_session, tiny):
    """A 2-worker Ray Train run: each worker's stream reads exactly the rows its items plan, and
    no worker reads every row of the examples table."""
    from raysys.pretrain.ray_train import fit

    data, bert, root = tiny
    cfg = _cfg(bert, workers=2, epochs=1, tracking_uri="none", log_every=0, cpus_per_worker=0.5)
    res = fit(cfg, data, "windows", root / "storage")
    p = plan(data, cfg, resolve(cfg), world=2)
    planned = [sum(len(p.windows[i.window].rows) for i in rank_items(p, cfg.seed, r, total_micro(p, cfg)))
               for r in range(2)]  # fmt: skip
    assert res["examples_rows_read_per_worker"] == planned
    assert max(planned) < p.images and res["complete"]
    assert len(res["peak_rss_mb_per_worker"]) == 2 and min(res["peak_rss_mb_per_worker"]) > 0


def short_tmp() -> str:
    """A Ray temp dir under /tmp: Ray's socket paths must stay under 107 bytes, pytest's do not."""
    return tempfile.mkdtemp(prefix="rs-", dir="/tmp")


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path):
    """`raysys pretrain --config configs/pretrain_demo.yaml` (shortened) killed with SIGKILL on its
    process group after its first checkpoint, re-run with the same --name/--storage: the final
    loss equals an uninterrupted run's within 1e-3, with the same step count."""
    env = {**os.environ, "RAYSYS_RAY_TMP": short_tmp()}
    env.pop("RAY_ADDRESS", None)
    data = tmp_path / "w"
    for argv in (["world", "--images", "300", "--seed", "3", "--out", str(data)], ["retrieve", "--data", str(data), "--k", "5"],
                 ["phrases", "--data", str(data)]):  # fmt: skip
        r = subprocess.run([sys.executable, "-m", "raysys", *argv], capture_output=True, text=True, env=env, timeout=900)
        assert r.returncode == 0, (argv, r.stderr[-3000:])
    short = ["steps_per_epoch=8", "epochs=2", "checkpoint_every=4", "tracking_uri=none"]

    def cmd(name):
        return [sys.executable, "-m", "raysys", "pretrain", "--config", str(ROOT / "configs/pretrain_demo.yaml"),
                "--data", str(data), "--name", name, "--storage", str(tmp_path / "runs"), *short]  # fmt: skip

    full = subprocess.run(cmd("full"), capture_output=True, text=True, env=env, timeout=1200)
    assert full.returncode == 0, full.stderr[-2000:]
    whole = json.loads(full.stdout.strip().splitlines()[-1])
    proc = subprocess.Popen(cmd("killed"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    first = tmp_path / "runs" / "killed" / "checkpoint-00000004"
    deadline = time.monotonic() + 900
    while not (first / "train_state.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before its first checkpoint"
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    again = subprocess.run(cmd("killed"), capture_output=True, text=True, env=env, timeout=1200)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = json.loads(again.stdout.strip().splitlines()[-1])
    assert resumed["resumed_from_step"] and resumed["resumed_from_step"] >= 4
    assert resumed["steps"] == whole["steps"] == 16 and resumed["complete"]
    assert abs(resumed["final_loss"] - whole["final_loss"]) < 1e-3, (resumed["final_loss"], whole["final_loss"])

