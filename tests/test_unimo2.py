"""UNIMO-2 (papers/003): grounded tokens and L_GD by hand, span MLM's span lengths, the Grounded
Transformer's attention mask, `fusion: full` unchanged, and the `unimo2` recipe end to end."""

from __future__ import annotations

import inspect
import json
import math

import numpy as np
import pytest
import torch
from _pretrain_fixtures import make_tiny_dataset, tiny_bert_folder
from transformers.masking_utils import create_bidirectional_mask

from raysys.cli import main
from raysys.config import ConfigError
from raysys.evaluate.zeroshot import REQUIRED_KEYS, ZeroShotConfig, evaluate_zeroshot
from raysys.pretrain import stream
from raysys.pretrain.config import PretrainConfig, Unimo2Config
from raysys.pretrain.model import ModelConfig, build_model, load_checkpoint
from raysys.pretrain.recipes import joined, resolve
from raysys.pretrain.unimo2 import (
    ground,
    ground_mask,
    grounded_allowed,
    grounding_loss,
    span_lengths,
    span_select,
)

# ---------------------------------------------------------------- grounded tokens and L_GD (Eq. 1–3)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _lgd_by_hand(u: list[list[float]], counted: list[bool], G: list[list[float]], eta: float, k: int, beta: float):
    """Eq. 1–3 with plain loops: (top-K indices, L_GD) with means over D, tokens and grounded tokens."""
    C, D = len(G), len(G[0])
    x = [[_sigmoid(eta * sum(ui[d] * G[j][d] for d in range(D))) if c else 0.0 for j in range(C)]
         for ui, c in zip(u, counted)]  # fmt: skip
    s = [sum(x[i][j] for i in range(len(u))) for j in range(C)]
    top = sorted(range(C), key=lambda j: -s[j])[:k]
    t1 = []
    for i, ui in enumerate(u):
        if not counted[i]:
            continue
        z = sum(x[i])
        rec = [sum(x[i][j] / z * G[j][d] for j in range(C)) for d in range(D)]
        t1.append(sum((ui[d] - rec[d]) ** 2 for d in range(D)) / D)
    t2 = []
    for j in top:
        centre = [sum(x[i][j] / s[j] * u[i][d] for i in range(len(u))) for d in range(D)]
        t2.append(sum((G[j][d] - centre[d]) ** 2 for d in range(D)) / D)
    return top, sum(t1) / len(t1) + beta * sum(t2) / len(t2)


def test_grounded_top_k_and_lgd_equal_a_hand_computation():
    # text tokens 0-1, regions 2-3 (region 3 is padding), dictionary of 4 entries in 2-d
    u = [[1.0, 0.0], [0.5, 0.5], [0.0, 2.0], [9.0, 9.0]]
    G = [[1.0, 0.2], [-1.0, 0.0], [0.1, 1.5], [0.3, -0.4]]
    eta, k, beta = 0.7, 2, 0.25
    tmask, rmask = torch.tensor([[True, True]]), torch.tensor([[True, False]])
    tok, g = torch.tensor([u], dtype=torch.float64), torch.tensor(G, dtype=torch.float64)
    for on, counted in (("both", [True, True, True, False]), ("image", [False, False, True, False]),
                        ("text", [True, True, False, False])):  # fmt: skip
        gr = ground(tok, ground_mask(tmask, rmask, on), g, eta, k)
        top, lgd = _lgd_by_hand(u, counted, G, eta, k, beta)
        assert sorted(gr.index[0].tolist()) == sorted(top), on
        torch.testing.assert_close(gr.grounded[0], g[gr.index[0]])
        out = grounding_loss(gr, g, beta)
        assert bool(out.valid[0]) and float(out.loss[0]) == pytest.approx(lgd, rel=1e-6), on
    # scores accumulate over what is counted: the image alone picks another top-1 than the text alone
    text = ground(tok, ground_mask(tmask, rmask, "text"), g, eta, 1).index[0].tolist()
    image = ground(tok, ground_mask(tmask, rmask, "image"), g, eta, 1).index[0].tolist()
    assert text != image
    # stop-gradients (similarities held fixed): the first term moves G and not u (its target is
    # sg(u)); the commitment term moves u and not g_j (its target is sg(g_j))
    tok1, g1 = tok.clone().requires_grad_(True), g.clone().requires_grad_(True)
    gr = ground(tok1.detach(), ground_mask(tmask, rmask, "both"), g1.detach(), eta, k)
    gr.tokens = tok1
    du0, dg0 = torch.autograd.grad(grounding_loss(gr, g1, 0.0).loss.sum(), [tok1, g1], allow_unused=True)
    assert (du0 is None or not du0.any()) and dg0.abs().sum() > 0
    du1, dg1 = torch.autograd.grad(grounding_loss(gr, g1, 1.0).loss.sum(), [tok1, g1])
    assert du1.abs().sum() > 0
    torch.testing.assert_close(dg1, dg0)


