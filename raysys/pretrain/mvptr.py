"""The `mvptr` granularity (MVPTR, papers/002): retrieved pairs with phrase and tag concepts.

One sample is one retrieved pair `(image, sentence)` (rank < k), laid out for the two-stage encoder
(`ModelConfig.encoder = "two_stage"`):

* text side: the sentence's tokens and the phrase concepts found in it (`concept_ids`, each the
  sub-word ids of its words; the model embeds a concept as their mean). Tokens are masked for MLM
  at `mlm_prob` with **chain masking** (§3.3): a concept containing a masked token is masked too
  (its input becomes [MASK]), so it cannot leak the token; concepts are never MLM targets.
* visual side: the regions and the image's distinct detector tags (`vtag_ids`, one tag concept per
  class). Tags are masked at `MCR_MASK_PROB` = 0.25 (§3.2) with BERT's 80/10/10 rule ([MASK], a
  random other tag, unchanged); `mcr_labels` holds the masked tags' class ids.
* `image_index` lets VSC, WPG and ITM exclude pairs of the same image from the in-batch negatives.

Per-sentence concepts are found at collation time by matching the concepts' sub-word sequences in
the tokenised sentence (`ConceptMatcher`), so the corpus needs no per-pair column. The vocabulary
is the dataset's `concepts.json` (`raysys.corpus.concepts.build_concepts`) when the loader attached
it to the corpus (`corpus.concepts`); otherwise it is built here from the corpus's own sentences.

Importing this module registers the granularity in `raysys.pretrain.granularities.GRANULARITIES`
(the `mvptr` recipe imports it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raysys.corpus.concepts import DEFAULT_MIN_COUNT, concept_vocabulary, load_spacy
from raysys.pretrain.granularities import GRANULARITIES, Corpus, GranularityDataset, Sample, assemble
from raysys.pretrain.objectives import IGNORE

log = logging.getLogger(__name__)

MCR_MASK_PROB = 0.25  # MVPTR §3.2: tags are masked more often than words
MAX_CONCEPTS = 8  # phrase concepts per sentence (the most frequent ones first)


# ---------------------------------------------------------------- concepts in a token sequence


class ConceptMatcher:
    """Finds vocabulary concepts in token id sequences. A concept occurs in a sentence when each of
    its words' sub-word sequences occurs in it; its positions are those tokens (first occurrence
    of each word). Concepts are tried in vocabulary order (most frequent first)."""

    def __init__(self, concepts: list[str], tokenizer):
        self.concepts = list(concepts)
        self.parts: list[list[tuple[int, ...]]] = []
        self.by_first: dict[int, list[int]] = {}
        for c, concept in enumerate(self.concepts):
            parts = [tuple(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in concept.split()]
            parts = [p for p in parts if p]
            self.parts.append(parts)
            if parts:
                self.by_first.setdefault(parts[0][0], []).append(c)

    def token_ids(self, c: int) -> list[int]:
        return [t for p in self.parts[c] for t in p]

    def find(self, ids: np.ndarray, limit: int = MAX_CONCEPTS) -> list[tuple[int, np.ndarray]]:
        """(concept index, token positions) of the concepts in `ids`, at most `limit`."""
        seq = [int(x) for x in ids]
        cands = sorted({c for t in set(seq) for c in self.by_first.get(t, ())})
        found = []
        for c in cands:
            pos = []
            for part in self.parts[c]:
                at = _find_run(seq, part)
                if at < 0:
                    break
                pos.extend(range(at, at + len(part)))
            else:
                found.append((c, np.array(sorted(set(pos)), np.int64)))
                if len(found) == limit:
                    break
        return found


def _find_run(seq: list[int], part: tuple[int, ...]) -> int:
    n = len(part)
    for i in range(len(seq) - n + 1):
        if tuple(seq[i : i + n]) == part:
            return i
    return -1


def chain_mask(selected: np.ndarray, positions: list[np.ndarray]) -> np.ndarray:
    """MVPTR's chain masking: concept j is masked when any of its tokens is selected for MLM."""
    return np.array([bool(selected[p].any()) if len(p) else False for p in positions], bool)


def mcr_select(n: int, rng: np.random.Generator, prob: float = MCR_MASK_PROB) -> tuple[np.ndarray, np.ndarray]:
    """Which of `n` tags are masked (prob each) and how: (selected, mode) with mode 0 = [MASK]
    (80 %), 1 = a random other tag (10 %), 2 = unchanged (10 %)."""
    selected = rng.random(n) < prob
    u = rng.random(n)
    return selected, np.where(u < 0.8, 0, np.where(u < 0.9, 1, 2))


# ---------------------------------------------------------------- the dataset


@dataclass
class Extra:
    """The concept parts of one sample (ids without padding)."""

    concepts: list[list[int]]  # clean sub-word ids of each phrase concept
    concept_masked: np.ndarray  # (C,) bool
    tags: list[list[int]]  # clean sub-word ids of each tag concept
    tag_input: list[list[int]]  # after MCR masking
    mcr_labels: np.ndarray  # (G,) class id of masked tags, IGNORE elsewhere
    image: int


