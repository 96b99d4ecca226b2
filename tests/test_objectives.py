"""Objectives, masking statistics per granularity, score-proportional R-P masking, p-MRTC labels,
the w_ITM curriculum weight, mixers and the recipe registry. Small features (16-d) and a small
random BERT keep these fast."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _pretrain_fixtures import make_tiny_dataset, tiny_bert_folder

from raysys.config import ConfigError
from raysys.pretrain.config import PretrainConfig
from raysys.pretrain.curriculum import MIXERS, itm_match_weights, make_mixer, reduce_term
from raysys.pretrain.granularities import (
    Corpus,
    GranularityStream,
    ImageSentenceDataset,
    Link,
    PairedDataset,
    RegionPhraseDataset,
    RegionTagDataset,
    TextOnlyDataset,
    corpus_needs,
    load_corpus,
    tokens_in_span,
)
from raysys.pretrain.loop import check_options, make_step, model_config, prepare
from raysys.pretrain.model import load_tokenizer
from raysys.pretrain.objectives import IGNORE, OBJECTIVES, Objective, ObjectiveOutput, register
from raysys.pretrain.recipes import RECIPES, resolve

N = 10_000  # samples per masking statistic


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny") / "data", n_images=40, dim=16, k=3)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return tiny_bert_folder(tmp_path_factory.mktemp("bert") / "tiny")


def _corpus(tiny_data, cfg, grans, options=None):
    return load_corpus(tiny_data, cfg, corpus_needs(grans, options or {}))


def _draw(ds, n, seed=0, chunk=500):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ds), n)
    out = []
    for lo in range(0, n, chunk):
        out += ds.samples(idx[lo : lo + chunk], rng)
    return out


# ---------------------------------------------------------------- masking statistics


def test_rt_masking_rates(tiny_data, tok):
    cfg = PretrainConfig(rt_tag_mask_prob=0.15, rt_region_mask_prob=0.25)
    ds = RegionTagDataset(_corpus(tiny_data, cfg, ["rt"]), tok, cfg)
    samples = _draw(ds, N)
    masked_tok = np.concatenate([s.mlm_labels != IGNORE for s in samples])
    regions = np.concatenate([s.region_masked for s in samples])
    # tags are masked whole: count tags via the first token of each tag run
    tag_rate = []
    for s in samples:
        img_tags = ds.corpus.tags[ds.corpus.regions(s.image)]
        lens = [len(ds.tag_ids(t)) for t in img_tags]
        starts = np.cumsum([0] + lens[:-1])
        tag_rate.append(s.mlm_labels[starts] != IGNORE)
    tag_rate = np.concatenate(tag_rate).mean()
    assert abs(tag_rate - 0.15) < 0.01, tag_rate
    assert abs(regions.mean() - 0.25) < 0.01, regions.mean()
    # MRC/MRFR targets exactly on masked regions; MRC label = the detected class
    for s in samples[:500]:
        assert ((s.mrc_labels != IGNORE) == s.region_masked).all() and (s.mrfr_mask == s.region_masked).all()
        cls = ds.corpus.class_ids[ds.corpus.regions(s.image)]
        assert (s.mrc_labels[s.region_masked] == cls[s.region_masked]).all()
    # BERT 80/10/10 among masked tokens
    ids = np.concatenate([s.ids for s in samples])
    labels = np.concatenate([s.mlm_labels for s in samples])
    m = labels != IGNORE
    frac_mask = (ids[m] == tok.mask_token_id).mean()
    frac_keep = (ids[m] == labels[m]).mean()
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_keep - 0.1) < 0.02, (frac_mask, frac_keep)
    assert masked_tok.any()


def test_is_negatives_and_mlm_rate(tiny_data, tok):
    cfg = PretrainConfig(is_neg_prob=0.5, mlm_prob=0.15)
    ds = ImageSentenceDataset(_corpus(tiny_data, cfg, ["is"]), tok, cfg)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, len(ds), N)
    samples = ds.samples(idx, rng)
    labels = np.array([s.itm_label for s in samples])
    assert abs((labels == 0).mean() - 0.5) < 0.015
    own = ds.corpus.pair_image[idx]
    img = np.array([s.image for s in samples])
    assert (img[labels == 1] == own[labels == 1]).all()
    assert (img[labels == 0] != own[labels == 0]).all()  # a negative is never its own image
    assert all(s.eligible == (s.itm_label == 1) for s in samples)
    rate = np.concatenate([s.mlm_labels != IGNORE for s in samples]).mean()
    assert abs(rate - 0.15) < 0.01, rate
    # masked alike in negatives and positives (no [MASK] shortcut to the label)
    neg_rate = np.concatenate([s.mlm_labels != IGNORE for s in samples if s.itm_label == 0]).mean()
    assert abs(neg_rate - rate) < 0.01
    assert (np.concatenate([s.region_masked for s in samples]) == 0).all()


def test_pairs_and_text_masking_rates(tiny_data, tok):
    cfg = PretrainConfig(mlm_prob=0.15, mrm_prob=0.2)
    c = _corpus(tiny_data, cfg, ["pairs", "text"], {"pairing": "random"})
    pairs = _draw(PairedDataset(c, tok, cfg), N)
    assert abs(np.concatenate([s.mlm_labels != IGNORE for s in pairs]).mean() - 0.15) < 0.01
    assert abs(np.concatenate([s.region_masked for s in pairs]).mean() - 0.2) < 0.01
    text = _draw(TextOnlyDataset(c, tok, cfg), N)
    assert abs(np.concatenate([s.mlm_labels != IGNORE for s in text]).mean() - 0.15) < 0.01
    assert all(s.image is None for s in text)


def test_mrm_keep_ratio_predicts_some_regions_it_leaves_visible(tiny_data, tok):
    """`mrm_keep_ratio`: of the regions chosen for MRM (rate `mrm_prob`), that share keeps its
    feature; all chosen are still predicted (MRFR; MRC where a class exists). At 0 (the paper's) the
    draws are the ones before the option existed: every chosen region is zeroed."""
    for keep in (0.0, 0.5):
        cfg = PretrainConfig(mrm_prob=0.2, mrm_keep_ratio=keep)
        c = _corpus(tiny_data, cfg, ["pairs"], {"pairing": "random"})
        pairs = _draw(PairedDataset(c, tok, cfg), N)
        chosen = np.concatenate([s.mrfr_mask for s in pairs])
        zeroed = np.concatenate([s.region_masked for s in pairs])
        assert abs(chosen.mean() - 0.2) < 0.01 and not (zeroed & ~chosen).any()
        assert abs((zeroed[chosen]).mean() - (1 - keep)) < 0.03
        assert (np.concatenate([s.mrc_labels for s in pairs]) != IGNORE).sum() == chosen.sum()  # every region has a class
    with pytest.raises(ConfigError, match="mrm_keep_ratio"):
        check_options(PretrainConfig(mrm_keep_ratio=1.0))


def test_rp_one_modality_per_sample_and_rates(tiny_data, tok):
    cfg = PretrainConfig(rp_text_prob=0.5, rp_mask_scale=1.0)
    ds = RegionPhraseDataset(_corpus(tiny_data, cfg, ["rp"]), tok, cfg)
    assert len(ds) > 20
    samples = _draw(ds, N)
    text = np.array([(s.mlm_labels != IGNORE).any() for s in samples])
    region = np.array([bool(s.pmrtc) for s in samples])
    assert not (text & region).any(), "a sample masked both modalities"
    assert ((region) == np.array([s.region_masked.any() for s in samples])).all()
    # each sample draws its side with p=0.5; some draws mask nothing (probability ∝ score < 1)
    assert 0.3 < text.mean() < 0.5 and 0.3 < region.mean() < 0.5
    # only linked material is ever masked: masked tokens lie inside linked phrase spans
    for s in samples[:300]:
        linked = ds.corpus.links[s.item]  # R-P samples record their pair index
        assert all(r in {lk.region for lk in linked} for r in s.pmrtc)
        if (s.mlm_labels != IGNORE).any():
            text = ds.corpus.texts[ds.corpus.pair_text[s.item]]
            offs = np.array(ds.encode([text], offsets=True)["offset_mapping"][0])
            allowed = set()
            for lk in linked:
                allowed |= set(tokens_in_span(offs, lk.char_start, lk.char_end).tolist())
            assert set(np.flatnonzero(s.mlm_labels != IGNORE).tolist()) <= allowed


def _hand_corpus(text, links, n_regions=4, dim=4):
    """A one-pair corpus built in memory: the phrase links are exactly what the test says."""
    return Corpus(
        feature_dim=dim, num_classes=3, image_ids=["a", "b"], offsets=np.array([0, n_regions, 2 * n_regions]),
        features=np.zeros((2 * n_regions, dim), np.float16), loc=np.zeros((2 * n_regions, 5), np.float32),
        class_ids=np.zeros(2 * n_regions, np.int64), tags=["dog"] * (2 * n_regions),
        texts={"t": text}, pair_image=np.array([0]), pair_text=["t"], pair_rank=np.array([0]),
        pair_score=np.array([1.0], np.float32), links=[links],
    )  # fmt: skip


def test_rp_masking_probability_proportional_to_link_score(tok):
    text = "a brown dog chases a red frisbee near an old wooden bench"
    spans = {"a brown dog": 0.2, "a red frisbee": 0.4, "an old wooden bench": 0.8}
    links = [Link(text.index(p), text.index(p) + len(p), r, s, p) for r, (p, s) in enumerate(spans.items())]
    for side, prob in (("text", 1.0), ("region", 0.0)):
        cfg = PretrainConfig(rp_text_prob=prob, rp_mask_scale=1.0)
        ds = RegionPhraseDataset(_hand_corpus(text, links), tok, cfg)
        samples = _draw(ds, N if side == "text" else N // 2, chunk=2000)
        freq = []
        for lk in links:
            if side == "text":
                enc = ds.encode([text], offsets=True)
                toks = tokens_in_span(np.array(enc["offset_mapping"][0]), lk.char_start, lk.char_end)
                freq.append(np.mean([(s.mlm_labels[toks] != IGNORE).all() for s in samples]))
            else:
                freq.append(np.mean([s.region_masked[lk.region] for s in samples]))
        scores = np.array([lk.score for lk in links])
        # P(masked) = min(1, scale · score): proportional to the score
        np.testing.assert_allclose(freq, scores, atol=0.015)
        np.testing.assert_allclose(np.array(freq) / freq[0], scores / scores[0], rtol=0.15)
    # the scale factor multiplies, capped at 1
    cfg = PretrainConfig(rp_text_prob=0.0, rp_mask_scale=2.0)
    ds = RegionPhraseDataset(_hand_corpus(text, links), tok, cfg)
    samples = _draw(ds, 3000, chunk=3000)
    freq = [np.mean([s.region_masked[lk.region] for s in samples]) for lk in links]
    np.testing.assert_allclose(freq, [0.4, 0.8, 1.0], atol=0.03)


def test_pmrtc_labels_are_linked_phrase_subwords(tok):
    text = "a snowboarder holds a frisbee beside the hot dog stand"
    phrases = [("a snowboarder", 0), ("a frisbee", 2), ("the hot dog stand", 3)]
    links = [Link(text.index(p), text.index(p) + len(p), r, 1.0, p) for p, r in phrases]
    cfg = PretrainConfig(rp_text_prob=0.0, rp_mask_scale=1.0)
    ds = RegionPhraseDataset(_hand_corpus(text, links), tok, cfg)
    (s,) = ds.samples(np.array([0]), np.random.default_rng(0))
    assert set(s.pmrtc) == {0, 2, 3}  # score 1 → every linked region masked
    for p, r in phrases:
        expect = tok(p, add_special_tokens=False)["input_ids"]
        assert s.pmrtc[r] == expect, (p, s.pmrtc[r], expect)
        assert len(expect) >= 2  # sub-words, not one token ("snowboarder" splits)
    assert (s.mlm_labels == IGNORE).all()  # region side only
    # and in the padded batch tensor
    batch = ds.collate(np.array([0]), np.random.default_rng(0))
    lab = batch["pmrtc_labels"][0]
    for p, r in phrases:
        expect = tok(p, add_special_tokens=False)["input_ids"]
        row = lab[r][lab[r] != IGNORE].tolist()
        assert row == expect
    assert (lab[1] == IGNORE).all()  # an unlinked region has no p-MRTC target


def test_truncated_phrase_is_not_used(tok):
    text = "one two three four five six seven eight nine ten a dog"
    links = [Link(text.index("a dog"), len(text), 1, 1.0, "a dog")]
    cfg = PretrainConfig(rp_text_prob=1.0, max_text_len=8)
    ds = RegionPhraseDataset(_hand_corpus(text, links), tok, cfg)
    (s,) = ds.samples(np.array([0]), np.random.default_rng(0))
    assert (s.mlm_labels == IGNORE).all()


# ---------------------------------------------------------------- objectives on hand-set tensors


def test_objective_losses_by_hand(tiny_data, tiny_bert, tok):
    cfg = PretrainConfig(model_path=str(tiny_bert), dropout=0.0, granularities=["rt", "rp", "is"])
    setup = prepare(cfg, tiny_data)
    from raysys.pretrain.model import build_model

    model = build_model(setup.model_config, seed=0).eval()
    batch = setup.streams["rt"].batch(0)
    with torch.no_grad():
        out = model(batch)
        th, rh = out["text_hidden"], out["region_hidden"]
        # MLM: per-sample mean CE over masked tokens
        lab = batch["mlm_labels"]
        per = []
        for b in range(lab.shape[0]):
            m = lab[b] != IGNORE
            per.append(F.cross_entropy(model.mlm_logits(th[b][m]), lab[b][m]).item() if m.any() else 0.0)
        torch.testing.assert_close(out["losses"]["mlm"].loss, torch.tensor(per), atol=1e-4, rtol=1e-4)
        # MRFR: mean squared error over feature dims, averaged over masked regions
        mm = batch["mrfr_mask"]
        b = int(mm.any(1).nonzero()[0])
        pred = model.mrfr_head(rh[b][mm[b]])
        expect = (pred - batch["region_feats"][b][mm[b]].float()).pow(2).mean(-1).mean()
        torch.testing.assert_close(out["losses"]["mrfr"].loss[b], expect, atol=1e-5, rtol=1e-5)
        # MRC with a stored class distribution → KL
        probs = torch.softmax(torch.randn(*batch["mrc_labels"].shape, setup.corpus.num_classes), -1)
        kl = model.objectives["mrc"](model, out, {**batch, "mrc_probs": probs})
        sel = batch["mrc_labels"][b] != IGNORE
        logq = F.log_softmax(model.mrc_head(rh[b][sel]), -1)
        p = probs[b][sel]
        torch.testing.assert_close(kl.loss[b], (p * (p.log() - logq)).sum(-1).mean(), atol=1e-5, rtol=1e-5)
        # p-MRTC: mean CE over the phrase's sub-words, through the MLM decoder
        fake = torch.full((1, 2, 3), IGNORE)
        fake[0, 1, :2] = torch.tensor([2003, 3899])
        o = {"region_hidden": rh[:1, :2]}
        got = model.objectives["pmrtc"](model, o, {"pmrtc_labels": fake})
        logp = F.log_softmax(model.mlm_logits(rh[0, 1]), -1)
        torch.testing.assert_close(got.loss[0], -(logp[2003] + logp[3899]) / 2, atol=1e-5, rtol=1e-5)
        assert got.valid.tolist() == [True]


# ---------------------------------------------------------------- w_ITM


def test_itm_weights_hand_set_logits():
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)], [2.0, -1.0], [5.0, -5.0]], requires_grad=True)
    eligible = torch.tensor([True, True, True, False])  # the last is an ITM negative
    w = itm_match_weights(logits, eligible)
    expect = torch.tensor([0.5, 0.75, 1 / (1 + math.exp(3.0)), 1.0])
    torch.testing.assert_close(w, expect)
    assert not w.requires_grad  # computed without gradient
    # weighted reduction: Σ w·l / n_valid, and the weight carries no gradient back to the logits
    loss_param = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    out = ObjectiveOutput(loss_param * 1.0, torch.tensor([True, True, True, True]))
    total = reduce_term(out, itm_match_weights(logits, eligible))
    torch.testing.assert_close(total, (expect * torch.tensor([1.0, 2, 3, 4])).sum() / 4)
    total.backward()
    assert logits.grad is None
    torch.testing.assert_close(loss_param.grad, expect / 4)
    # invalid samples neither count nor weigh
    out = ObjectiveOutput(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([True, False, True, False]))
    torch.testing.assert_close(reduce_term(out, w.detach()), (0.5 * 1 + expect[2] * 3) / 2)


def test_curriculum_loss_and_no_grad_through_weight(tiny_data, tiny_bert):
    """epoch < m: plain sum; epoch ≥ m: R-P/I-S terms weighted per sample by the clean-input match
    probability (negatives 1), R-T unweighted; the ITM head gets no gradient from the weighting."""
    cfg = PretrainConfig(model_path=str(tiny_bert), dropout=0.0, m=1, batch_size=8)
    setup = prepare(cfg, tiny_data)
    from raysys.pretrain.curriculum import match_weights
    from raysys.pretrain.model import build_model

    model = build_model(setup.model_config, seed=0)
    model.train()
    step = make_step(cfg, setup.recipe)
    is_batch, rp_batch, rt_batch = (setup.streams[g].batch(0) for g in ("is", "rp", "rt"))
    with torch.no_grad():
        out = model(is_batch)
        w = match_weights(model, is_batch)
        plain = sum(reduce_term(r) for r in out["losses"].values())
        weighted = sum(reduce_term(r, w) for r in out["losses"].values())
        assert ((w < 1) | ~is_batch["itm_eligible"]).all() and (w[~is_batch["itm_eligible"]] == 1).all()
        l0, c0 = step(model, is_batch, epoch=0)
        l1, c1 = step(model, is_batch, epoch=1)
        lrt0, _ = step(model, rt_batch, epoch=0)
        lrt1, _ = step(model, rt_batch, epoch=1)
    torch.testing.assert_close(l0, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1, weighted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lrt0, lrt1)  # R-T is never weighted
    assert "is.w_itm" in c1 and "is.w_itm" not in c0
    assert c1["is.itm"] == pytest.approx(c0["is.itm"], abs=1e-5)  # components are the unweighted terms
    # an R-P step past m: the weight comes from the ITM head, but no gradient reaches it
    model.zero_grad(set_to_none=True)
    loss, comps = step(model, rp_batch, epoch=1)
    loss.backward()
    assert "rp.w_itm" in comps
    for p in model.itm_head.parameters():
        assert p.grad is None or float(p.grad.abs().max()) == 0.0
    assert float(model.region_embedding.feature.weight.grad.abs().max()) > 0
    # with w_itm off the weighting never applies
    step_off = make_step(PretrainConfig(model_path=str(tiny_bert), w_itm=False), resolve(PretrainConfig(w_itm=False)))
    with torch.no_grad():
        l_off, c_off = step_off(model.eval(), is_batch, epoch=5)
    assert "is.w_itm" not in c_off


def test_loss_weights_scale_only_their_term(tiny_data, tiny_bert):
    """`loss_weights.itm=3` adds twice the ITM term to the loss; the components stay unweighted."""
    cfg = PretrainConfig(model_path=str(tiny_bert), dropout=0.0, batch_size=8)
    setup = prepare(cfg, tiny_data)
    from raysys.pretrain.model import build_model

    model = build_model(setup.model_config, seed=0).eval()
    batch = setup.streams["is"].batch(0)
    heavy = PretrainConfig(model_path=str(tiny_bert), dropout=0.0, batch_size=8, loss_weights={"itm": 3.0, "mrc": 0.0})
    with torch.no_grad():
        l1, c1 = make_step(cfg, setup.recipe)(model, batch, epoch=0)
        l3, c3 = make_step(heavy, setup.recipe)(model, batch, epoch=0)
    assert {k: v for k, v in c1.items() if k != "loss"} == {k: v for k, v in c3.items() if k != "loss"}
    assert c1["is.itm"] > 0 and c3["loss"] == pytest.approx(float(l3))
    assert float(l3 - l1) == pytest.approx(2.0 * c1["is.itm"], rel=1e-5)


# ---------------------------------------------------------------- mixers, streams, registries


def test_mixers_are_pure_functions_of_step():
    nb = {"rt": 3, "rp": 5, "is": 2}
    rr = make_mixer("round_robin", list(nb), nb, 0)
    assert [rr.at(s)[0][0] for s in range(6)] == ["rt", "rp", "is", "rt", "rp", "is"]
    assert [rr.at(s)[0][1] for s in range(6)] == [0, 0, 0, 1, 1, 1]
    pr = make_mixer("proportional", list(nb), nb, 7)
    assert pr.steps_per_epoch == 10
    for e in range(3):
        slots = [pr.at(e * 10 + s)[0] for s in range(10)]
        for g, n in nb.items():
            js = sorted(j for name, j in slots if name == g)
            assert js == list(range(e * n, (e + 1) * n))  # each batch of g exactly once per epoch
    fresh = make_mixer("proportional", list(nb), nb, 7)
    assert [fresh.at(s) for s in (17, 3, 25)] == [pr.at(s) for s in (17, 3, 25)]
    assert make_mixer("joint", list(nb), nb, 0).at(4) == [("rt", 4), ("rp", 4), ("is", 4)]
    assert set(MIXERS) >= {"round_robin", "proportional", "joint"}
    with pytest.raises(ConfigError):
        make_mixer("nope", list(nb), nb, 0)


def test_streams_deterministic_and_sharded(tiny_data, tok):
    cfg = PretrainConfig(batch_size=4)
    c = _corpus(tiny_data, cfg, ["rt"])
    a = GranularityStream(RegionTagDataset(c, tok, cfg), 4, seed=3)
    b = GranularityStream(RegionTagDataset(c, tok, cfg), 4, seed=3)
    for j in (0, 5, len(a) + 1):
        x, y = a.batch(j), b.batch(j)
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["region_masked"], y["region_masked"])
    # one epoch visits every sample once
    seen = np.concatenate([a.indices(j) for j in range(len(a))])
    assert sorted(seen.tolist()) == list(range(len(a.dataset)))
    # shards by (rank, world_size) partition the images
    shards = [load_corpus(tiny_data, cfg, set(), r, 3).image_ids for r in range(3)]
    assert sorted(sum(shards, [])) == sorted(c.image_ids) and not set(shards[0]) & set(shards[1])


def test_corpus_excludes_eval_images_and_respects_k(tiny_data):
    import pyarrow.compute as pc

    from raysys.contract import read_table

    gold = read_table(tiny_data, "gold")
    eval_ids = set(pc.filter(gold.column("image_id"), pc.equal(gold.column("split"), "eval")).to_pylist())
    assert eval_ids
    c = load_corpus(tiny_data, PretrainConfig(k=2), {"pairs", "phrases"})
    assert not eval_ids & set(c.image_ids)
    assert c.pair_rank.max() == 1 and len(c.pair_text) == 2 * c.n_images
    c_all = load_corpus(tiny_data, PretrainConfig(exclude_eval=False, k=3), {"pairs"})
    assert eval_ids <= set(c_all.image_ids) and c_all.pair_rank.max() == 2


def test_paired_ratio_fraction(tiny_data, tok):
    for r in (0.0, 0.5, 1.0):
        c = load_corpus(tiny_data, PretrainConfig(paired_ratio=r), {"gold_pairs"})
        frac = c.paired_true.mean()
        assert abs(frac - r) < 0.05, (r, frac)
        if r == 1.0:  # every pair is a true caption of its image
            assert all(c.image_ids[i][2:] == t[2:6] for i, t in c.paired)


def test_recipe_registry():
    assert {"base", "muvla", "random_pairs", "paired_ratio", "round_robin"} <= set(RECIPES)
    assert resolve(PretrainConfig()).granularities == ("rt", "rp", "is")
    assert resolve(PretrainConfig(granularities=["is", "rt"])).granularities == ("rt", "is")
    assert resolve(PretrainConfig(recipe="rt+rp")).granularities == ("rt", "rp")
    assert not resolve(PretrainConfig(recipe="rt+rp")).w_itm  # no I-S → no trained matcher → no weighting
    assert resolve(PretrainConfig(recipe="round_robin")).granularities == ("text", "image")
    assert not resolve(PretrainConfig(recipe="base")).update
    with pytest.raises(ConfigError):
        resolve(PretrainConfig(recipe="nope"))
    with pytest.raises(ConfigError):
        resolve(PretrainConfig(granularities=["rt", "xx"]))
    with pytest.raises(ConfigError):
        resolve(PretrainConfig(recipe="paired_ratio", paired_ratio=1.5))


def test_objective_registry_plugs_in(tiny_data, tiny_bert):
    """A new objective registers by name and runs without touching the core."""

    @register("test_cls_norm")
    class ClsNorm(Objective):
        def __init__(self, model):
            super().__init__(model)
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, model, out, batch):
            v = out["text_hidden"][:, 0].pow(2).mean(-1) * self.scale
            return ObjectiveOutput(v, torch.ones_like(v, dtype=torch.bool))

    try:
        cfg = PretrainConfig(model_path=str(tiny_bert), extra_objectives=["test_cls_norm"])
        setup = prepare(cfg, tiny_data)
        assert "test_cls_norm" in model_config(cfg, 16, 6).objectives
        from raysys.pretrain.model import build_model

        model = build_model(setup.model_config, seed=0)
        batch = {**setup.streams["rt"].batch(0), "objectives": ("mlm", "test_cls_norm")}
        loss, comps = make_step(cfg, setup.recipe)(model, batch, 0)
        assert "rt.test_cls_norm" in comps
        loss.backward()
        assert model.objectives["test_cls_norm"].scale.grad is not None
    finally:
        OBJECTIVES.pop("test_cls_norm", None)