def test_span_lengths_are_geometric_and_fill_the_budget():
    p, lmax = 0.2, 10
    rng = np.random.default_rng(0)
    lengths = span_lengths(rng, p, lmax, 200_000)
    pmf = np.array([(1 - p) ** (k - 1) * p for k in range(1, lmax + 1)])
    pmf /= pmf.sum()  # Geo(p) truncated at l_max (SpanBERT: mean 3.8)
    freq = np.bincount(lengths, minlength=lmax + 1)[1:]
    assert lengths.max() == lmax and lengths.min() == 1
    np.testing.assert_allclose(freq / len(lengths), pmf, atol=0.004)
    assert lengths.mean() == pytest.approx(3.8, abs=0.05)
    drawn: list[int] = []
    for _ in range(300):
        sel, ls = span_select(1000, rng, p, lmax, 0.15)
        assert 150 <= sel.sum() < 150 + lmax  # ≥ 15 %, exceeded by less than one span
        drawn += ls
    freq2 = np.bincount(drawn, minlength=lmax + 1)[1:] / len(drawn)
    np.testing.assert_allclose(freq2, pmf, atol=0.02)
    sel, _ = span_select(5, rng, p, lmax, 0.15)
    assert sel.sum() >= 1  # a short text still gets one target


# ---------------------------------------------------------------- the Grounded Transformer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("unimo2")
    return make_tiny_dataset(root / "data", n_images=40, dim=16, k=3), tiny_bert_folder(root / "bert")


def _cfg(bert, fusion: str, **kw) -> ModelConfig:
    objectives = ("mlm", "itm", "grounded") if fusion == "grounded" else ("mlm", "itm")
    return ModelConfig(model_path=str(bert), feature_dim=16, num_classes=6, dropout=0.0, encoder="two_stage",
                       uni_layers=1, fusion=fusion, objectives=objectives,
                       objective_options={"unimo2": {"dictionary_size": 12, "grounded_k": 3}}, **kw)  # fmt: skip


def _batch(B: int = 2, T: int = 5, R: int = 4) -> dict:
    g = torch.Generator().manual_seed(1)
    tmask = torch.ones(B, T, dtype=torch.bool)
    tmask[1, 3:] = False
    rmask = torch.ones(B, R, dtype=torch.bool)
    rmask[0, 2:] = False
    return {"input_ids": torch.randint(1000, 2000, (B, T), generator=g), "text_mask": tmask,
            "region_feats": torch.randn(B, R, 16, generator=g), "region_loc": torch.rand(B, R, 5, generator=g),
            "region_mask": rmask, "objectives": ()}  # fmt: skip


