"""Zero-shot image↔text retrieval with the ITM head: did pre-training learn the alignment?

No fine-tuning: every (image, text) pair of the `gold/` evaluation split is scored by the
pre-trained model's image–text matching head (score = logit(match) − logit(no match)), then

* image→text (i2t): for every image, rank all texts; a hit is any of its gold captions;
* text→image (t2i): for every text, rank all images; a hit is its gold image;

R@1/5/10 (percent), mean and median rank (tie policy in `raysys.evaluate.metrics`: pessimistic), and the
ITM ROC-AUC of true pairs against shuffled pairs (each gold caption with an image drawn from the
other evaluation images).

Cost and scale. A single-stream model must encode every pair: I images × T texts forward passes
(1,000 × 5,000 = 5 M for Flickr8k dev). Pairs are scored in batches, and, when there are at least
`shard_min_pairs` of them, sharded over Ray actors (each rebuilds the model from the checkpoint
path once, then scores chunks; on a GPU cluster give them `gpus_per_worker`). Two knobs keep CPU
runs affordable, and both are reported with the numbers:

* `max_images`: a seeded sample of the split's images (with all their captions);
* `coarse="tags"`: a coarse stage pre-selects, per query, the `coarse_top_n` candidates by cosine
  between the image's tag query and the sentence (the retrieval stage's Sentence-BERT embeddings,
  reused from `DATA/embeddings/` when present). Only those pairs get ITM scores; a query's other
  candidates rank after them in coarse order. The coarse stage is the same for every model, so
  comparisons stay fair, but recall is then capped by the coarse stage's own recall@N, which is
  reported (`coarse_i2t_recall`, `coarse_t2i_recall`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.compute as pc
import torch

from raysys import progress, tracking
from raysys.config import ConfigError, to_dict
from raysys.contract import ContractError, iter_table, read_manifest, read_table, shard_files
from raysys.corpus.embedding import encode_deterministic, query_string, read_embeddings
from raysys.corpus.embedding import load_model as load_embedder
from raysys.evaluate.downstream import (
    ImageIndex,
    ImageSet,
    ModelSource,
    check_feature_dim,
    checkpoint_extra,
    image_ids,
    load_images,
    load_model,
    local_checkpoint,
    log_mlflow,
    numeric,
    parent_run_id,
    pick_device,
    score_pairs,
    text_settings,
    tokenize,
)
from raysys.evaluate.metrics import TIE_POLICIES, TiePolicy, gold_ranks, rank_summary, roc_auc
from raysys.evaluate.towers import embed_tower_images, embed_tower_texts
from raysys.pretrain.model import ModelConfig, build_model, load_checkpoint, load_tokenizer
from raysys.raycluster import ensure_ray

log = logging.getLogger(__name__)

#: Keys every zero-shot result carries (the CLI's last JSON line, `summary["zeroshot"][model]`).
REQUIRED_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "itm_auc", "n_images", "n_texts")


@dataclass
class ZeroShotConfig:
    """Options of `raysys evaluate zeroshot` and of the pipeline's `zeroshot` stage."""

    split: str = "eval"  # gold split to evaluate ("eval": demo world; "dev": Flickr8k import)
    max_images: int = 0  # 0 = every image of the split; N = a seeded sample of N images
    captions_per_image: int = 0  # 0 = all gold captions of each image
    coarse: Literal["none", "tags", "towers"] = "none"  # tags: sentence-embedding pre-selection; towers: two-tower cosine
    coarse_top_n: int = 20  # candidates per query kept by the coarse stage
    embed_model: str = ""  # sentence embedder of the coarse stage ("" = packaged MiniLM)
    batch_size: int = 128  # pairs per forward pass
    max_text_len: int = 0  # 0 = the checkpoint's pre-training value (40)
    max_regions: int = 0  # 0 = the checkpoint's pre-training value (36)
    tie_policy: TiePolicy = "pessimistic"  # pessimistic | optimistic | average (raysys.evaluate.metrics)
    ray: Literal["auto", "always", "never"] = "auto"  # auto: shard over Ray actors when n_pairs >= shard_min_pairs
    shard_min_pairs: int = 20000
    workers: int = 0  # Ray actors; 0 = cluster CPUs / cpus_per_worker (or GPUs / gpus_per_worker)
    chunk_pairs: int = 2048  # pairs per actor call
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    threads: int = 0  # torch CPU threads in this process; 0 = torch's default
    device: str = "auto"  # auto | cpu | cuda
    base_seed: int = 0  # seed of the `base` model's fresh heads
    model_path: str = ""  # backbone of `base` ("" = packaged MiniLM)
    base_layers: int = 0  # encoder layers of `base` (0 = all)
    seed: int = 0  # image sample and shuffled negatives
    mlflow: bool = True  # log each evaluation as a new child run of the checkpoint's pre-training run
    tracking_uri: str = ""  # MLFLOW_TRACKING_URI wins; "" = the checkpoint's store, else sqlite:///./mlflow.db
    experiment: str = "raysys"  # experiment of a new run when the checkpoint has no run
    parent_run_id: str = ""  # "" = the run recorded in the checkpoint
    # coarse=towers (two-stage checkpoints): rank by the uni-modal towers' cosine
    rerank_top_n: int = 0  # towers: re-rank each query's top N with the cross-modal ITM head (0 = cosine only)
    base_uni_layers: int = -1  # towers: uni-modal layers of `base` (-1 = half the backbone's)
    single_stream_sample: int = 0  # towers: also time ITM scoring of every pair of N images (the single-stream rate)

    def check(self) -> None:
        """The config loader checks the Literal fields; this also catches a config built in Python."""
        if self.coarse not in ("none", "tags", "towers"):
            raise ConfigError(f"zeroshot.coarse: {self.coarse!r} is not one of ['none', 'tags', 'towers']")
        if self.tie_policy not in TIE_POLICIES:
            raise ConfigError(f"zeroshot.tie_policy: {self.tie_policy!r} is not one of {list(TIE_POLICIES)}")
        if self.ray not in ("auto", "always", "never"):
            raise ConfigError(f"zeroshot.ray: {self.ray!r} is not one of ['auto', 'always', 'never']")
        if self.batch_size < 1 or self.coarse_top_n < 1 or self.chunk_pairs < 1:
            raise ConfigError("zeroshot.batch_size, coarse_top_n and chunk_pairs must be >= 1")


