"""MVPTR (papers/002) on the retrieved pairs: hand-computed losses, masking rates, hard-negative
sampling, phrase concepts, and the `mvptr` / `muvla+vsc` recipes end to end."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from _pretrain_fixtures import make_tiny_dataset, tiny_bert_folder

from raysys.checkpoints import local_model_path
from raysys.cli import main
from raysys.config import ConfigError
from raysys.corpus.concepts import build_concepts, load_spacy, read_concepts, sentence_concepts
from raysys.corpus.embedding import read_embeddings
from raysys.evaluate.downstream import load_images
from raysys.evaluate.towers import embed_tower_images
from raysys.evaluate.zeroshot import REQUIRED_KEYS, ZeroShotConfig, evaluate_zeroshot
from raysys.experiments.export import export_checkpoint, fixed_batch, load_exported
from raysys.pretrain.model import ModelConfig, build_model, load_checkpoint, load_tokenizer, save_checkpoint
from raysys.pretrain.mvptr import ConceptMatcher, Extra, chain_mask, collate_concepts, mcr_select
from raysys.pretrain.objectives import (
    IGNORE,
    in_batch_negatives,
    negative_distribution,
    sample_hard_negatives,
    vsc_per_sample,
    wpg_hinge,
    wpg_similarity,
)


def test_vsc_on_a_3x3_similarity_matrix_by_hand():
    S = torch.tensor([[0.9, 0.1, 0.2], [0.3, 0.8, 0.0], [0.1, 0.4, 0.7]], dtype=torch.float64)  # image i, text k
    tau = 0.1
    e = [[math.exp(x / tau) for x in row] for row in S.tolist()]
    expect = []
    for i in range(3):
        v2s = e[i][i] / sum(e[i])  # image i over the texts (row)
        s2v = e[i][i] / sum(e[j][i] for j in range(3))  # text i over the images (column)
        expect.append(-(math.log(v2s) + math.log(s2v)) / 2)
    got = vsc_per_sample(S, 1.0 / tau)
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-5)
    # L_vsc = the mean; row 0 by hand: exp(9)/(exp(9)+exp(1)+exp(2)) and exp(9)/(exp(9)+exp(3)+exp(1))
    r0 = -(math.log(math.exp(9) / (math.exp(9) + math.exp(1) + math.exp(2)))
           + math.log(math.exp(9) / (math.exp(9) + math.exp(3) + math.exp(1)))) / 2  # fmt: skip
    assert float(got[0]) == pytest.approx(r0, rel=1e-5)
    # a pair of the same image is no negative: excluding (0, 1) and (1, 0) drops those terms
    excl = torch.zeros(3, 3, dtype=torch.bool)
    excl[0, 1] = excl[1, 0] = True
    r0x = -(math.log(math.exp(9) / (math.exp(9) + math.exp(2))) + math.log(math.exp(9) / (math.exp(9) + math.exp(1)))) / 2
    assert float(vsc_per_sample(S, 1.0 / tau, excl)[0]) == pytest.approx(r0x, rel=1e-5)


def test_wpg_aggregation_and_hinge_on_hand_set_embeddings():
    s = 1 / math.sqrt(2)
    phrases = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])  # the third phrase is masked out
    pmask = torch.tensor([[True, True, False]])
    pos_regions = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 9.0]]])  # the third region is padding
    rmask = torch.tensor([[True, True, False]])
    pos, ok = wpg_similarity(phrases, pmask, pos_regions, rmask)
    # phrase 1: max(1, s) = 1; phrase 2: max(0, s) = s  →  (1 + s) / 2
    assert bool(ok[0]) and float(pos[0]) == pytest.approx((1 + s) / 2, rel=1e-6)
    neg_regions = torch.tensor([[[0.0, 3.0], [-1.0, 0.0], [0.0, 0.0]]])
    neg, _ = wpg_similarity(phrases, pmask, neg_regions, torch.tensor([[True, True, False]]))
    assert float(neg[0]) == pytest.approx((0.0 + 1.0) / 2, rel=1e-6)  # phrase 1: max(0, -1); phrase 2: 1
    # hinge: max(0, 0.2 + S(V', S) − S(V, S))
    assert float(wpg_hinge(pos, neg)[0]) == pytest.approx(max(0.0, 0.2 + 0.5 - (1 + s) / 2), abs=1e-7) == 0.0
    assert float(wpg_hinge(neg, pos)[0]) == pytest.approx(0.2 + (1 + s) / 2 - 0.5, rel=1e-6)
    # no phrase → not a WPG sample
    _, ok0 = wpg_similarity(phrases, torch.zeros(1, 3, dtype=torch.bool), pos_regions, rmask)
    assert not bool(ok0[0])


def test_mcr_masks_a_quarter_of_the_tags_with_80_10_10():
    rng = np.random.default_rng(0)
    sel, mode = mcr_select(40000, rng)
    assert abs(sel.mean() - 0.25) < 0.02
    m = mode[sel]
    assert abs((m == 0).mean() - 0.8) < 0.02 and abs((m == 1).mean() - 0.1) < 0.02


def test_hard_negative_sampling_follows_the_softmax():
    sim = torch.tensor([[0.9, 0.5, 0.1, 0.3], [0.2, 0.8, 0.6, 0.0], [0.4, 0.4, 0.9, 0.1], [0.3, 0.2, 0.1, 0.7]])
    scale = 5.0
    eye = torch.eye(4, dtype=torch.bool)
    p = negative_distribution(sim, scale, eye)
    # row 0 by hand: softmax of 5·(0.5, 0.1, 0.3) over the three other images
    z = [math.exp(2.5), math.exp(0.5), math.exp(1.5)]
    np.testing.assert_allclose(p[0, 1:].numpy(), [v / sum(z) for v in z], rtol=1e-5)
    assert float(p[0, 0]) == 0.0
    n = 20000
    torch.manual_seed(0)
    idx, valid = sample_hard_negatives(p.repeat_interleave(n, 0))
    assert bool(valid.all())
    freq = torch.stack([torch.bincount(idx[r * n : (r + 1) * n], minlength=4).float() / n for r in range(4)])
    np.testing.assert_allclose(freq.numpy(), p.numpy(), atol=0.015)
    assert not bool((freq * eye).any())  # never the positive itself
    # a row with no allowed candidate has no negative
    _, v = sample_hard_negatives(negative_distribution(sim[:1, :1], scale, torch.ones(1, 1, dtype=torch.bool)))
    assert not bool(v[0])


def test_in_batch_wpg_negatives_are_uniform_over_the_other_images():
    """`mvptr.wpg_negative: in_batch` (the official code's `--wra_mod sample`): for each text a
    uniform draw among the batch's pairs of another image; a pair of the same image never."""
    image = torch.tensor([0, 0, 1, 2, 3])  # pairs 0 and 1 show the same image
    not_neg = (image.unsqueeze(0) == image.unsqueeze(1))  # self and same image
    n = 20000
    torch.manual_seed(0)
    idx, valid = in_batch_negatives(not_neg.repeat_interleave(n, 0))
    assert bool(valid.all())
    freq = torch.stack([torch.bincount(idx[r * n : (r + 1) * n], minlength=5).float() / n for r in range(5)])
    expect = (~not_neg).float() / (~not_neg).float().sum(-1, keepdim=True)  # row 0: 1/3 on pairs 2, 3, 4
    np.testing.assert_allclose(freq.numpy(), expect.numpy(), atol=0.015)
    assert not bool((freq * not_neg).any())
    _, v = in_batch_negatives(torch.ones(1, 2, dtype=torch.bool))  # a batch of one image: no negative
    assert not bool(v[0])


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("")


def test_chain_masking_masks_the_concepts_of_a_masked_token(tokenizer):
    m = ConceptMatcher(["red car", "tree", "boat"], tokenizer)
    ids = np.array(tokenizer("a red car parks near a tree", add_special_tokens=False)["input_ids"])
    toks = tokenizer.convert_ids_to_tokens(ids.tolist())
    found = m.find(ids)
    assert [m.concepts[c] for c, _ in found] == ["red car", "tree"]  # "boat" is not in the sentence
    assert [toks[i] for i in found[0][1]] == ["red", "car"]  # a two-token concept
    car = np.array([t == "car" for t in toks])
    assert chain_mask(car, [p for _, p in found]).tolist() == [True, False]  # masking "car" masks "red car"
    tree = np.array([t == "tree" for t in toks])
    assert chain_mask(tree, [p for _, p in found]).tolist() == [False, True]
    parks = np.array([t == "parks" for t in toks])
    assert chain_mask(parks, [p for _, p in found]).tolist() == [False, False]
    # a chain-masked concept enters the model as [MASK]; its clean ids stay for the towers
    e = Extra([m.token_ids(c) for c, _ in found], np.array([True, False]), [], [], np.zeros(0, np.int64), 0)
    b = collate_concepts([e], tokenizer.mask_token_id)
    assert b["concept_ids"][0, 0].tolist() == [tokenizer.mask_token_id, IGNORE]
    assert b["clean_concept_ids"][0, 0].tolist() == m.token_ids(found[0][0])
    assert b["concept_ids"][0, 1].tolist() == b["clean_concept_ids"][0, 1].tolist()


def test_phrase_concepts_from_the_dependency_parse():
    doc = load_spacy()("A young boy in a red shirt is riding a brown horse.")
    got = sentence_concepts(doc)
    assert ("young boy", "noun_chunk") in got and ("red shirt", "adj_noun") in got
    assert ("boy riding horse", "svo") in got
    assert not any(c.startswith("a ") for c, _ in got)  # determiners dropped


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvptr")
    return make_tiny_dataset(root / "data", n_images=40, dim=16, k=3), tiny_bert_folder(root / "bert")


def test_concept_vocabulary_is_built_once_and_recorded(tiny):
    data, _ = tiny
    s = build_concepts(data, min_count=5)
    assert s["count"] > 0 and s["min_count"] == 5
    vocab = read_concepts(data)
    assert len(vocab) == s["count"] and "photo" in vocab
    man = json.loads((data / "manifest.json").read_text())
    assert man["concepts"]["count"] == s["count"]


def _pretrain(capsys, tmp_path, data, bert, recipe: str, *extra: str) -> dict:
    capsys.readouterr()
    args = ["pretrain", "--local", "--data", str(data), "--recipe", recipe, "--steps", "3", "--out", str(tmp_path / recipe),
            f"model_path={bert}", "batch_size=8", "log_every=0", "dropout=0.0", "min_concept_count=3", *extra]  # fmt: skip
    assert main(args) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def mvptr_ckpt(tiny, tmp_path_factory):
    data, bert = tiny
    out = tmp_path_factory.mktemp("mvptr-ckpt")
    assert main(["pretrain", "--local", "--data", str(data), "--recipe", "mvptr", "--steps", "3", "--out", str(out),
                 f"model_path={bert}", "batch_size=8", "log_every=0", "min_concept_count=3"]) == 0  # fmt: skip
    return out / "model.pt"


def test_mvptr_recipe_prints_every_term_and_records_the_encoder(tiny, tmp_path, capsys):
    data, bert = tiny
    res = _pretrain(capsys, tmp_path, data, bert, "mvptr")
    for term in ("mcr", "vsc", "wpg", "itm_hard", "mlm"):
        v = res[f"mvptr.{term}"]
        assert math.isfinite(v) and v >= 0, (term, v)
    model, _ = load_checkpoint(res["checkpoint"])
    assert model.cfg.encoder == "two_stage" and model.cfg.uni_layers == 1  # half the tiny BERT's 2 layers
    assert {"mcr", "vsc", "wpg", "itm_hard"} <= set(model.cfg.objectives)


def test_wpg_in_batch_negatives_run_and_are_recorded(tiny, tmp_path, capsys):
    data, bert = tiny
    res = _pretrain(capsys, tmp_path, data, bert, "mvptr", "mvptr.wpg_negative=in_batch")
    assert math.isfinite(res["mvptr.wpg"]) and res["mvptr.wpg"] >= 0
    model, _ = load_checkpoint(res["checkpoint"])
    assert model.cfg.objective_options["mvptr"] == {"wpg_negative": "in_batch"}
    assert model.objectives["wpg"].negative == "in_batch"
    # a typo is refused when the config loads, before any data is read
    assert main(["pretrain", "--local", "--data", str(data), "--recipe", "mvptr", "mvptr.wpg_negative=random"]) != 0
    assert "mvptr.wpg_negative: 'random' is not one of" in capsys.readouterr().err


def test_muvla_vsc_recipe_adds_vsc_on_is_batches(tiny, tmp_path, capsys):
    data, bert = tiny
    res = _pretrain(capsys, tmp_path, data, bert, "muvla+vsc", "uni_layers=2")
    assert math.isfinite(res["is.vsc"]) and "rt.mlm" in res and "is.itm" in res
    assert not any(k.endswith(".vsc") and not k.startswith("is.") for k in res["components"])
    model, _ = load_checkpoint(res["checkpoint"])
    assert (model.cfg.encoder, model.cfg.uni_layers) == ("two_stage", 2)


def test_towers_zero_shot_ranks_by_cosine_and_reranks_with_itm(tiny, mvptr_ckpt):
    """`coarse=towers` ranks every pair by the towers' cosine; re-ranking every candidate with the
    ITM head gives exactly the single-stream evaluation (`coarse=none`) of the same checkpoint."""
    data, bert = tiny
    towers = evaluate_zeroshot(str(mvptr_ckpt), data, ZeroShotConfig(coarse="towers", mlflow=False))
    assert set(REQUIRED_KEYS) <= set(towers) and towers["n_pairs_scored"] == 0
    assert towers["encoder"] == "two_stage" and towers["towers_pairs_per_s"] > 0
    full = evaluate_zeroshot(str(mvptr_ckpt), data, ZeroShotConfig(coarse="none", ray="never", mlflow=False))
    every = towers["n_images"] + towers["n_texts"]
    rr = evaluate_zeroshot(str(mvptr_ckpt), data, ZeroShotConfig(coarse="towers", rerank_top_n=every, mlflow=False))
    for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "i2t_mean_rank", "t2i_mean_rank", "itm_auc"):
        assert rr[k] == pytest.approx(full[k], abs=1e-4), k
    # base towers: the backbone's first layers as the text tower, a copy of them as the visual one
    base = evaluate_zeroshot("base", data, ZeroShotConfig(coarse="towers", model_path=str(bert), mlflow=False,
                                                          single_stream_sample=2))  # fmt: skip
    assert base["uni_layers"] == 1 and base["single_stream_pairs_per_s"] > 0
    with pytest.raises(ConfigError, match="two_stage"):
        single = mvptr_ckpt.parent / "single.pt"
        save_checkpoint(single, build_model(ModelConfig(model_path=str(bert), feature_dim=16, num_classes=6)))
        evaluate_zeroshot(str(single), data, ZeroShotConfig(coarse="towers", mlflow=False))