def test_grounded_fusion_mask_blocks_every_text_region_entry(tiny):
    _, bert = tiny
    model = build_model(_cfg(bert, "grounded"), seed=0).eval()
    b = _batch()
    T, R, K = 5, 4, 3
    mask = model.cross_attention_mask(b["text_mask"], b["region_mask"], K)
    allowed = mask if mask.dtype == torch.bool else mask == 0
    assert allowed.shape == (2, 1, T + R + K, T + R + K)
    a = allowed[:, 0]
    assert not a[:, :T, T : T + R].any() and not a[:, T : T + R, :T].any()  # no text↔region entry
    assert a[:, :, T + R :].all()  # everyone attends to the grounded tokens
    keys = torch.cat([b["text_mask"], b["region_mask"], torch.ones(2, K, dtype=torch.bool)], 1)
    assert torch.equal(a[:, T + R :], keys.unsqueeze(1).expand(-1, K, -1))  # grounded → every valid key
    assert torch.equal(a[:, :T, :T], b["text_mask"].unsqueeze(1).expand(-1, T, -1))  # text → valid text keys
    assert torch.equal(a[:, T : T + R, T : T + R], b["region_mask"].unsqueeze(1).expand(-1, R, -1))
    torch.testing.assert_close(grounded_allowed(b["text_mask"], b["region_mask"], K), a)
    # the layers run on that mask: with grounded tokens chosen from the text alone, the text's
    # outputs do not change when the regions do (they would under full attention)
    with torch.no_grad():
        t1 = model({**b, "ground": "text"})["text_hidden"]
        t2 = model({**b, "ground": "text", "region_feats": b["region_feats"] * -3.0 + 1.0})["text_hidden"]
        full = build_model(_cfg(bert, "full"), seed=0).eval()
        f1, f2 = full(b)["text_hidden"], full({**b, "region_feats": b["region_feats"] * -3.0 + 1.0})["text_hidden"]
    torch.testing.assert_close(t1, t2, rtol=0, atol=1e-6)
    assert (f1 - f2).abs().max() > 1e-3
    out = model(b)
    assert out["grounding"].index.shape == (2, K) and out["grounded_hidden"].shape == (2, K, model.hidden_size)
    assert out["region_hidden"].shape[1] == R and out["text_hidden"].shape[1] == T


def test_full_fusion_gives_the_logits_of_the_plain_concatenation(tiny):
    """`fusion: full` is the computation from before the option: the cross-modal layers over the
    concatenation with the padding mask; no dictionary, the same weights as before."""
    _, bert = tiny
    full = build_model(_cfg(bert, "full"), seed=0).eval()
    assert full.grounding is None and not any(k.startswith("grounding") for k in full.state_dict())
    b = _batch()
    with torch.no_grad():
        out = full(b)
        text_u, _, tmask = full.text_tower(b)
        _, region_u, _ = full.image_tower(b)
        x = torch.cat([text_u, region_u], 1)
        attn = create_bidirectional_mask(config=full.lm.config, inputs_embeds=x,
                                         attention_mask=torch.cat([tmask, b["region_mask"]], 1).long())  # fmt: skip
        for layer in full.lm.bert.encoder.layer[1:]:
            x = layer(x, attn)
        logits = full.itm_head(full.pool_masked(x[:, :5], b["text_mask"], x[:, 5:], b["region_mask"]))
    torch.testing.assert_close(out["itm_logits"], logits, rtol=0, atol=0)
    # the grounded model draws the same weights first (its dictionary comes last): same towers
    grounded = build_model(_cfg(bert, "grounded"), seed=0).eval()
    with torch.no_grad():
        torch.testing.assert_close(grounded.text_embedding(b), full.text_embedding(b), rtol=0, atol=0)
        assert not torch.equal(grounded(b)["itm_logits"], out["itm_logits"])
    with pytest.raises(ConfigError, match="two_stage"):
        build_model(ModelConfig(model_path=str(bert), feature_dim=16, num_classes=6, fusion="grounded"))


# ---------------------------------------------------------------- the recipe