# ---------------------------------------------------------------- the evaluation set


@dataclass
class EvalSet:
    image_ids: list[str]  # images table ids
    text_ids: list[str]
    texts: list[str]
    text_image: np.ndarray  # (T,) index into image_ids of each text's gold image


def eval_set(data: str | Path, cfg: ZeroShotConfig) -> EvalSet:
    """The gold pairs of `cfg.split`, resolved against the images table, sampled and ordered."""
    root = Path(data)
    if not shard_files(root, "gold"):
        raise ContractError(root / "gold", None, "gold", "no gold pairs: zero-shot retrieval needs true (image, text) pairs")
    gold = read_table(root, "gold")
    gold = gold.filter(pc.equal(gold.column("split"), cfg.split))
    if gold.num_rows == 0:
        splits = sorted(set(read_table(root, "gold", columns=["split"]).column(0).to_pylist()))
        raise ContractError(root / "gold", None, "split", f"no gold pairs in split {cfg.split!r} (splits here: {splits})")
    index = ImageIndex(image_ids(root))
    by_image: dict[str, list[str]] = {}
    unresolved = 0
    for iid, tid in zip(gold.column("image_id").to_pylist(), gold.column("text_id").to_pylist()):
        real = index.resolve(iid)
        if real is None:
            unresolved += 1
            continue
        by_image.setdefault(real, []).append(tid)
    if not by_image:
        raise ContractError(root / "gold", None, "image_id", f"none of the {cfg.split!r} gold images is in images/")
    if unresolved:
        log.warning("zeroshot: %d gold pairs name images missing from images/ (skipped)", unresolved)
    images = sorted(by_image)
    if cfg.max_images and cfg.max_images < len(images):
        rng = np.random.default_rng([cfg.seed, 0x25E7])
        images = sorted(rng.choice(images, size=cfg.max_images, replace=False).tolist())
    pairs = []
    for k, iid in enumerate(images):
        tids = sorted(set(by_image[iid]))
        if cfg.captions_per_image:
            tids = tids[: cfg.captions_per_image]
        pairs += [(tid, k) for tid in tids]
    want = {t for t, _ in pairs}
    text_of: dict[str, str] = {}
    for batch in iter_table(root, "texts", batch_size=65536, columns=["text_id", "text"]):
        for tid, txt in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            if tid in want:
                text_of[tid] = txt
    missing = want - text_of.keys()
    if missing:
        raise ContractError(root / "texts", None, "text_id", f"{len(missing)} gold text ids not in texts/, e.g. {sorted(missing)[0]!r}")
    # A text that is gold for two images (duplicate captions) is kept once per image pair.
    return EvalSet(images, [t for t, _ in pairs], [text_of[t] for t, _ in pairs], np.array([k for _, k in pairs], np.int64))