class MvptrDataset(GranularityDataset):
    """Retrieved pairs with concepts on both sides, for the MVPTR objectives (mlm with chain
    masking, mcr, vsc, wpg, itm_hard)."""

    name = "mvptr"
    needs = frozenset({"pairs", "concepts"})  # concepts: the dataset vocabulary, built once by the driver

    def __init__(self, corpus: Corpus, tokenizer, cfg):
        super().__init__(corpus, tokenizer, cfg)
        vocab = getattr(corpus, "concepts", None)
        if vocab is None:
            vocab = corpus_concepts(corpus, int(getattr(cfg, "min_concept_count", DEFAULT_MIN_COUNT)))
            corpus.concepts = vocab  # type: ignore[attr-defined]  # the next dataset on this corpus reuses it
        self.matcher = ConceptMatcher(vocab, tokenizer)
        self.class_tag: dict[int, str] = {}
        for cid, tag in zip(corpus.class_ids.tolist(), corpus.tags):
            if cid >= 0:
                self.class_tag.setdefault(int(cid), tag)
        self.tag_classes = np.array(sorted(self.class_tag), np.int64)

    def __len__(self) -> int:
        return len(self.corpus.pair_text)

    def image_tags(self, image: int) -> tuple[list[int], list[list[int]]]:
        """The image's distinct tag classes (first-seen order) and their sub-word ids."""
        cls = self.corpus.class_ids[self.corpus.regions(image)]
        classes = list(dict.fromkeys(int(c) for c in cls if c >= 0))
        return classes, [self.tag_ids(self.class_tag[c]) for c in classes]

    def sample_pair(self, k: int, ids: np.ndarray, rng: np.random.Generator) -> tuple[Sample, Extra]:
        image = int(self.corpus.pair_image[k])
        select = rng.random(len(ids)) < self.cfg.mlm_prob
        new_ids, labels = self.masker(ids, select, rng)
        found = self.matcher.find(ids)
        masked = chain_mask(labels != IGNORE, [p for _, p in found])
        classes, tags = self.image_tags(image)
        sel, mode = mcr_select(len(tags), rng)
        tag_input = []
        for j, t in enumerate(tags):
            if sel[j] and mode[j] == 0:
                t = [self.masker.mask_id]
            elif sel[j] and mode[j] == 1 and len(self.tag_classes) > 1:
                t = self.tag_ids(self.class_tag[int(rng.choice(self.tag_classes[self.tag_classes != classes[j]]))])
            tag_input.append(t)
        mcr = np.where(sel, np.array(classes, np.int64), IGNORE).astype(np.int64)
        n = self.corpus.n_regions(image)
        sample = Sample(new_ids, labels, image, np.zeros(n, bool), np.full(n, IGNORE, np.int64), np.zeros(n, bool),
                        eligible=True, clean_ids=ids, item=k)  # fmt: skip
        extra = Extra([self.matcher.token_ids(c) for c, _ in found], masked, tags, tag_input, mcr, image)
        return sample, extra

    def collate(self, indices: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        c = self.corpus
        enc = self.encode([c.texts[c.pair_text[int(k)]] for k in indices])
        parts = [self.sample_pair(int(k), np.array(ids, np.int64), rng) for k, ids in zip(indices, enc["input_ids"])]
        batch = assemble([s for s, _ in parts], c, self.tok)
        batch.update(collate_concepts([e for _, e in parts], self.masker.mask_id))
        batch.update(granularity=self.name, regions_first=False)
        return batch


def _pad3(rows: list[list[list[int]]]) -> np.ndarray:
    C = max((len(r) for r in rows), default=0)
    L = max((len(x) for r in rows for x in r), default=1)
    out = np.full((len(rows), C, max(L, 1)), IGNORE, np.int64)
    for b, r in enumerate(rows):
        for j, x in enumerate(r):
            out[b, j, : len(x)] = x
    return out


def collate_concepts(extras: list[Extra], mask_id: int) -> dict[str, torch.Tensor]:
    """The concept tensors of a batch: (B, C, L) / (B, G, L) sub-word ids padded with IGNORE."""
    clean = _pad3([e.concepts for e in extras])
    masked = np.zeros(clean.shape[:2], bool)
    for b, e in enumerate(extras):
        masked[b, : len(e.concept_masked)] = e.concept_masked
    concept_in = clean.copy()
    concept_in[masked] = IGNORE
    concept_in[..., 0][masked] = mask_id  # a chain-masked concept enters as [MASK]
    tags_clean, tags_in = _pad3([e.tags for e in extras]), _pad3([e.tag_input for e in extras])
    mcr = np.full(tags_clean.shape[:2], IGNORE, np.int64)
    for b, e in enumerate(extras):
        mcr[b, : len(e.mcr_labels)] = e.mcr_labels
    return {
        "concept_ids": torch.from_numpy(concept_in),
        "clean_concept_ids": torch.from_numpy(clean),
        "concept_masked": torch.from_numpy(masked),
        "vtag_ids": torch.from_numpy(tags_in),
        "clean_vtag_ids": torch.from_numpy(tags_clean),
        "mcr_labels": torch.from_numpy(mcr),
        "image_index": torch.tensor([e.image for e in extras], dtype=torch.long),
    }


def corpus_concepts(corpus: Corpus, min_count: int) -> list[str]:
    """The concept vocabulary of this corpus's retrieved sentences, when the dataset's
    `concepts.json` was not attached (spaCy runs here, once per dataset object)."""
    texts = [corpus.texts[t] for t in dict.fromkeys(corpus.pair_text)]
    vocab, n = concept_vocabulary(texts, min_count, load_spacy())
    log.info("mvptr: %d concepts occur in ≥ %d of this corpus's %d sentences", len(vocab), min_count, n)
    return [v["concept"] for v in vocab]


GRANULARITIES.setdefault(MvptrDataset.name, MvptrDataset)
