"""The single-stream model: location features, embeddings, layout, heads, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _pretrain_fixtures import tiny_bert_folder

from raysys.pretrain.model import (
    ModelConfig,
    build_model,
    load_checkpoint,
    location_features,
    save_checkpoint,
)


def test_location_features_hand_computed():
    boxes = np.array([[0, 0, 640, 480], [64, 48, 320, 240], [600, 400, 641, 481]], np.float32)
    loc = location_features(boxes, 640, 480)
    np.testing.assert_allclose(loc[0], [0, 0, 1, 1, 1], atol=1e-6)
    # [x1/W, y1/H, x2/W, y2/H, (x2-x1)(y2-y1)/(W·H)]
    np.testing.assert_allclose(loc[1], [0.1, 0.1, 0.5, 0.5, (256 * 192) / (640 * 480)], atol=1e-6)
    # a box overshooting by a pixel is clipped to the image
    np.testing.assert_allclose(loc[2], [600 / 640, 400 / 480, 1, 1, (40 / 640) * (80 / 480)], atol=1e-6)
    # per-box sizes
    loc2 = location_features(boxes[:2], np.array([640, 320]), np.array([480, 240]))
    np.testing.assert_allclose(loc2[1], [0.2, 0.2, 1.0, 1.0, 0.64], atol=1e-6)
    assert loc.dtype == np.float32 and loc.shape == (3, 5)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tiny_bert_folder(tmp_path_factory.mktemp("bert") / "tiny")
    cfg = ModelConfig(model_path=str(path), feature_dim=8, num_classes=5, dropout=0.0)
    return build_model(cfg, seed=0).eval()


def _batch(B=3, T=6, R=4, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (B, T), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    tmask = torch.ones(B, T, dtype=torch.bool)
    tmask[0, 4:] = False
    rmask = torch.ones(B, R, dtype=torch.bool)
    rmask[1, 2:] = False
    return {
        "input_ids": ids,
        "text_mask": tmask,
        "region_feats": torch.rand(B, R, D, generator=g).half(),
        "region_loc": torch.rand(B, R, 5, generator=g),
        "region_mask": rmask,
    }


def test_layout_regions_first_equals_text_first(tiny_model):
    """Positions are per segment, so [regions, sentence] (paper's I-S) and [sentence, regions] are
    the same computation: outputs agree up to float noise."""
    b = _batch()
    with torch.no_grad():
        t1, r1 = tiny_model.encode(b)
        t2, r2 = tiny_model.encode({**b, "regions_first": True})
    tm, rm = b["text_mask"], b["region_mask"]
    torch.testing.assert_close(t1[tm], t2[tm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r1[rm], r2[rm], atol=1e-5, rtol=1e-5)


def test_padding_does_not_leak(tiny_model):
    """Padded regions/tokens must not change real positions' outputs."""
    b = _batch()
    with torch.no_grad():
        t1, r1 = tiny_model.encode(b)
        b2 = dict(b)
        feats = b["region_feats"].clone()
        feats[1, 2:] = 100.0  # padded regions of sample 1
        ids = b["input_ids"].clone()
        ids[0, 4:] = 5000  # padded tokens of sample 0
        t2, r2 = tiny_model.encode({**b2, "region_feats": feats, "input_ids": ids})
    torch.testing.assert_close(t1[b["text_mask"]], t2[b["text_mask"]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r1[b["region_mask"]], r2[b["region_mask"]], atol=1e-5, rtol=1e-5)


def test_region_embedding_parts(tiny_model):
    """Region embedding = LN(Linear(feature)) + LN(Linear(location)) + modality (then LN): masking a
    region zeroes its feature input; a tag's box embedding changes only tokens that carry one."""
    m = tiny_model
    emb = m.region_embedding
    f, loc = torch.rand(2, 8), torch.rand(2, 5)
    expect = emb.norm(emb.feature_norm(emb.feature(f)) + emb.location_norm(emb.location(loc)) + emb.modality)
    torch.testing.assert_close(emb(f, loc), expect)
    b = _batch()
    masked = torch.zeros(3, 4, dtype=torch.bool)
    masked[2, 1] = True
    with torch.no_grad():
        _, r0 = m.encode(b)
        _, r1 = m.encode({**b, "region_masked": masked})
        zeroed = b["region_feats"].clone()
        zeroed[2, 1] = 0
        _, r2 = m.encode({**b, "region_feats": zeroed})
    assert not torch.allclose(r0[2, 1], r1[2, 1])
    torch.testing.assert_close(r1, r2)
    # tag tokens with a box: only where text_loc_mask is set does the text embedding change
    tl = torch.rand(3, 6, 5)
    tmask = torch.zeros(3, 6)
    tmask[0, 1] = 1.0
    with torch.no_grad():
        t0, _ = m.encode(b)
        t1, _ = m.encode({**b, "text_loc": tl, "text_loc_mask": tmask})
        t_zero, _ = m.encode({**b, "text_loc": tl, "text_loc_mask": torch.zeros(3, 6)})
    torch.testing.assert_close(t0, t_zero)
    assert not torch.allclose(t0, t1)


def test_heads_and_tied_decoder(tiny_model):
    m = tiny_model
    assert m.lm.cls.predictions.decoder.weight is m.lm.bert.embeddings.word_embeddings.weight
    b = _batch()
    with torch.no_grad():
        out = m(b)
    assert out["itm_logits"].shape == (3, 2)
    assert m.mrc_head(out["region_hidden"]).shape == (3, 4, 5)
    assert m.mrfr_head(out["region_hidden"]).shape == (3, 4, 8)
    assert m.mlm_logits(out["region_hidden"]).shape == (3, 4, 30522)
    assert float(out["aux_zero"]) == 0.0


def test_checkpoint_roundtrip_weights_only(tiny_model, tmp_path):
    p = tmp_path / "model.pt"
    save_checkpoint(p, tiny_model, {"recipe": "muvla"})
    payload = torch.load(p, weights_only=True)
    assert payload["format"].startswith("raysys.vlmodel")
    model2, extra = load_checkpoint(p)
    model2.eval()
    assert extra == {"recipe": "muvla"}
    save_checkpoint(p, tiny_model, {"tracking_uri": "postgresql://me:s3cret@db/mlflow"})  # credentials stay out
    assert load_checkpoint(p)[1] == {"tracking_uri": "postgresql://me:***@db/mlflow"}
    assert b"s3cret" not in p.read_bytes()
    model2, _ = load_checkpoint(p)
    model2.eval()
    b = _batch(seed=3)
    with torch.no_grad():
        a, c = tiny_model(b), model2(b)
    torch.testing.assert_close(a["itm_logits"], c["itm_logits"])
    torch.testing.assert_close(a["region_hidden"], c["region_hidden"])
    assert model2.lm.cls.predictions.decoder.weight is model2.lm.bert.embeddings.word_embeddings.weight


def test_default_backbone_is_packaged_minilm():
    """The default model path is the packaged MiniLM: 6 layers, 384 wide, BERT vocabulary."""
    m = build_model(ModelConfig(feature_dim=8, num_classes=3), seed=0)
    assert m.lm.config.num_hidden_layers == 6 and m.hidden_size == 384 and m.vocab_size == 30522
    small = build_model(ModelConfig(feature_dim=8, num_classes=3, num_layers=2), seed=0)
    assert len(small.lm.bert.encoder.layer) == 2
    # the kept layers carry the pre-trained weights
    torch.testing.assert_close(
        small.lm.bert.encoder.layer[1].output.dense.weight, m.lm.bert.encoder.layer[1].output.dense.weight
    )


def test_pooling_follows_the_backbone(tiny_model, tmp_path):
    """"auto" reads how the backbone was trained to pool: the packaged MiniLM (a mean-pooling
    sentence-transformer) → "mean"; a plain BERT folder → "cls"; a bad name is a config error."""
    from raysys.config import ConfigError
    from raysys.pretrain.model import resolve_pooling

    assert resolve_pooling("auto", "") == "mean"
    assert tiny_model.cfg.pooling == "cls"  # tiny_bert_folder has no 1_Pooling/
    assert resolve_pooling("cls", "") == "cls"
    with pytest.raises(ConfigError, match="pooling"):
        resolve_pooling("max", "")
    # The MiniLM [CLS] state is (nearly) the same vector whatever the input, which is why ITM
    # does not read it there: its spread across samples is far below the mean-pooled one's.
    m = build_model(ModelConfig(feature_dim=8, num_classes=3, num_layers=2, dropout=0.0), seed=0).eval()
    b = _batch(B=6, seed=1)
    with torch.no_grad():
        t, r = m.encode(b)
    cls_spread = t[:, 0].std(0).mean()
    mean_spread = m.pool(t, r, b).std(0).mean()
    assert m.cfg.pooling == "mean" and mean_spread > 5 * cls_spread, (float(cls_spread), float(mean_spread))


def test_mean_pooling_ignores_padding(tmp_path):
    path = tiny_bert_folder(tmp_path / "tiny")
    m = build_model(ModelConfig(model_path=str(path), feature_dim=8, num_classes=5, dropout=0.0, pooling="mean"), seed=0)
    b = _batch()
    t, r = torch.randn(3, 6, m.hidden_size), torch.randn(3, 4, m.hidden_size)
    pooled = m.pool(t, r, b)
    tm, rm = b["text_mask"][0], b["region_mask"][0]  # sample 0: 4 of 6 tokens, 4 regions
    torch.testing.assert_close(pooled[0], torch.cat([t[0][tm], r[0][rm]]).mean(0))
    t2 = t.clone()
    t2[0, 4:] = 1e6  # padded tokens
    torch.testing.assert_close(m.pool(t2, r, b), pooled)
    # a checkpoint stores the resolved pooling; one from before the field loads as "cls"
    p = tmp_path / "model.pt"
    save_checkpoint(p, m, {})
    assert load_checkpoint(p)[0].cfg.pooling == "mean"
    payload = torch.load(p, weights_only=True)
    mc = json.loads(payload["model_config"])
    del mc["pooling"]
    payload["model_config"] = json.dumps(mc)
    torch.save(payload, p)
    assert load_checkpoint(p)[0].cfg.pooling == "cls"


def test_two_stage_with_no_uni_layers_equals_single(tiny_model, tmp_path):
    """`encoder: two_stage` with `uni_layers: 0` is the single-stream model: the same weights (the
    same seed) give the same ITM logits and hidden states on a fixed batch; a checkpoint records
    the choice and reloads it."""
    two = build_model(ModelConfig(**{**tiny_model.cfg.__dict__, "encoder": "two_stage", "uni_layers": 0}), seed=0).eval()
    b = _batch()
    with torch.no_grad():
        single, staged = tiny_model({**b, "objectives": ()}), two({**b, "objectives": ()})
    torch.testing.assert_close(single["itm_logits"], staged["itm_logits"], atol=1e-6, rtol=1e-6)
    tm, rm = b["text_mask"], b["region_mask"]
    torch.testing.assert_close(single["region_hidden"][rm], staged["region_hidden"][rm], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(single["text_hidden"][tm], staged["text_hidden"][tm], atol=1e-6, rtol=1e-6)
    # one uni-modal layer: a different computation, with its own visual copy of layer 0
    split = build_model(ModelConfig(**{**tiny_model.cfg.__dict__, "encoder": "two_stage", "uni_layers": 1}), seed=0).eval()
    assert len(split.visual_layers) == 1
    with torch.no_grad():
        assert not torch.allclose(split({**b, "objectives": ()})["itm_logits"], single["itm_logits"], atol=1e-4)
    save_checkpoint(tmp_path / "m.pt", split)
    back, _ = load_checkpoint(tmp_path / "m.pt")
    assert (back.cfg.encoder, back.cfg.uni_layers) == ("two_stage", 1)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()({**b, "objectives": ()})["itm_logits"],
                                   split({**b, "objectives": ()})["itm_logits"])  # fmt: skip
    half = build_model(ModelConfig(**{**tiny_model.cfg.__dict__, "encoder": "two_stage", "uni_layers": -1}), seed=0)
    assert half.cfg.uni_layers == 1  # -1 = half of the tiny backbone's 2 layers