# ---------------------------------------------------------------- scoring


class PairScorer:
    """Ray actor: rebuilds the model once from its `ModelSource`, then scores chunks of pairs."""

    def __init__(self, source, corpus, tokens, batch_size: int, threads: int, device: str):
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = pick_device(device)
        self.model, _ = load_model(source)
        self.model.to(self.device)
        self.tokenizer = load_tokenizer(self.model.cfg.model_path)
        self.corpus, self.tokens, self.batch_size = corpus, tokens, batch_size

    def score(self, pair_img: np.ndarray, pair_txt: np.ndarray) -> np.ndarray:
        return score_pairs(self.model, self.corpus, self.tokenizer, self.tokens, pair_img, pair_txt,
                           self.batch_size, self.device)  # fmt: skip


def _score_with_ray(source, corpus, tokens, pair_img, pair_txt, cfg: ZeroShotConfig) -> tuple[np.ndarray, int]:
    import ray  # lazy: `raysys bench device` scores pairs on a GPU machine without ray
    from ray.util import ActorPool  # lazy: as above

    started = ensure_ray()
    try:
        res = ray.cluster_resources()
        if cfg.workers:
            n = cfg.workers
        elif cfg.gpus_per_worker > 0:
            n = int(res.get("GPU", 0) // cfg.gpus_per_worker)
        else:
            n = int(res.get("CPU", 1) // max(cfg.cpus_per_worker, 1e-3))
        chunks = [(pair_img[i : i + cfg.chunk_pairs], pair_txt[i : i + cfg.chunk_pairs])
                  for i in range(0, len(pair_img), cfg.chunk_pairs)]  # fmt: skip
        n = max(1, min(n, len(chunks)))
        corpus_ref, tokens_ref = ray.put(corpus), ray.put(tokens)
        threads = max(1, int(cfg.cpus_per_worker))
        actor = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker)(PairScorer)
        actors = [actor.remote(source, corpus_ref, tokens_ref, cfg.batch_size, threads, cfg.device) for _ in range(n)]
        log.info("zeroshot: %d pairs in %d chunks over %d Ray actors", len(pair_img), len(chunks), n)
        pool = ActorPool(actors)
        parts = list(progress.track(pool.map(lambda a, c: a.score.remote(*c), chunks), total=len(pair_img),
                                    desc="zeroshot", unit="pair", weight=len))  # fmt: skip
        for a in actors:
            ray.kill(a)
        return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), n
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------- the coarse stage


def coarse_similarity(data: str | Path, corpus, es: EvalSet, model_name: str = "") -> np.ndarray:
    """(I, T) cosine between each image's tag query and each text, by the retrieval stage's
    sentence embedder; reuses `DATA/embeddings/{images,texts}` when they hold these ids."""
    root = Path(data)

    def stored(table: str, ids: list[str]) -> np.ndarray | None:
        if not shard_files(root / "embeddings", table):
            return None
        sids, vecs = read_embeddings(root, table)
        pos = {s: i for i, s in enumerate(sids.to_pylist())}
        if not all(i in pos for i in ids):
            return None
        return vecs[[pos[i] for i in ids]]

    img = stored("images", es.image_ids)
    txt = stored("texts", es.text_ids)
    if img is None or txt is None:
        enc = load_embedder(model_name)
        if img is None:
            queries = [query_string(corpus.tags[corpus.regions(i)]) or "image" for i in range(corpus.n_images)]
            img = encode_deterministic(enc, queries)
        if txt is None:
            txt = encode_deterministic(enc, es.texts)
    return img.astype(np.float32) @ txt.astype(np.float32).T


