"""The objective seam (issue 15): a new pre-training objective is one registered class, defined here
and nowhere under raysys/. Named in a config (`extra_objectives`), it runs in `raysys pretrain
--local` on the granularities it declares, its term is logged per granularity, and
`loss_weights.<name>` scales it in the loss."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _pretrain_fixtures import make_tiny_dataset, tiny_bert_folder
from torch import nn

from raysys.cli import main
from raysys.pretrain.objectives import OBJECTIVES, Objective, ObjectiveOutput, register

POOLED = "seam_pooled_l2"
RT_ONLY = "seam_rt_only"


class PooledL2(Objective):
    """An auxiliary loss on the pooled output, through a linear head the objective owns: the mean
    square of `head(pool(h))`, one value per sample (every sample has a target)."""

    needs = ("text_mask", "region_mask")

    def __init__(self, model):
        super().__init__(model)
        self.head = nn.Linear(model.hidden_size, 4)

    def forward(self, model, out, batch):
        pooled = model.pool(out["text_hidden"], out["region_hidden"], batch)
        loss = self.head(pooled).float().pow(2).mean(-1)
        return ObjectiveOutput(loss, torch.ones_like(loss, dtype=torch.bool))


class RegionTagOnly(PooledL2):
    """The same loss, declared for R-T batches only."""

    granularities = ("rt",)


@pytest.fixture(scope="module", autouse=True)
def seam_objectives():
    register(POOLED)(PooledL2)
    register(RT_ONLY)(RegionTagOnly)
    yield
    OBJECTIVES.pop(POOLED, None)
    OBJECTIVES.pop(RT_ONLY, None)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("seam") / "data", n_images=40, dim=16, k=3)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return tiny_bert_folder(tmp_path_factory.mktemp("seam-bert") / "tiny")


def _pretrain(tmp_path, capsys, data, bert, config: str, *overrides: str) -> tuple[dict, list[dict]]:
    """5 local muvla steps (round robin: rt, rp, is, rt, rp) from the CLI; (summary, history)."""
    cfg = tmp_path / f"cfg-{len(list(tmp_path.iterdir()))}.yaml"
    cfg.write_text(config)
    hist = tmp_path / f"{cfg.stem}.jsonl"
    args = ["pretrain", "--local", "--data", str(data), "--recipe", "muvla", "--steps", "5", "--config", str(cfg),
            "--history", str(hist), f"model_path={bert}", "batch_size=8", "log_every=0", "dropout=0.0", *overrides]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return summary, [json.loads(line) for line in hist.read_text().splitlines()]


def test_a_registered_objective_named_in_a_config_runs_and_is_weighted(tiny_data, tiny_bert, tmp_path, capsys):
    res, hist = _pretrain(tmp_path, capsys, tiny_data, tiny_bert, f"extra_objectives: [{POOLED}]\n")
    assert res["steps"] == 5 and [h["granularity"] for h in hist] == ["rt", "rp", "is", "rt", "rp"]
    # it applies to every granularity: one term per granularity, next to the standard ones
    for g in ("rt", "rp", "is"):
        v = res["components"][f"{g}.{POOLED}"]
        assert math.isfinite(v) and v > 0, (g, v)
    assert {"rt.mlm", "rp.pmrtc", "is.itm"} <= set(res["components"])
    # loss_weights.<name> scales its term in the loss (the logged component stays unweighted): at
    # step 0 the model is the same, so the loss grows by (5 - 1) × the term
    heavy, heavy_hist = _pretrain(tmp_path, capsys, tiny_data, tiny_bert,
                                  f"extra_objectives: [{POOLED}]\nloss_weights: {{{POOLED}: 5.0}}\n")  # fmt: skip
    term0 = hist[0][f"rt.{POOLED}"]
    assert heavy_hist[0][f"rt.{POOLED}"] == pytest.approx(term0, rel=1e-6)
    assert heavy_hist[0]["loss"] - hist[0]["loss"] == pytest.approx(4.0 * term0, rel=1e-4)
    assert heavy["final_loss"] != res["final_loss"]  # and the runs diverge from there
    # without it in the config, the model does not have it
    plain, _ = _pretrain(tmp_path, capsys, tiny_data, tiny_bert, "{}\n")
    assert not any(k.endswith(POOLED) for k in plain["components"])


def test_an_objective_runs_only_on_the_granularities_it_declares(tiny_data, tiny_bert, tmp_path, capsys):
    res, hist = _pretrain(tmp_path, capsys, tiny_data, tiny_bert, "{}\n", f"extra_objectives=[{RT_ONLY}]")
    key = f"rt.{RT_ONLY}"
    assert math.isfinite(res["components"][key])
    assert not any(k.endswith(RT_ONLY) for k in res["components"] if k != key)
    for h in hist:  # an R-T step logs it; the R-P and I-S steps never do
        assert (key in h) == (h["granularity"] == "rt"), h
        assert not any(k.endswith(RT_ONLY) and k != key for k in h), h
