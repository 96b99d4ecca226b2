"""Granularity datasets and collators (paper §3.3): what each pre-training task feeds the model.

Each granularity is a dataset of sample indices plus a collator that builds one masked batch:

- **R-T** `rt` — `[tags, regions]` of one image. Each tag (all its sub-words) is masked with
  `rt_tag_mask_prob`, each region with `rt_region_mask_prob`. Objectives: MLM, MRC, MRFR.
- **R-P** `rp` — `[retrieved sentence, regions]` of one retrieved pair with phrase links. Each
  sample masks ONE modality (text with probability `rp_text_prob`): either linked phrases or
  linked regions, each link with probability `min(1, rp_mask_scale · link_score)` — proportional to
  the link score. Objectives: MLM (phrase tokens), p-MRTC (masked regions → phrase sub-words).
- **I-S** `is` — `[regions, retrieved sentence]` of one retrieved pair; with `is_neg_prob` the
  image is replaced by another random image (negative), and `mlm_prob` of the sentence tokens are
  masked in positives and negatives alike (so the presence of [MASK] says nothing about the
  label). Objectives: MLM, ITM.
- Baselines: `text` (text-only MLM), `image` (U-VisualBERT image-only batch: regions + tags, tags
  carrying their region's box; MRM + tag MLM), `pairs` (joint MLM+MRM on image-text pairs formed
  by a pairing rule: random texts, or a fraction r of true gold pairs).

The objectives named above are the ones that apply to each granularity's batches; each objective
declares that itself (`raysys.pretrain.objectives.Objective.granularities`), so a dataset here only
says what its samples carry, and a new objective never edits this module.

Masking uses BERT's 80/10/10 rule for text. A masked region's feature is zeroed by the model
(`region_masked`); its location stays.

Determinism and sharding: `GranularityStream.batch(j)` is a pure function of (seed, rank,
granularity, j), so a resumed or distributed run reproduces its batches. A corpus is loaded for
one (rank, world_size) shard of the eligible images: every sample's image is local, and each rank
holds only its share of the region features.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from raysys.contract import ContractError, read_manifest, read_table, region_arrays, shard_files
from raysys.corpus.concepts import read_concepts
from raysys.corpus.retrieval import read_pairs
from raysys.pretrain.boxes import location_features
from raysys.pretrain.config import PretrainConfig
from raysys.pretrain.objectives import IGNORE

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the corpus of one shard


@dataclass
class Link:
    """A noun phrase of a retrieved sentence linked to one region of the image."""

    char_start: int
    char_end: int
    region: int
    score: float
    phrase: str


@dataclass
class Corpus:
    """The images (this shard's), the texts they need, the retrieved pairs and phrase links."""

    feature_dim: int
    num_classes: int
    image_ids: list[str]
    offsets: np.ndarray  # (n_images + 1,) into the region arrays
    features: np.ndarray  # (n_regions, D) float16
    loc: np.ndarray  # (n_regions, 5) float32
    class_ids: np.ndarray  # (n_regions,) int64
    tags: list[str]  # (n_regions,)
    class_probs: np.ndarray | None = None  # (n_regions, C) when the images table stores them
    texts: dict[str, str] = field(default_factory=dict)
    pair_image: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # local image index
    pair_text: list[str] = field(default_factory=list)
    pair_rank: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pair_score: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    links: list[list[Link]] = field(default_factory=list)  # per pair
    text_pool: list[str] = field(default_factory=list)  # text-only samples of this shard
    paired: list[tuple[int, str]] = field(default_factory=list)  # (image, text) for the `pairs` baseline
    paired_true: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    concepts: list[str] | None = None  # the dataset's phrase concepts (raysys.corpus.concepts), when built

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    def n_regions(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def regions(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))


def _stable_seed(*parts: Any) -> list[int]:
    """Seed material from ints and strings (Python's hash() differs per process: never use it)."""
    return [p if isinstance(p, int) else zlib.crc32(str(p).encode()) for p in parts]


def load_corpus(
    data: str | Path, cfg: PretrainConfig, needs: set[str], rank: int = 0, world_size: int = 1
) -> Corpus:
    """Read the tables a recipe needs, for the images of shard `rank` of `world_size`.

    `needs` ⊆ {"pairs", "phrases", "text_pool", "random_pairs", "gold_pairs"}. Images of the gold
    "eval" split are excluded when `cfg.exclude_eval` (evaluation must see unseen images).
    """
    root = Path(data)
    man = read_manifest(root)
    if not shard_files(root, "images"):
        raise ContractError(root / "images", None, "images", "table is missing or empty")
    gold = read_table(root, "gold") if shard_files(root, "gold") else None
    eligible = _eligible_images(root, gold, cfg)
    corpus = _load_images(root, man, cfg, eligible[rank::world_size])
    want_texts: set[str] = set()
    if "pairs" in needs:
        want_texts |= _load_pairs(root, corpus, cfg.k, with_links="phrases" in needs)
    if "text_pool" in needs or "random_pairs" in needs:
        want_texts |= _load_text_pools(root, corpus, cfg.seed, needs, eligible, rank, world_size)
    if "gold_pairs" in needs:
        want_texts |= _load_gold_pairs(root, corpus, cfg, gold, eligible)
    if want_texts:
        _load_texts(root, corpus, want_texts)
    corpus.concepts = read_concepts(root)
    return corpus


def _eligible_images(root: Path, gold: pa.Table | None, cfg: PretrainConfig) -> list[str]:
    """Image ids pre-training may use, in table order: not in the gold "eval" split (when
    `exclude_eval`), the first `max_images` of them (when set)."""
    excluded: set[str] = set()
    if gold is not None and cfg.exclude_eval:
        excluded = set(pc.filter(gold.column("image_id"), pc.equal(gold.column("split"), "eval")).to_pylist())
    all_ids = read_table(root, "images", columns=["image_id"]).column("image_id").to_pylist()
    eligible = [i for i in all_ids if i not in excluded]
    if cfg.max_images:
        eligible = eligible[: cfg.max_images]
    if not eligible:
        raise ContractError(root / "images", None, "image_id", "no images left for pre-training")
    return eligible


def read_image_parts(
    root: Path, mine: set[str] | None, max_regions: int
) -> tuple[dict[str, dict[str, Any]], int | None]:
    """Per image of `mine` (every image when None): its first `max_regions` regions' arrays
    (features, boxes, location features, class ids, tags, stored class distributions or None) and
    its size; and the feature dimension read (None when no shard held one of `mine`). Pre-training
    and the downstream tasks read images through this one function, so they truncate and encode
    regions alike."""
    dim = None
    parts: dict[str, dict[str, Any]] = {}
    for f in shard_files(root, "images"):
        t = pq.read_table(f)
        if mine is not None:
            t = t.filter(pc.is_in(t.column("image_id"), value_set=pa.array(sorted(mine), pa.string())))
        if t.num_rows == 0:
            continue
        arr = region_arrays(t)
        dim = arr["features"].shape[1]
        cls_flat = np.asarray(t.column("class_ids").combine_chunks().values, dtype=np.int64)
        tags_flat = t.column("tags").combine_chunks().values.to_pylist()
        probs_flat = (
            np.asarray(t.column("class_probs").combine_chunks().values.values, np.float32).reshape(len(cls_flat), -1)
            if "class_probs" in t.column_names
            else None
        )
        W = t.column("width").to_numpy()
        H = t.column("height").to_numpy()
        for r, iid in enumerate(t.column("image_id").to_pylist()):
            lo, hi = int(arr["offsets"][r]), int(arr["offsets"][r + 1])
            hi = min(hi, lo + max_regions)
            parts[iid] = {
                "features": arr["features"][lo:hi],
                "boxes": arr["boxes"][lo:hi],
                "loc": location_features(arr["boxes"][lo:hi], W[r], H[r]),
                "class_ids": cls_flat[lo:hi],
                "tags": tags_flat[lo:hi],
                "probs": probs_flat[lo:hi] if probs_flat is not None else None,
                "size": (int(W[r]), int(H[r])),
            }
    return parts, dim


def _load_images(root: Path, man: dict[str, Any], cfg: PretrainConfig, mine_order: list[str]) -> Corpus:
    """The corpus of this shard's images (in `mine_order`), regions truncated to `max_regions`."""
    parts, read_dim = read_image_parts(root, set(mine_order), cfg.max_regions)
    dim = read_dim if read_dim is not None else int(man.get("feature_dim") or 0)
    image_ids = [i for i in mine_order if i in parts]
    counts = np.array([len(parts[i]["class_ids"]) for i in image_ids], dtype=np.int64)
    offsets = np.zeros(len(image_ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    tag_vocab = man.get("tag_vocab") or []
    all_cls = np.concatenate([parts[i]["class_ids"] for i in image_ids]) if image_ids else np.zeros(0, np.int64)
    num_classes = cfg.num_classes or len(tag_vocab) or int(all_cls.max(initial=0)) + 1
    if len(all_cls) and int(all_cls.max()) >= num_classes:
        raise ContractError(root / "images", None, "class_ids", f"class id {int(all_cls.max())} ≥ num_classes {num_classes}")
    return Corpus(
        feature_dim=dim,
        num_classes=num_classes,
        image_ids=image_ids,
        offsets=offsets,
        features=np.concatenate([parts[i]["features"] for i in image_ids]) if image_ids else np.zeros((0, dim), np.float16),
        loc=np.concatenate([parts[i]["loc"] for i in image_ids]) if image_ids else np.zeros((0, 5), np.float32),
        class_ids=all_cls,
        tags=[t for i in image_ids for t in parts[i]["tags"]],
        class_probs=(
            np.concatenate([parts[i]["probs"] for i in image_ids])
            if image_ids and parts[image_ids[0]]["probs"] is not None
            else None
        ),
    )


def _load_pairs(root: Path, corpus: Corpus, k: int, with_links: bool) -> set[str]:
    """The retrieved pairs (rank < k, `raysys.corpus.retrieval.read_pairs`) of this shard's images,
    sorted by (image, rank, text); with their phrase links when `with_links`. Returns the text ids."""
    if not shard_files(root, "pairs"):
        raise ContractError(root / "pairs", None, "pairs", "table is missing: run `raysys retrieve` first")
    p = read_pairs(root, k, columns=["image_id", "text_id", "rank", "score"])
    # ranks are 0..K-1 per image, so the kept ones reach k-1 unless the stored K is smaller
    max_rank = int(pc.max(p.column("rank")).as_py() or 0) if p.num_rows else -1
    if k > max_rank + 1:
        log.warning("pairs hold ranks < %d only; k=%d uses all of them", max_rank + 1, k)
    index = {iid: n for n, iid in enumerate(corpus.image_ids)}
    rows = sorted(
        (index[i], r, t, s)
        for i, t, r, s in zip(*(p.column(c).to_pylist() for c in ("image_id", "text_id", "rank", "score")))
        if i in index
    )
    corpus.pair_image = np.array([r[0] for r in rows], dtype=np.int64)
    corpus.pair_rank = np.array([r[1] for r in rows], dtype=np.int64)
    corpus.pair_text = [r[2] for r in rows]
    corpus.pair_score = np.array([r[3] for r in rows], dtype=np.float32)
    corpus.links = [[] for _ in rows]
    if with_links:
        _load_links(root, corpus)
    return set(corpus.pair_text)


def _load_links(root: Path, corpus: Corpus) -> None:
    """Each pair's phrase links to a region of its image, in text order."""
    if not shard_files(root, "phrases"):
        raise ContractError(root / "phrases", None, "phrases", "table is missing: run `raysys phrases` first")
    where = {(corpus.image_ids[i], t): n for n, (i, t) in enumerate(zip(corpus.pair_image, corpus.pair_text))}
    ph = read_table(root, "phrases")
    cols = [ph.column(c).to_pylist() for c in ("image_id", "text_id", "phrase", "char_start", "char_end",
                                              "region", "link_score")]  # fmt: skip
    for iid, tid, phrase, cs, ce, reg, score in zip(*cols):
        n = where.get((iid, tid))
        if n is None or reg is None or reg < 0 or reg >= corpus.n_regions(corpus.pair_image[n]):
            continue
        if cs is None or ce is None or ce <= cs:
            continue
        corpus.links[n].append(Link(int(cs), int(ce), int(reg), float(score or 0.0), phrase or ""))
    for links in corpus.links:
        links.sort(key=lambda lk: (lk.char_start, lk.char_end, lk.region))


def _load_text_pools(
    root: Path, corpus: Corpus, seed: int, needs: set[str], eligible: list[str], rank: int, world_size: int
) -> set[str]:
    """Text pools of the text-only (`text_pool`) and random-pair (`random_pairs`) baselines."""
    text_ids = read_table(root, "texts", columns=["text_id"]).column("text_id").to_pylist()
    if not text_ids:
        raise ContractError(root / "texts", None, "texts", "text corpus is empty")
    want: set[str] = set()
    if "text_pool" in needs:
        corpus.text_pool = text_ids[rank::world_size]
        want.update(corpus.text_pool)
    if "random_pairs" in needs:  # one fixed random text per image, the same on every rank
        draw = np.random.default_rng(_stable_seed(seed, "random_pairs")).integers(0, len(text_ids), len(eligible))
        pos = {iid: g for g, iid in enumerate(eligible)}
        corpus.paired = [(n, text_ids[int(draw[pos[i]])]) for n, i in enumerate(corpus.image_ids)]
        corpus.paired_true = np.zeros(len(corpus.paired), bool)
        want.update(t for _, t in corpus.paired)
    return want


def _load_gold_pairs(root: Path, corpus: Corpus, cfg: PretrainConfig, gold: pa.Table | None, eligible: list[str]) -> set[str]:
    """The `paired_ratio` baseline: the train-split gold pairs, a seeded fraction `paired_ratio` of
    them kept true and the rest's texts shuffled among themselves (the same on every rank)."""
    if gold is None:
        raise ContractError(root / "gold", None, "gold", "paired_ratio needs true pairs (gold/); this dataset has none")
    el = set(eligible)
    g = sorted(
        (i, t) for i, t, s in zip(*(gold.column(c).to_pylist() for c in ("image_id", "text_id", "split")))
        if i in el and s != "eval"
    )
    if not g:
        raise ContractError(root / "gold", None, "split", "no train-split gold pairs among the eligible images")
    rng = np.random.default_rng(_stable_seed(cfg.seed, "paired_ratio"))
    n_true = int(round(cfg.paired_ratio * len(g)))
    perm = rng.permutation(len(g))
    rest = perm[n_true:]
    texts = [t for _, t in g]
    shuffled = list(texts)
    for a, b in zip(rest, rest[rng.permutation(len(rest))]):
        shuffled[a] = texts[b]
    true = np.zeros(len(g), bool)
    true[perm[:n_true]] = True
    index = {iid: n for n, iid in enumerate(corpus.image_ids)}
    keep = [k for k, (i, _) in enumerate(g) if i in index]
    corpus.paired = [(index[g[k][0]], shuffled[k]) for k in keep]
    corpus.paired_true = np.array([true[k] and shuffled[k] == texts[k] for k in keep], bool)
    return {t for _, t in corpus.paired}


def _load_texts(root: Path, corpus: Corpus, want: set[str]) -> None:
    for batch in _iter_texts(root):
        for tid, txt in zip(batch.column("text_id").to_pylist(), batch.column("text").to_pylist()):
            if tid in want:
                corpus.texts[tid] = txt
    missing = want - corpus.texts.keys()
    if missing:
        raise ContractError(root / "texts", None, "text_id", f"{len(missing)} referenced text ids not found, e.g. {sorted(missing)[0]}")


def _iter_texts(root: Path):
    for f in shard_files(root, "texts"):
        for b in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=["text_id", "text"]):
            yield pa.Table.from_batches([b])


# ---------------------------------------------------------------- masking helpers


@dataclass
class Sample:
    """One sample before padding. Token ids exclude [CLS]/[SEP] (added by `assemble`)."""

    ids: np.ndarray
    mlm_labels: np.ndarray
    image: int | None = None
    region_masked: np.ndarray | None = None
    mrc_labels: np.ndarray | None = None
    mrfr_mask: np.ndarray | None = None
    pmrtc: dict[int, list[int]] | None = None  # region -> phrase sub-word ids
    text_loc: np.ndarray | None = None  # (t, 5) box of the region a tag token belongs to
    itm_label: int = IGNORE
    eligible: bool = False  # a positive retrieved pair: w_ITM applies
    clean_ids: np.ndarray | None = None
    item: int = -1  # the dataset item (image, pair or text index) it was drawn from


class Masker:
    """BERT's 80/10/10 replacement of selected positions, with the tokenizer's ids."""

    def __init__(self, tokenizer):
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.special = np.zeros(self.vocab_size, bool)
        self.special[[i for i in tokenizer.all_special_ids if i < self.vocab_size]] = True

    def __call__(self, ids: np.ndarray, select: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Return (input ids, MLM labels). Consumes the same random draws whether or not anything
        is selected, so one sample's masking never shifts another's."""
        u = rng.random(len(ids))
        if not select.any():
            return ids.copy(), np.full(len(ids), IGNORE, np.int64)
        labels = np.where(select, ids, IGNORE).astype(np.int64)
        out = ids.copy()
        out[select & (u < 0.8)] = self.mask_id
        rnd = select & (u >= 0.8) & (u < 0.9)
        if rnd.any():
            repl = rng.integers(0, self.vocab_size, int(rnd.sum()))
            repl[self.special[repl]] = self.mask_id
            out[rnd] = repl
        return out, labels


def tokens_in_span(offsets: np.ndarray, start: int, end: int) -> np.ndarray:
    """Indices of the sub-word tokens overlapping the character span [start, end)."""
    if len(offsets) == 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero((offsets[:, 0] < end) & (offsets[:, 1] > start) & (offsets[:, 1] > offsets[:, 0]))


# ---------------------------------------------------------------- datasets


class GranularityDataset:
    """Base: a list of sample indices, a collator `collate(indices, rng) -> batch`."""

    name = ""
    needs: frozenset[str] = frozenset()
    regions_first = False

    def __init__(self, corpus: Corpus, tokenizer, cfg: PretrainConfig):
        self.corpus, self.tok, self.cfg = corpus, tokenizer, cfg
        self.masker = Masker(tokenizer)
        self._tag_ids: dict[str, list[int]] = {}

    def __len__(self) -> int:
        raise NotImplementedError

    def mlm_mask(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """BERT's MLM on a sentence: each token selected at `mlm_prob` (80/10/10)."""
        return self.masker(ids, rng.random(len(ids)) < self.cfg.mlm_prob, rng)

    def sample(self, i: int, rng: np.random.Generator) -> Sample:
        raise NotImplementedError

    def collate(self, indices: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        samples = self.samples(indices, rng)
        batch = assemble(samples, self.corpus, self.tok)
        batch.update(granularity=self.name, regions_first=self.regions_first)
        return batch

    def samples(self, indices: np.ndarray, rng: np.random.Generator) -> list[Sample]:
        return [self.sample(int(i), rng) for i in indices]

    # -- shared pieces
    @property
    def max_tokens(self) -> int:
        return max(1, self.cfg.max_text_len - 2)

    def tag_ids(self, tag: str) -> list[int]:
        if tag not in self._tag_ids:
            self._tag_ids[tag] = self.tok(tag, add_special_tokens=False)["input_ids"]
        return self._tag_ids[tag]

    def encode(self, texts: list[str], offsets: bool = False) -> dict[str, Any]:
        return self.tok(
            texts, add_special_tokens=False, truncation=True, max_length=self.max_tokens,
            return_offsets_mapping=offsets,
        )  # fmt: skip

    def mask_regions(self, image: int, prob: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(zeroed, MRC labels, MRFR targets). With `mrm_keep_ratio` some chosen regions keep their
        feature but are still predicted. Why: MRM trains the last layer only at masked regions, and
        when every predicted region is zeroed it learns to make region outputs summaries of their
        context; the regions of one image then come out alike (docs/evaluation.md, "Does the suite
        separate…"). Predicting some regions the model can see keeps every output its own region's."""
        n = self.corpus.n_regions(image)
        chosen = rng.random(n) < prob
        keep = self.cfg.mrm_keep_ratio
        masked = chosen & (rng.random(n) >= keep) if keep > 0 else chosen  # no extra draw at 0: same stream
        cls = self.corpus.class_ids[self.corpus.regions(image)]
        # class id -1 = no detector class (featurize's whole-image / grid regions): nothing to classify
        mrc = np.where(chosen & (cls >= 0), cls, IGNORE).astype(np.int64)
        return masked, mrc, chosen.copy()


class RegionTagDataset(GranularityDataset):
    """R-T: `[tags, regions]` of one image; tags and regions masked independently."""

    name = "rt"
    tag_boxes = False

    def __len__(self) -> int:
        return self.corpus.n_images

    def sample(self, i: int, rng: np.random.Generator) -> Sample:
        c = self.corpus
        sl = c.regions(i)
        ids: list[int] = []
        owner: list[int] = []  # region of each tag token
        tag_of: list[int] = []  # tag index of each token
        for r, tag in enumerate(c.tags[sl]):
            t = self.tag_ids(tag)
            if len(ids) + len(t) > self.max_tokens:
                break
            ids += t
            owner += [r] * len(t)
            tag_of += [r] * len(t)
        ids_a = np.array(ids, dtype=np.int64)
        n_tags = (max(tag_of) + 1) if tag_of else 0
        tag_masked = rng.random(n_tags) < self.cfg.rt_tag_mask_prob
        select = tag_masked[np.array(tag_of, dtype=np.int64)] if tag_of else np.zeros(0, bool)
        new_ids, labels = self.masker(ids_a, select, rng)
        masked, mrc, mrfr = self.mask_regions(i, self.cfg.rt_region_mask_prob, rng)
        loc = c.loc[sl][np.array(owner, dtype=np.int64)] if (self.tag_boxes and owner) else None
        return Sample(new_ids, labels, i, masked, mrc, mrfr, text_loc=loc, item=i)


class ImageTagDataset(RegionTagDataset):
    """U-VisualBERT's image-only batch: regions + detector tags, each tag sub-word carrying its
    region's box embedding; MRM (MRC + MRFR) + MLM on tags."""

    name = "image"
    tag_boxes = True


class RegionPhraseDataset(GranularityDataset):
    """R-P: `[retrieved sentence, regions]`; mask linked phrases OR linked regions (one modality per
    sample), each link with probability ∝ its link score."""

    name = "rp"
    needs = frozenset({"pairs", "phrases"})

    def __init__(self, corpus, tokenizer, cfg):
        super().__init__(corpus, tokenizer, cfg)
        self.items = np.array([k for k, links in enumerate(corpus.links) if links], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.items)

    def link_probs(self, scores: np.ndarray) -> np.ndarray:
        return np.clip(self.cfg.rp_mask_scale * np.clip(scores, 0.0, None), 0.0, 1.0)

    def samples(self, indices: np.ndarray, rng: np.random.Generator) -> list[Sample]:
        c = self.corpus
        pairs = [int(self.items[i]) for i in indices]
        enc = self.encode([c.texts[c.pair_text[k]] for k in pairs], offsets=True)
        return [
            self.sample_pair(k, np.array(ids, np.int64), np.array(offs, np.int64).reshape(-1, 2), rng)
            for k, ids, offs in zip(pairs, enc["input_ids"], enc["offset_mapping"])
        ]

    def sample(self, i: int, rng: np.random.Generator) -> Sample:
        return self.samples(np.array([i]), rng)[0]

    def sample_pair(self, k: int, ids: np.ndarray, offsets: np.ndarray, rng: np.random.Generator) -> Sample:
        c = self.corpus
        image = int(c.pair_image[k])
        truncated = len(ids) >= self.max_tokens
        usable = []  # (token positions, link) for links whose whole phrase survived truncation
        for lk in c.links[k]:
            toks = tokens_in_span(offsets, lk.char_start, lk.char_end)
            if len(toks) and (not truncated or lk.char_end <= offsets[-1, 1]):
                usable.append((toks, lk))
        n_reg = c.n_regions(image)
        select = np.zeros(len(ids), bool)
        masked = np.zeros(n_reg, bool)
        pmrtc: dict[int, list[int]] = {}
        text_side = rng.random() < self.cfg.rp_text_prob
        if text_side:
            p = self.link_probs(np.array([lk.score for _, lk in usable], np.float32))
            for (toks, _), hit in zip(usable, rng.random(len(usable)) < p):
                if hit:
                    select[toks] = True
        else:
            best: dict[int, tuple[float, np.ndarray]] = {}  # region -> (best link score, its phrase tokens)
            for toks, lk in usable:
                if lk.region not in best or lk.score > best[lk.region][0]:
                    best[lk.region] = (lk.score, toks)
            regions = sorted(best)
            p = self.link_probs(np.array([best[r][0] for r in regions], np.float32))
            for r, hit in zip(regions, rng.random(len(regions)) < p):
                if hit:
                    masked[r] = True
                    pmrtc[r] = ids[best[r][1]].tolist()
        new_ids, labels = self.masker(ids, select, rng)
        none = np.full(n_reg, IGNORE, np.int64)
        return Sample(new_ids, labels, image, masked, none, np.zeros(n_reg, bool), pmrtc=pmrtc,
                      eligible=True, clean_ids=ids, item=k)  # fmt: skip


class ImageSentenceDataset(GranularityDataset):
    """I-S: `[regions, retrieved sentence]`, positive (retrieved) or negative (random image)."""

    name = "is"
    needs = frozenset({"pairs"})
    regions_first = True

    def __len__(self) -> int:
        return len(self.corpus.pair_text)

    def samples(self, indices: np.ndarray, rng: np.random.Generator) -> list[Sample]:
        return pair_samples(self, indices, rng, self.mlm_mask, negatives=True)


def pair_samples(ds: GranularityDataset, indices: np.ndarray, rng: np.random.Generator, mask, negatives: bool) -> list[Sample]:
    """Samples of retrieved pairs `indices` of `ds.corpus`: the sentence masked by `mask(ids, rng)
    -> (input ids, labels)`, its regions unmasked. `negatives`: with `is_neg_prob` the text is
    paired with a random other image instead (ITM label 0, not w_ITM-eligible), else label 1; I-S's
    and the pair granularities of other recipes (`codis`, `unimo2_pairs`) share this."""
    c = ds.corpus
    enc = ds.encode([c.texts[c.pair_text[int(k)]] for k in indices])
    out = []
    for k, ids in zip(indices, enc["input_ids"]):
        ids = np.array(ids, np.int64)
        image = int(c.pair_image[int(k)])
        negative = negatives and c.n_images > 1 and rng.random() < ds.cfg.is_neg_prob
        if negative:
            other = int(rng.integers(0, c.n_images - 1))
            image = other + (other >= image)  # any image but its own
        new_ids, labels = mask(ids, rng)
        n = c.n_regions(image)
        out.append(Sample(new_ids, labels, image, np.zeros(n, bool), np.full(n, IGNORE, np.int64), np.zeros(n, bool),
                          itm_label=0 if negative else 1, eligible=not negative, clean_ids=ids, item=int(k)))  # fmt: skip
    return out


class TextOnlyDataset(GranularityDataset):
    """U-VisualBERT's text-only batch: standard MLM on sentences of the text corpus, no image."""

    name = "text"
    needs = frozenset({"text_pool"})

    def __len__(self) -> int:
        return len(self.corpus.text_pool)

    def samples(self, indices, rng):
        enc = self.encode([self.corpus.texts[self.corpus.text_pool[int(k)]] for k in indices])
        out = []
        for k, ids in zip(indices, enc["input_ids"]):
            ids = np.array(ids, np.int64)
            new_ids, labels = self.masker(ids, rng.random(len(ids)) < self.cfg.mlm_prob, rng)
            out.append(Sample(new_ids, labels, item=int(k)))
        return out


class PairedDataset(GranularityDataset):
    """`[sentence, regions]` of fixed image-text pairs (random, or a fraction r of true pairs) with
    joint MLM + MRM — the paper's Fig. 1 / Table 6 setting."""

    name = "pairs"

    def __len__(self) -> int:
        return len(self.corpus.paired)

    def samples(self, indices, rng):
        c = self.corpus
        enc = self.encode([c.texts[c.paired[int(k)][1]] for k in indices])
        out = []
        for k, ids in zip(indices, enc["input_ids"]):
            ids = np.array(ids, np.int64)
            image = c.paired[int(k)][0]
            new_ids, labels = self.masker(ids, rng.random(len(ids)) < self.cfg.mlm_prob, rng)
            masked, mrc, mrfr = self.mask_regions(image, self.cfg.mrm_prob, rng)
            out.append(Sample(new_ids, labels, image, masked, mrc, mrfr, item=int(k)))
        return out


GRANULARITIES: dict[str, type[GranularityDataset]] = {
    "rt": RegionTagDataset,
    "rp": RegionPhraseDataset,
    "is": ImageSentenceDataset,
    "text": TextOnlyDataset,
    "image": ImageTagDataset,
    "pairs": PairedDataset,
}


# ---------------------------------------------------------------- padding into tensors


def assemble(samples: list[Sample], corpus: Corpus, tokenizer) -> dict[str, Any]:
    """Pad samples into one batch: `[CLS] text [SEP]` then regions (the model lays them out).

    Optional keys appear when the samples carry what they are made of: `pmrtc_labels` when the
    samples carry phrase links (`Sample.pmrtc`, R-P), `text_loc` when tokens carry boxes,
    `mrc_probs` when the corpus stores class distributions."""
    B = len(samples)
    T = max(len(s.ids) for s in samples) + 2
    R = max((corpus.n_regions(s.image) for s in samples if s.image is not None), default=0)
    D = corpus.feature_dim
    cls_id, sep_id, pad_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    input_ids = np.full((B, T), pad_id, np.int64)
    clean_ids = np.full((B, T), pad_id, np.int64)
    text_mask = np.zeros((B, T), bool)
    mlm = np.full((B, T), IGNORE, np.int64)
    any_loc = any(s.text_loc is not None for s in samples)
    text_loc = np.zeros((B, T, 5), np.float32) if any_loc else None
    text_loc_mask = np.zeros((B, T), np.float32) if any_loc else None
    feats = np.zeros((B, R, D), np.float16)
    loc = np.zeros((B, R, 5), np.float32)
    rmask = np.zeros((B, R), bool)
    rmasked = np.zeros((B, R), bool)
    mrc = np.full((B, R), IGNORE, np.int64)
    mrfr = np.zeros((B, R), bool)
    probs = np.zeros((B, R, corpus.num_classes), np.float32) if corpus.class_probs is not None else None
    L = max((len(v) for s in samples if s.pmrtc for v in s.pmrtc.values()), default=1)
    pmrtc = np.full((B, R, L), IGNORE, np.int64)
    itm = np.full(B, IGNORE, np.int64)
    eligible = np.zeros(B, bool)
    for b, s in enumerate(samples):
        t = len(s.ids)
        input_ids[b, 0], input_ids[b, 1 : t + 1], input_ids[b, t + 1] = cls_id, s.ids, sep_id
        clean = s.clean_ids if s.clean_ids is not None else s.ids
        clean_ids[b, 0], clean_ids[b, 1 : t + 1], clean_ids[b, t + 1] = cls_id, clean, sep_id
        text_mask[b, : t + 2] = True
        mlm[b, 1 : t + 1] = s.mlm_labels
        if s.text_loc is not None:
            text_loc[b, 1 : t + 1] = s.text_loc
            text_loc_mask[b, 1 : t + 1] = 1.0
        itm[b], eligible[b] = s.itm_label, s.eligible
        if s.image is None:
            continue
        sl = corpus.regions(s.image)
        n = sl.stop - sl.start
        feats[b, :n] = corpus.features[sl]
        loc[b, :n] = corpus.loc[sl]
        rmask[b, :n] = True
        if s.region_masked is not None:
            rmasked[b, :n] = s.region_masked
        if s.mrc_labels is not None:
            mrc[b, :n] = s.mrc_labels
        if s.mrfr_mask is not None:
            mrfr[b, :n] = s.mrfr_mask
        if probs is not None:
            probs[b, :n] = corpus.class_probs[sl]
        for r, toks in (s.pmrtc or {}).items():
            pmrtc[b, r, : len(toks)] = toks
    batch: dict[str, Any] = {
        "input_ids": torch.from_numpy(input_ids),
        "clean_input_ids": torch.from_numpy(clean_ids),
        "text_mask": torch.from_numpy(text_mask),
        "mlm_labels": torch.from_numpy(mlm),
        "region_feats": torch.from_numpy(feats),
        "region_loc": torch.from_numpy(loc),
        "region_mask": torch.from_numpy(rmask),
        "region_masked": torch.from_numpy(rmasked),
        "mrc_labels": torch.from_numpy(mrc),
        "mrfr_mask": torch.from_numpy(mrfr),
        "itm_labels": torch.from_numpy(itm),
        "itm_eligible": torch.from_numpy(eligible),
    }
    if any(s.pmrtc is not None for s in samples):
        batch["pmrtc_labels"] = torch.from_numpy(pmrtc)
    if text_loc is not None:
        batch["text_loc"] = torch.from_numpy(text_loc)
        batch["text_loc_mask"] = torch.from_numpy(text_loc_mask)
    if probs is not None:
        batch["mrc_probs"] = torch.from_numpy(probs)
    return batch


# ---------------------------------------------------------------- deterministic batch streams


class GranularityStream:
    """Batches of one granularity for one rank: `batch(j)` is a pure function of (seed, rank,
    granularity, j). Local epoch e = j // len(self) is a seeded permutation of the local samples;
    the last batch of an epoch may be short. Streams wrap, so a small granularity repeats while a
    large one finishes its epoch (the mixer decides how many batches each contributes)."""

    def __init__(self, dataset: GranularityDataset, batch_size: int, seed: int, rank: int = 0):
        if len(dataset) == 0:
            raise ContractError("", None, dataset.name, f"granularity {dataset.name!r} has no samples in this data shard")
        self.dataset, self.batch_size, self.seed, self.rank = dataset, batch_size, seed, rank
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def name(self) -> str:
        return self.dataset.name

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def indices(self, j: int) -> np.ndarray:
        e, b = divmod(j, len(self))
        if self._perm is None or self._perm[0] != e:
            rng = np.random.default_rng(_stable_seed(self.seed, "perm", self.name, self.rank, e))
            self._perm = (e, rng.permutation(len(self.dataset)))
        return self._perm[1][b * self.batch_size : (b + 1) * self.batch_size]

    def batch(self, j: int) -> dict[str, Any]:
        rng = np.random.default_rng(_stable_seed(self.seed, "mask", self.name, self.rank, j))
        return self.dataset.collate(self.indices(j), rng)


def corpus_needs(granularities: list[str], options: dict[str, Any]) -> set[str]:
    needs: set[str] = set()
    for g in granularities:
        needs |= GRANULARITIES[g].needs
    if "pairs" in granularities:
        needs.add("gold_pairs" if options.get("pairing") == "gold" else "random_pairs")
    return needs


def build_streams(
    corpus: Corpus, granularities: list[str], tokenizer, cfg: PretrainConfig, rank: int = 0
) -> dict[str, GranularityStream]:
    return {g: GranularityStream(GRANULARITIES[g](corpus, tokenizer, cfg), cfg.batch_size, cfg.seed, rank)
            for g in granularities}  # fmt: skip


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def link_stats(corpus: Corpus) -> dict[str, Any]:
    """Figures for logs: how many retrieved pairs carry phrase links, and how many on average."""
    n = [len(x) for x in corpus.links]
    return {"pairs": len(n), "pairs_with_links": int(sum(1 for x in n if x)), "mean_links": float(np.mean(n)) if n else 0.0}
