"""`raysys pretrain --local` on the demo world: every recipe runs from the CLI, the same seed gives
the same losses, and a small model overfits 32 samples (every loss term falls ≥ 80 %).

Fast tests use TEST STAND-INS for the retrieval and phrase stages (`tests/_pretrain_fixtures.py`:
pairs by tag-word overlap, phrases by tag-word matches) on a copy of the session world, because
the real stages cost minutes of Ray + embedding time on 2 cores. `test_real_stages_then_pretrain`
(slow) runs the real `retrieve` + `extract_phrases` and pre-trains on their output.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from _pretrain_fixtures import copy_world_with_stand_ins

from raysys.cli import main
from raysys.contract import shard_files
from raysys.pretrain.config import PretrainConfig
from raysys.pretrain.loop import train_local

FAST = ["model_layers=1", "batch_size=8", "log_every=5", "max_text_len=32"]


@pytest.fixture(scope="module")
def world_corpus(small_world, tmp_path_factory):
    """A copy of the session world (never written into) with stand-in pairs and phrases."""
    return copy_world_with_stand_ins(small_world, tmp_path_factory.mktemp("pretrain") / "data", k=5)


@pytest.mark.slow
def test_real_stages_then_pretrain(small_world, ray_session, tmp_path, capsys):
    """The real retrieval and phrase stages feed pre-training: R-P has linked phrases to mask."""
    from raysys.corpus.phrases import PhrasesConfig, extract_phrases
    from raysys.corpus.retrieval import RetrievalConfig, retrieve

    dest = tmp_path / "data"
    shutil.copytree(small_world, dest)
    retrieve(dest, RetrievalConfig(k=5, shards=1))
    extract_phrases(dest, PhrasesConfig())
    assert shard_files(dest, "pairs") and shard_files(dest, "phrases")
    from raysys.pretrain.granularities import load_corpus

    corpus = load_corpus(dest, PretrainConfig(k=5), {"pairs", "phrases"})
    assert sum(1 for links in corpus.links if links) > 0.5 * len(corpus.links)
    res = _cli_json(["pretrain", "--local", "--data", str(dest), "--recipe", "muvla", "--steps", "6", *FAST], capsys)
    assert {"rt.mlm", "rp.mlm", "rp.pmrtc", "is.itm"} <= set(res["components"])


def _cli_json(args, capsys) -> dict:
    assert main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


RECIPE_KEYS = {
    "muvla": {"rt.mlm", "rt.mrc", "rt.mrfr", "rp.mlm", "rp.pmrtc", "is.mlm", "is.itm"},
    "base": {"rt.mlm", "rt.mrc", "rt.mrfr", "rp.mlm", "rp.pmrtc", "is.mlm", "is.itm"},
    "random_pairs": {"pairs.mlm", "pairs.mrc", "pairs.mrfr"},
    "paired_ratio": {"pairs.mlm", "pairs.mrc", "pairs.mrfr"},
    "round_robin": {"text.mlm", "image.mlm", "image.mrc", "image.mrfr"},
    "rt+is": {"rt.mlm", "rt.mrc", "rt.mrfr", "is.mlm", "is.itm"},
}


@pytest.mark.parametrize("recipe", list(RECIPE_KEYS))
def test_every_recipe_runs_20_steps_from_the_cli(recipe, world_corpus, capsys, caplog):
    args = ["pretrain", "--local", "--data", str(world_corpus), "--steps", "20"]
    if recipe == "rt+is":  # a granularity subset through the config key
        args += ["--recipe", "muvla", *FAST, "granularities=[rt,is]"]
    else:
        args += ["--recipe", recipe, *FAST]
    if recipe == "paired_ratio":
        args += ["paired_ratio=0.4"]
    with caplog.at_level(logging.INFO, logger="raysys.pretrain.loop"):
        res = _cli_json(args, capsys)
    assert res["recipe"] == ("muvla" if recipe == "rt+is" else recipe)
    assert res["steps"] == 20 and res["updates"] == (0 if recipe == "base" else 20)
    assert math.isfinite(res["final_loss"]) and res["final_loss"] > 0
    assert set(res["components"]) >= RECIPE_KEYS[recipe], res["components"]
    for k in RECIPE_KEYS[recipe]:
        assert math.isfinite(res[k]) and res[k] >= 0
    # loss components are logged while training
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) >= 4 and any("loss=" in ln and "." in ln.split("loss=")[1] for ln in lines)
    logged = " ".join(lines)
    assert all(f"{k}=" in logged for k in RECIPE_KEYS[recipe])


def test_console_script_writes_a_weights_only_checkpoint(world_corpus, tmp_path):
    out = tmp_path / "run"
    hist = tmp_path / "h.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "raysys", "pretrain", "--local", "--data", str(world_corpus), "--recipe", "muvla",
         "--steps", "3", "--out", str(out), "--history", str(hist), *FAST],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["steps"] == 3 and res["checkpoint"] == str(out / "model.pt")
    assert "step 1/3" in proc.stderr and "rt.mlm=" in proc.stderr
    assert len(hist.read_text().splitlines()) == 3
    payload = torch.load(out / "model.pt", weights_only=True)
    assert "state_dict" in payload
    from raysys.pretrain.model import load_checkpoint

    model, extra = load_checkpoint(out / "model.pt")
    assert extra["recipe"] == "muvla" and len(model.lm.bert.encoder.layer) == 1


def test_bad_config_is_a_one_line_error(world_corpus, capsys):
    assert main(["pretrain", "--local", "--data", str(world_corpus), "--recipe", "nope", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recipe" in err[0]
    assert main(["pretrain", "--local", "--data", str(world_corpus), "--steps", "1", "mlm_probb=0.2"]) == 2


def test_same_seed_same_losses(world_corpus):
    def losses(seed):
        cfg = PretrainConfig(seed=seed, model_layers=1, batch_size=8, max_text_len=32, log_every=0)
        return [h["loss"] for h in train_local(cfg, world_corpus, steps=10)["history"]]

    a, b, c = losses(3), losses(3), losses(4)
    assert a == b, (a, b)  # bit-identical
    assert a != c


@pytest.mark.slow
def test_overfit_32_samples_every_term_falls_80_percent(world_corpus):
    """32 demo-world images (k=1: 32 retrieved pairs), 2-layer MiniLM, no dropout: every loss term
    of R-T, R-P and I-S falls by ≥ 80 % (mean of the first 5 steps vs the last 10).

    ITM is the slow term: it only learns once the pooled vector it reads carries the match (mean
    pooling for MiniLM, see `model.resolve_pooling`); on [CLS] it stayed at ln 2 for 400 steps.
    Measured with these values: ITM −96 %, MRC (the next slowest) −88 %, the rest −91 to −99 %."""
    cfg = PretrainConfig(
        max_images=32, k=1, model_layers=2, dropout=0.0, batch_size=16, lr=3e-4, warmup_ratio=0.05,
        mixing="joint", w_itm=False, log_every=0, max_text_len=32, threads=2,
    )  # fmt: skip
    hist = train_local(cfg, world_corpus, steps=OVERFIT_STEPS)["history"]
    keys = ["rt.mlm", "rt.mrc", "rt.mrfr", "rp.mlm", "rp.pmrtc", "is.mlm", "is.itm"]
    drops = {}
    for k in keys:
        v = [h[k] for h in hist if k in h]
        first, last = np.mean(v[:5]), np.mean(v[-10:])
        drops[k] = 1 - last / first
    print("overfit drops", {k: round(d, 3) for k, d in drops.items()})
    assert all(d >= 0.8 for d in drops.values()), drops


OVERFIT_STEPS = 400  # ITM passes −80 % near step 250 (docs/pretraining.md)