def test_recipe_sets_the_model_and_the_curriculum():
    cfg = PretrainConfig(recipe="unimo2")
    r = resolve(cfg)
    assert r.options["fusion"] == "grounded" and r.options["encoder"] == "two_stage"
    assert {"grounded", "span_mlm"} <= set(r.options["objectives"])
    assert cfg.unimo2 == Unimo2Config() and (cfg.unimo2.dictionary_size, cfg.unimo2.grounded_k) == (2048, 100)
    assert (cfg.unimo2.beta, cfg.unimo2.span_p, cfg.unimo2.pair_epochs) == (0.25, 0.2, 20)
    assert joined(r, 0) == joined(r, 19) == ("unimo2_pairs",)
    assert joined(r, 20) == ("unimo2_pairs", "unimo2_images", "unimo2_texts")


def _pretrain(capsys, tmp_path, data, bert, steps: int, *extra: str, history=None) -> dict:
    capsys.readouterr()
    args = ["pretrain", "--local", "--data", str(data), "--recipe", "unimo2", "--out", str(tmp_path / "u"),
            "--steps", str(steps), *(["--history", str(history)] if history else []),
            f"model_path={bert}", "batch_size=8", "log_every=0", "unimo2.dictionary_size=32", "unimo2.grounded_k=4",
            *extra]  # fmt: skip
    assert main(args) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_unimo2_recipe_prints_every_term(tiny, tmp_path, capsys):
    data, bert = tiny
    res = _pretrain(capsys, tmp_path, data, bert, 3, "unimo2.pair_epochs=0")
    for key in ("unimo2_pairs.grounded", "unimo2_pairs.span_mlm", "unimo2_pairs.unimo2_itm",
                "unimo2_images.grounded", "unimo2_texts.grounded", "unimo2_texts.span_mlm"):  # fmt: skip
        assert math.isfinite(res[key]) and res[key] > 0, key
    assert not any(k.endswith(".mlm") for k in res["components"])  # span MLM replaces the token MLM
    model, _ = load_checkpoint(res["checkpoint"])
    assert (model.cfg.encoder, model.cfg.fusion) == ("two_stage", "grounded")
    assert model.grounding.weight.shape == (32, model.hidden_size) and model.grounding.k == 4


needs_hook = pytest.mark.skipif(
    "joined(" not in inspect.getsource(stream.Collate.steps),
    reason="the streamed input does not read Recipe.options['join_epoch'] yet (stream.Collate.steps hook)",
)


@needs_hook
def test_unpaired_corpora_join_after_pair_epochs(tiny, tmp_path, capsys):
    data, bert = tiny
    hist = tmp_path / "h.jsonl"
    _pretrain(capsys, tmp_path, data, bert, 8, "unimo2.pair_epochs=1", "steps_per_epoch=4", history=hist)
    rows = [json.loads(x) for x in hist.read_text().splitlines()]
    by_epoch = {e: {r["granularity"] for r in rows if r["epoch"] == e} for e in (0, 1)}
    assert by_epoch[0] == {"unimo2_pairs"}
    assert by_epoch[1] == {"unimo2_pairs", "unimo2_images", "unimo2_texts"}


def test_towers_zero_shot_on_a_unimo2_checkpoint(tiny, tmp_path, capsys):
    """`coarse=towers` ranks by the uni-modal towers; re-ranking every candidate with the ITM head
    (through the Grounded Transformer) equals the single-stream evaluation of the checkpoint."""
    data, bert = tiny
    ckpt = _pretrain(capsys, tmp_path, data, bert, 2, "unimo2.pair_epochs=0")["checkpoint"]
    towers = evaluate_zeroshot(ckpt, data, ZeroShotConfig(coarse="towers", mlflow=False))
    assert set(REQUIRED_KEYS) <= set(towers) and towers["encoder"] == "two_stage"
    every = towers["n_images"] + towers["n_texts"]
    rr = evaluate_zeroshot(ckpt, data, ZeroShotConfig(coarse="towers", rerank_top_n=every, mlflow=False))
    full = evaluate_zeroshot(ckpt, data, ZeroShotConfig(coarse="none", ray="never", mlflow=False))
    for k in ("i2t_r1", "t2i_r1", "t2i_r5", "itm_auc"):
        assert rr[k] == pytest.approx(full[k], abs=1e-4), k