def _top_n_mask(sim: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Boolean mask of the n largest entries along `axis` (ties by index)."""
    if n >= sim.shape[axis]:
        return np.ones(sim.shape, bool)
    idx = np.argsort(-sim, axis=axis, kind="stable")
    idx = idx[:n] if axis == 0 else idx[:, :n]
    mask = np.zeros(sim.shape, bool)
    np.put_along_axis(mask, idx, True, axis=axis)
    return mask


# ---------------------------------------------------------------- the whole evaluation


def evaluate_zeroshot(checkpoint: str, data: str | Path, cfg: ZeroShotConfig | None = None,
                      log_to_mlflow: bool | None = None) -> dict[str, Any]:  # fmt: skip
    """Zero-shot retrieval of `checkpoint` on `data`'s gold split. `checkpoint`: "base", a model.pt,
    a checkpoint directory holding one, or a checkpoint URI."""
    with local_checkpoint(checkpoint) as path:
        return _evaluate(path, str(checkpoint), data, cfg or ZeroShotConfig(), log_to_mlflow)


@dataclass
class Inputs:
    """The model under evaluation and the evaluation set in its input layout."""

    source: ModelSource
    model: Any  # None once handed to Ray actors (they rebuild it from `source`)
    extra: dict[str, Any]  # the checkpoint's extra dict
    corpus: ImageSet
    tokenizer: Any
    tokens: list[np.ndarray]


def load_inputs(checkpoint: str, root: Path, es: EvalSet, cfg: ZeroShotConfig) -> Inputs:
    man = read_manifest(root)
    source = ModelSource(str(checkpoint), feature_dim=int(man.get("feature_dim") or 2048),
                         num_classes=len(man.get("tag_vocab") or []) or 80, model_path=cfg.model_path,
                         num_layers=cfg.base_layers, seed=cfg.base_seed)  # fmt: skip
    model, extra = load_model(source)
    max_text_len, max_regions = text_settings(extra, cfg.max_text_len, cfg.max_regions)
    corpus = load_images(root, es.image_ids, max_regions)
    check_feature_dim(corpus, model, root / "images")
    if source.is_base:
        source.feature_dim = corpus.feature_dim
    tokenizer = load_tokenizer(model.cfg.model_path)
    return Inputs(source, model, extra, corpus, tokenizer, tokenize(tokenizer, es.texts, max_text_len))


@dataclass
class Candidates:
    """Which (image, text) pairs get ITM scores: every pair, or the coarse stage's top N per query,
    plus the gold pairs and one shuffled pair per text (the AUC's positives and negatives)."""

    gold: np.ndarray  # (I, T) bool
    sim: np.ndarray | None  # (I, T) coarse similarity; None without a coarse stage
    i2t: np.ndarray  # (I, T) bool: candidates of each image query
    t2i: np.ndarray  # (I, T) bool: candidates of each text query
    neg_img: np.ndarray  # (T,) the shuffled image of each text
    pair_img: np.ndarray
    pair_txt: np.ndarray


def candidates(root: Path, corpus: ImageSet, es: EvalSet, cfg: ZeroShotConfig) -> Candidates:
    n_img, T = len(es.image_ids), len(es.texts)
    gold = np.zeros((n_img, T), bool)
    gold[es.text_image, np.arange(T)] = True
    if cfg.coarse == "tags":
        sim = coarse_similarity(root, corpus, es, cfg.embed_model)
        cand_i2t = _top_n_mask(sim, cfg.coarse_top_n, axis=1)
        cand_t2i = _top_n_mask(sim, cfg.coarse_top_n, axis=0)
    else:
        sim = None
        cand_i2t = cand_t2i = np.ones((n_img, T), bool)
    rng = np.random.default_rng([cfg.seed, 0x5F])
    neg_img = (es.text_image + rng.integers(1, n_img, size=T)) % n_img if n_img > 1 else es.text_image.copy()
    need = cand_i2t | cand_t2i
    need[es.text_image, np.arange(T)] = True  # gold pairs: AUC positives
    need[neg_img, np.arange(T)] = True  # shuffled pairs: AUC negatives
    pair_img, pair_txt = np.nonzero(need)
    return Candidates(gold, sim, cand_i2t, cand_t2i, neg_img, pair_img, pair_txt)


def rank_metrics(itm: np.ndarray, cand: Candidates, es: EvalSet, cfg: ZeroShotConfig) -> dict[str, Any]:
    """R@K and ranks both ways, ITM AUC. Scored candidates rank first (by ITM), the coarse stage's
    leftovers after (by similarity)."""
    T = len(es.texts)
    if cand.sim is not None:
        i2t = np.where(cand.i2t, 1e6 + np.nan_to_num(itm, nan=0.0), cand.sim)
        t2i = np.where(cand.t2i, 1e6 + np.nan_to_num(itm, nan=0.0), cand.sim)
    else:
        i2t = t2i = itm
    result: dict[str, Any] = {}
    result.update(rank_summary(gold_ranks(i2t, cand.gold, cfg.tie_policy), "i2t"))
    result.update(rank_summary(gold_ranks(t2i.T, cand.gold.T, cfg.tie_policy), "t2i"))
    pos = itm[es.text_image, np.arange(T)]
    neg = itm[cand.neg_img, np.arange(T)]
    result["itm_auc"] = roc_auc(pos, neg) if len(es.image_ids) > 1 else float("nan")
    result["r_mean"] = float(np.mean([result[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]))
    return result


def _evaluate(checkpoint: str, name: str, data: str | Path, cfg: ZeroShotConfig, log_to_mlflow: bool | None) -> dict[str, Any]:
    cfg.check()
    if cfg.coarse == "towers":
        return evaluate_towers(checkpoint, name, data, cfg, log_to_mlflow)
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    root = Path(data)
    es = eval_set(root, cfg)
    inp = load_inputs(checkpoint, root, es, cfg)
    cand = candidates(root, inp.corpus, es, cfg)
    n_img, T = len(es.image_ids), len(es.texts)
    pair_img, pair_txt = cand.pair_img, cand.pair_txt

    device = pick_device(cfg.device)
    use_ray = cfg.ray == "always" or (cfg.ray == "auto" and len(pair_img) >= cfg.shard_min_pairs)
    t_score = time.perf_counter()
    workers = 0
    # inputs ready, first step next: `raysys bench startup` times the start-up to this line
    log.info("zeroshot: scoring %d pairs (%s)", len(pair_img), "Ray actors" if use_ray else f"in process, {device}")
    if use_ray:
        inp.model = None  # the actors build their own
        scores, workers = _score_with_ray(inp.source, inp.corpus, inp.tokens, pair_img, pair_txt, cfg)
    else:
        inp.model.to(device)
        with progress.bar(total=len(pair_img), desc="zeroshot", unit="pair") as bar:
            scores = score_pairs(inp.model, inp.corpus, inp.tokenizer, inp.tokens, pair_img, pair_txt, cfg.batch_size, device,
                                 on_batch=bar.update)  # fmt: skip
    score_s = time.perf_counter() - t_score
    itm = np.full((n_img, T), np.nan, np.float64)
    itm[pair_img, pair_txt] = scores

    result = rank_metrics(itm, cand, es, cfg)
    result.update(
        n_images=n_img, n_texts=T, n_pairs_scored=int(len(pair_img)), n_pairs_full=n_img * T,
        coarse=cfg.coarse, coarse_used=cfg.coarse != "none",
        coarse_top_n=cfg.coarse_top_n if cfg.coarse != "none" else None,
        split=cfg.split, tie_policy=cfg.tie_policy, checkpoint=name,
        model=BASE_NAME if inp.source.is_base else str(inp.extra.get("recipe") or "checkpoint"),
        chance_t2i_r5=round(100.0 * min(5, n_img) / n_img, 3),
        chance_i2t_r5=round(100.0 * (1 - math.comb(T - int(np.bincount(es.text_image).mean()), 5) / math.comb(T, 5)), 3)
        if T >= 5 else None,
        workers=workers, ray=use_ray, device=str(device),
        pairs_per_s=round(len(pair_img) / score_s, 1) if score_s > 0 else None,
        seconds=round(time.perf_counter() - t0, 2),
    )  # fmt: skip
    if cand.sim is not None:
        result["coarse_i2t_recall"] = float(100.0 * np.mean((cand.i2t & cand.gold).any(axis=1)))
        result["coarse_t2i_recall"] = float(100.0 * np.mean((cand.t2i & cand.gold).any(axis=0)))
    for k, v in list(result.items()):
        if isinstance(v, float) and k.endswith(("_r1", "_r5", "_r10", "_rank", "auc", "_recall", "r_mean")):
            result[k] = round(v, 4)
    if log_to_mlflow if log_to_mlflow is not None else cfg.mlflow:
        _attach(result, log_zeroshot({"zeroshot.": (result, cfg)}, inp.extra, cfg, local_path=checkpoint))
    return result


BASE_NAME = "base"


def log_zeroshot(rows: dict[str, tuple[dict[str, Any], ZeroShotConfig]], extra: dict[str, Any], cfg: ZeroShotConfig,
                 local_path: str = "") -> dict[str, str] | None:  # fmt: skip
    """One evaluation, one new MLflow run: a child of the checkpoint's pre-training run, holding
    for each `prefix → (result, the config that produced it)` the result's numbers as metrics and
    that config as params under the same prefix (`zeroshot.`; the stage's comparison adds
    `zeroshot.base.`), so a run's params always describe its metrics. None when tracking is off."""
    uri = tracking.resolve_tracking_uri(cfg.tracking_uri, None, recorded=extra.get("tracking_uri"))
    if uri is None:
        return None
    first = next(iter(rows.values()))[0]
    parent = parent_run_id(cfg.parent_run_id, extra, uri, local_path or str(first.get("checkpoint", "")))
    metrics: dict[str, float] = {}
    params: dict[str, Any] = {}
    for prefix, (result, rcfg) in rows.items():
        metrics.update(numeric({k: v for k, v in result.items() if k != "mlflow"}, prefix))
        skip = ("tracking_uri", "parent_run_id", "mlflow", "experiment")
        params.update({f"{prefix}{k}": v for k, v in to_dict(rcfg).items() if k not in skip})
        params[f"{prefix}checkpoint"] = result.get("checkpoint")
    return log_mlflow(uri, metrics=metrics, params=params, parent=parent, experiment=cfg.experiment,
                      run_name=f"zeroshot-{first.get('model')}", tags={"raysys.stage": "zeroshot"})  # fmt: skip


def _attach(result: dict[str, Any], info: dict[str, str] | None) -> None:
    if info is not None:
        result["mlflow"] = info


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """A small fixed-width table: one row per model, R@K in percent."""
    cols = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "itm_auc"]
    head = f"{'model':<12}" + "".join(f"{c:>9}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:<12}" + "".join(f"{float(r.get(c, float('nan'))):>9.{3 if c == 'itm_auc' else 1}f}" for c in cols))
    any_row = next(iter(rows.values()), {})
    lines.append(f"({any_row.get('n_images')} images × {any_row.get('n_texts')} texts, split "
                 f"{any_row.get('split')!r}, coarse stage: {any_row.get('coarse')}; chance t2i R@5 "
                 f"{any_row.get('chance_t2i_r5')} %)")  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------- the pipeline stage


def zeroshot_stage(cfg: ZeroShotConfig, data: str | Path, pretrain: dict[str, Any]) -> dict[str, Any]:
    """The demo's last stage: the pre-trained checkpoint recorded by the pretrain stage and `base`
    (same number of encoder layers, fresh heads) on the same gold pairs; prints a small table.

    Both results go into one new MLflow run (`zeroshot.*` and `zeroshot.base.*`, each with the
    params that produced it), a child of the pretrain stage's run when it recorded one."""
    ckpt = pretrain.get("model") or pretrain.get("checkpoint")
    if not ckpt:
        raise ConfigError("zeroshot: no pre-trained checkpoint in summary['pretrain'] (run the pretrain stage first)")
    cfg = replace(cfg, tracking_uri=cfg.tracking_uri or str(pretrain.get("tracking_uri") or ""),
                  parent_run_id=cfg.parent_run_id or str(pretrain.get("mlflow_run_id") or ""))  # fmt: skip
    with local_checkpoint(ckpt) as path:
        extra = checkpoint_extra(path)
        layers = cfg.base_layers or int((extra.get("pretrain_config") or {}).get("model_layers") or 0)
        pre = evaluate_zeroshot(path, data, cfg, log_to_mlflow=False)
    pre["checkpoint"] = str(ckpt)
    base = evaluate_zeroshot(BASE_NAME, data, replace(cfg, base_layers=layers), log_to_mlflow=False)
    out: dict[str, Any] = {"pretrained": pre, "base": base}
    out["margin_t2i_r5"] = round(pre["t2i_r5"] - base["t2i_r5"], 4)
    out["margin_i2t_r5"] = round(pre["i2t_r5"] - base["i2t_r5"], 4)
    table = format_table({"pretrained": pre, "base": base})
    print(table, flush=True)
    log.info("zero-shot retrieval, pre-trained vs base:\n%s", table)
    if cfg.mlflow:
        rows = {"zeroshot.": (pre, cfg), "zeroshot.base.": (base, replace(cfg, base_layers=layers))}
        _attach(out, log_zeroshot(rows, extra, cfg, local_path=str(ckpt)))
    return out


def demo_zeroshot_config() -> ZeroShotConfig:
    """The demo's evaluation set: a seeded sample of 50 eval images with their 250 captions, every
    pair scored (12,500 ITM forward passes: about two minutes per model on two CPU cores)."""
    return ZeroShotConfig(max_images=50)


# ---------------------------------------------------------------- two-tower retrieval (coarse=towers)
#
# A two-stage checkpoint (`model.encoder: two_stage`: recipes `mvptr`, `muvla+vsc`) embeds every
# image and every text once with its uni-modal towers; retrieval is then one (I × T) product of
# unit vectors, O(I + T) encoder passes instead of the single-stream O(I · T). Optionally each
# query's top `rerank_top_n` candidates are re-scored by the cross-modal ITM head (the rest keep
# their cosine order), as `coarse=tags` does with its own coarse stage.


def towers_model(checkpoint: str, root: Path, cfg: ZeroShotConfig):
    """(two-stage model in eval mode, checkpoint extra). `base`: the backbone with fresh heads and
    `base_uni_layers` uni-modal layers (its visual tower a copy of the backbone's first layers)."""
    if checkpoint == BASE_NAME:
        man = read_manifest(root)
        mc = ModelConfig(model_path=cfg.model_path, num_layers=cfg.base_layers,
                         feature_dim=int(man.get("feature_dim") or 2048),
                         num_classes=max(1, len(man.get("tag_vocab") or [])),
                         encoder="two_stage", uni_layers=cfg.base_uni_layers)  # fmt: skip
        return build_model(mc, pretrained=True, seed=cfg.base_seed).eval(), {"recipe": BASE_NAME, "seed": cfg.base_seed}
    model, extra = load_checkpoint(checkpoint)
    if model.cfg.encoder != "two_stage":
        raise ConfigError(f"zeroshot coarse=towers: {name_of(checkpoint)} has a single-stream encoder; towers need "
                          "model.encoder=two_stage (recipes mvptr, muvla+vsc)")  # fmt: skip
    return model.eval(), extra


def name_of(checkpoint: str) -> str:
    return Path(checkpoint).name if checkpoint != BASE_NAME else BASE_NAME


def embed_towers(model, corpus, tokenizer, tokens: list[np.ndarray], batch_size: int, device) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm tower embeddings: (images (I, H), texts (T, H)). Images carry their tag concepts
    when the model was trained with them (MCR)."""
    return (embed_tower_images(model, corpus, tokenizer, batch_size, device),
            embed_tower_texts(model, corpus, tokenizer, tokens, batch_size, device))  # fmt: skip


def tower_candidates(sim: np.ndarray, es: EvalSet, cfg: ZeroShotConfig) -> Candidates:
    """Every pair ranked by cosine; with `rerank_top_n`, the ITM-scored candidates: each query's
    top N, the gold pairs and one shuffled pair per text (the AUC's)."""
    n_img, T = sim.shape
    gold = np.zeros((n_img, T), bool)
    gold[es.text_image, np.arange(T)] = True
    rng = np.random.default_rng([cfg.seed, 0x5F])
    neg_img = (es.text_image + rng.integers(1, n_img, size=T)) % n_img if n_img > 1 else es.text_image.copy()
    if not cfg.rerank_top_n:
        every = np.ones((n_img, T), bool)
        return Candidates(gold, None, every, every, neg_img, np.zeros(0, np.int64), np.zeros(0, np.int64))
    i2t = _top_n_mask(sim, cfg.rerank_top_n, axis=1)
    t2i = _top_n_mask(sim, cfg.rerank_top_n, axis=0)
    need = i2t | t2i
    need[es.text_image, np.arange(T)] = True
    need[neg_img, np.arange(T)] = True
    pair_img, pair_txt = np.nonzero(need)
    return Candidates(gold, sim, i2t, t2i, neg_img, pair_img, pair_txt)


def single_stream_rate(model, corpus, tokenizer, tokens, es: EvalSet, n_images: int, cfg: ZeroShotConfig, device) -> dict[str, Any]:
    """Pairs/s of scoring every (image, text) pair of the first `n_images` images and their texts
    through the cross-modal model, in this run: the rate towers are compared with."""
    n = min(n_images, len(es.image_ids))
    txt = np.flatnonzero(es.text_image < n)
    pair_img = np.repeat(np.arange(n), len(txt))
    pair_txt = np.tile(txt, n)
    t = time.perf_counter()
    score_pairs(model, corpus, tokenizer, tokens, pair_img, pair_txt, cfg.batch_size, device)
    s = time.perf_counter() - t
    return {"single_stream_sample": f"{n} images x {len(txt)} texts", "single_stream_pairs_per_s": round(len(pair_img) / s, 1)}


def evaluate_towers(checkpoint: str, name: str, data: str | Path, cfg: ZeroShotConfig,
                    log_to_mlflow: bool | None) -> dict[str, Any]:  # fmt: skip
    """`coarse=towers`: rank by the towers' cosine (optionally ITM re-ranked); the same metrics and
    keys as the single-stream evaluation, plus `towers_seconds` and `towers_pairs_per_s` (pairs
    ranked per second of embedding: I·T / time)."""
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    root = Path(data)
    es = eval_set(root, cfg)
    model, extra = towers_model(checkpoint, root, cfg)
    max_text_len, max_regions = text_settings(extra, cfg.max_text_len, cfg.max_regions)
    corpus = load_images(root, es.image_ids, max_regions)
    check_feature_dim(corpus, model, root / "images")
    tokenizer = load_tokenizer(model.cfg.model_path)
    tokens = tokenize(tokenizer, es.texts, max_text_len)
    device = pick_device(cfg.device)
    model.to(device)
    t = time.perf_counter()
    img, txt = embed_towers(model, corpus, tokenizer, tokens, cfg.batch_size, device)
    sim = img @ txt.T
    towers_s = time.perf_counter() - t
    cand = tower_candidates(sim, es, cfg)
    itm = sim.astype(np.float64)
    if cfg.rerank_top_n:
        itm = np.full(sim.shape, np.nan, np.float64)
        itm[cand.pair_img, cand.pair_txt] = score_pairs(model, corpus, tokenizer, tokens, cand.pair_img, cand.pair_txt,
                                                        cfg.batch_size, device)  # fmt: skip
    n_img, T = sim.shape
    result = rank_metrics(itm, cand, es, cfg)
    result.update(
        n_images=n_img, n_texts=T, n_pairs_scored=int(len(cand.pair_img)), n_pairs_full=n_img * T,
        coarse="towers", coarse_used=True, coarse_top_n=cfg.rerank_top_n or None, rerank_top_n=cfg.rerank_top_n,
        encoder=model.cfg.encoder, uni_layers=model.cfg.uni_layers,
        split=cfg.split, tie_policy=cfg.tie_policy, checkpoint=name,
        model=BASE_NAME if checkpoint == BASE_NAME else str(extra.get("recipe") or "checkpoint"),
        chance_t2i_r5=round(100.0 * min(5, n_img) / n_img, 3), workers=0, ray=False, device=str(device),
        towers_seconds=round(towers_s, 3), towers_pairs_per_s=round(n_img * T / towers_s, 1) if towers_s > 0 else None,
    )  # fmt: skip
    result["pairs_per_s"] = result["towers_pairs_per_s"]
    if cfg.single_stream_sample:
        result.update(single_stream_rate(model, corpus, tokenizer, tokens, es, cfg.single_stream_sample, cfg, device))
        if result["towers_pairs_per_s"]:
            result["towers_speedup"] = round(result["towers_pairs_per_s"] / result["single_stream_pairs_per_s"], 1)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    for k, v in list(result.items()):
        if isinstance(v, float) and k.endswith(("_r1", "_r5", "_r10", "_rank", "auc", "r_mean")):
            result[k] = round(v, 4)
    if log_to_mlflow if log_to_mlflow is not None else cfg.mlflow:
        _attach(result, log_zeroshot({"zeroshot.": (result, cfg)}, extra, cfg, local_path=checkpoint))
    return result