def test_a_two_stage_checkpoint_exports_and_reloads(mvptr_ckpt, tmp_path):
    model, _ = load_checkpoint(mvptr_ckpt)
    export_checkpoint(mvptr_ckpt, tmp_path / "export")
    back = load_exported(tmp_path / "export")
    assert (back.cfg.encoder, back.cfg.uni_layers, len(back.visual_layers)) == ("two_stage", 1, 1)
    batch = fixed_batch(model, load_tokenizer(model.cfg.model_path))
    with torch.no_grad():
        torch.testing.assert_close(back(batch)["itm_logits"], model.eval()(batch)["itm_logits"], atol=1e-5, rtol=1e-5)


def test_retrieve_with_the_towers_of_a_two_stage_checkpoint(ray_session, tiny, mvptr_ckpt, tmp_path, capsys):
    """`raysys retrieve --encoder CKPT`: the stored vectors are the towers' own, each image's rank-0
    text is its highest-cosine one, the provenance names the checkpoint, and a re-run resumes."""
    data = tmp_path / "data"
    shutil.copytree(tiny[0], data)
    args = ["retrieve", "--data", str(data), "--encoder", str(mvptr_ckpt), "--k", "3", "--shards", "1"]
    capsys.readouterr()
    assert main(args) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["embed"]["images"]["encoder"].startswith("towers:") and rep["embed"]["images"]["computed"] == 1
    img_ids, img = read_embeddings(data, "images")
    txt_ids, txt = read_embeddings(data, "texts")
    assert len(img_ids) == 40 and len(txt_ids) == 120  # every image: the towers need no tag query
    model, _ = load_checkpoint(mvptr_ckpt)
    tok = load_tokenizer(model.cfg.model_path)
    own = embed_tower_images(model.eval(), load_images(data, img_ids.to_pylist()[:5]), tok, 8, torch.device("cpu"))
    np.testing.assert_allclose(img[:5], own, atol=1e-5)
    pairs = pq.read_table(data / "pairs").to_pandas()
    top = pairs[pairs["rank"] == 0].set_index("image_id")["text_id"]
    best = np.asarray(txt_ids.to_pylist())[(img @ txt.T).argmax(1)]
    assert (top.loc[img_ids.to_pylist()].to_numpy() == best).mean() >= 0.95  # ties may order differently
    man = json.loads((data / "manifest.json").read_text())
    assert [p for p in man["provenance"] if p["stage"] == "retrieval"][-1]["model"] == rep["embed"]["images"]["encoder"]
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["embed"]["images"]["computed"] == 0 and again["pairs_shards_computed"] == 0
    single = tmp_path / "single.pt"
    save_checkpoint(single, build_model(ModelConfig(model_path=str(tiny[1]), feature_dim=16, num_classes=6)))
    assert main(["retrieve", "--data", str(data), "--encoder", str(single)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "single-stream" in err[0]


TWO_STAGE_TERMS = {
    "mvptr": ("mvptr.mcr", "mvptr.vsc", "mvptr.wpg", "mvptr.itm_hard", "mvptr.mlm"),
    "muvla+vsc": ("is.vsc", "is.itm"),
    # pair_epochs=1: epoch 1 adds images and texts alone (UNIMO-2's curriculum, on the stream)
    "unimo2": ("unimo2_pairs.grounded", "unimo2_pairs.span_mlm", "unimo2_images.grounded", "unimo2_texts.span_mlm"),
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(TWO_STAGE_TERMS))
def test_the_two_stage_recipes_train_on_ray_train(ray_session, tiny, recipe, tmp_path):
    """Two DDP workers on the streamed input: every term of the recipe is logged, the checkpoint
    records the two-stage encoder, and its towers rank (coarse=towers) like any checkpoint."""
    from raysys.pretrain.config import TrainConfig, Unimo2Config
    from raysys.pretrain.ray_train import fit

    data, bert = tiny
    cfg = TrainConfig(recipe=recipe, model_path=str(bert), steps=4, steps_per_epoch=2, batch_size=8, workers=2,
                      cpus_per_worker=0.5, window_images=16, min_concept_count=3, tracking_uri="none",
                      log_every=0, mixing="joint",  # joint: every step has each of the epoch's granularities
                      unimo2=Unimo2Config(pair_epochs=1, grounded_k=4, dictionary_size=32))  # fmt: skip
    res = fit(cfg, data, recipe.replace("+", "_"), tmp_path / "storage")
    assert res["complete"] and res["steps"] == 4
    for t in TWO_STAGE_TERMS[recipe]:
        assert math.isfinite(res["components"].get(t, math.nan)), (t, sorted(res["components"]))
    ckpt = local_model_path(res["checkpoint"])
    model, extra = load_checkpoint(ckpt)
    assert model.cfg.encoder == "two_stage" and extra["recipe"] == recipe
    z = evaluate_zeroshot(str(ckpt), data, ZeroShotConfig(coarse="towers", mlflow=False))
    assert z["encoder"] == "two_stage" and 0 <= z["t2i_r5"] <= 100


def test_the_driver_builds_one_concept_vocabulary_for_every_window(tiny, tmp_path):
    """Streamed `mvptr`: the plan (the driver, once) builds DATA/concepts.json at the run's
    `min_concept_count`; a second plan reuses it; another count rebuilds it."""
    from raysys.pretrain.config import PretrainConfig
    from raysys.pretrain.recipes import resolve
    from raysys.pretrain.stream import plan

    data = tmp_path / "data"
    shutil.copytree(tiny[0], data, ignore=shutil.ignore_patterns("concepts.json"))
    cfg = PretrainConfig(recipe="mvptr", min_concept_count=4, window_images=8)
    plan(data, cfg, resolve(cfg))
    f = data / "concepts.json"
    first = f.stat().st_mtime_ns
    assert json.loads(f.read_text())["min_count"] == 4 and read_concepts(data)
    plan(data, cfg, resolve(cfg))
    assert f.stat().st_mtime_ns == first
    cfg5 = PretrainConfig(recipe="mvptr", min_concept_count=5, window_images=8)
    plan(data, cfg5, resolve(cfg5))
    assert json.loads(f.read_text())["min_count"] == 5
