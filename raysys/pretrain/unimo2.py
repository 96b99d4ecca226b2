"""UNIMO-2 (papers/003): the grounded dictionary, its objectives and granularities.

**The grounded dictionary** G ∈ R^{C×D} (§3.1) is a parameter of the model (`VLModel.grounding`,
built when `fusion: grounded` or the `grounded` objective is on), because the Grounded Transformer
reads the grounded tokens at encode time, and the `grounded` objective reads the same selection.
On the two-stage encoder's uni-modal outputs u_i (text tokens, regions):

    x_ij = σ(η · u_iᵀ g_j)                                   (Eq. 1, η learnable)
    s_j  = Σ_i x_ij   over the tokens of both modalities for a pair, of one for unpaired input (Eq. 2)
    grounded tokens = g_j for the K largest s_j
    L_GD = mean_i ‖sg(u_i) − Σ_j x_ij / Σ_k x_ik · g_j‖² + β · mean_{j∈top-K} ‖sg(g_j) − Σ_i x_ij / s_j · u_i‖²   (Eq. 3)

Eq. 3 sums over tokens and squared norms; here each ‖·‖² is a mean over the D dimensions and each
sum a mean over its tokens / grounded tokens, so the term's scale depends neither on the width nor
on the sequence length (as MRFR's regression does); otherwise it is Eq. 3 term for term.

**Span MLM** (§3.2, after SpanBERT): spans of length l ~ Geo(p = 0.2), resampled above
`max_span` (SpanBERT's 10), are drawn at uniform starts until `mask_budget` (15 %) of the text's
tokens are selected; the selected tokens get BERT's 80/10/10 replacement.

**Granularities** (registered in `GRANULARITIES` on import; the `unimo2` recipe imports this module):
`unimo2_pairs` — a retrieved pair, or with `is_neg_prob` a random other image (an ITM negative, as
I-S draws them), span-masked text; `unimo2_images` — the regions of one image, no text;
`unimo2_texts` — one sentence of the text corpus, span-masked. A batch's `ground` key says which
modalities accumulate Eq. 2's scores ("both", "image", "text").

Objectives: `grounded` (L_GD, any batch of a model with the dictionary), `span_mlm` (pairs, texts),
`unimo2_itm` (ITM on `unimo2_pairs`, whose positives and negatives the collator draws).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysys.config import ConfigError
from raysys.pretrain.config import Unimo2Config
from raysys.pretrain.granularities import GRANULARITIES, GranularityDataset, Sample, assemble, pair_samples
from raysys.pretrain.objectives import (
    IGNORE,
    ImageTextMatching,
    Objective,
    ObjectiveOutput,
    per_sample_mean,
    register,
)

PAIRS, IMAGES, TEXTS = "unimo2_pairs", "unimo2_images", "unimo2_texts"
UNPAIRED = (IMAGES, TEXTS)
GROUND = ("both", "image", "text")  # the modalities whose tokens accumulate Eq. 2's scores


def options(model_cfg: Any) -> Unimo2Config:
    """The model's UNIMO-2 hyper-parameters: `objective_options["unimo2"]` over the paper's defaults
    (a checkpoint from before a field existed gets its default)."""
    given = dict(getattr(model_cfg, "objective_options", {}).get("unimo2", {}))
    known = asdict(Unimo2Config())
    unknown = set(given) - set(known)
    if unknown:
        raise ConfigError(f"unimo2: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    return Unimo2Config(**{**known, **given})


# ---------------------------------------------------------------- the grounded dictionary (Eq. 1–3)


@dataclass
class Grounding:
    """One batch's grounding: what the fusion appends and what L_GD reads."""

    tokens: torch.Tensor  # (B, L, D) the uni-modal token representations u (text then regions)
    mask: torch.Tensor  # (B, L) bool: tokens that accumulate scores (Eq. 2)
    x: torch.Tensor  # (B, L, C) sigmoid similarities (Eq. 1), zero where `mask` is False
    scores: torch.Tensor  # (B, C) accumulated scores s_j
    index: torch.Tensor  # (B, K) the top-K entries
    grounded: torch.Tensor  # (B, K, D) their embeddings g_j (the Grounded Transformer's extra tokens)


class GroundedDictionary(nn.Module):
    """G (C × D), randomly initialised (§3.1) as BERT initialises embeddings (N(0, std²), the
    backbone's `initializer_range`: at N(0, 1) AdamW's steps of ~lr would barely move it in a
    short run), and the learnable temperature η of Eq. 1 (stored as log η: it stays positive)."""

    def __init__(self, size: int, dim: int, k: int, eta_init: float = 0.0, std: float = 0.02):
        super().__init__()
        if size < 1 or not 1 <= k <= size:
            raise ConfigError(f"unimo2: grounded_k={k} must be in [1, dictionary_size={size}]")
        self.k = k
        self.weight = nn.Parameter(torch.randn(size, dim) * std)
        self.log_eta = nn.Parameter(torch.tensor(math.log(eta_init if eta_init > 0 else 1.0 / math.sqrt(dim))))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> Grounding:
        return ground(tokens, mask, self.weight, self.log_eta.exp(), self.k)


def ground(tokens: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, eta: torch.Tensor | float, k: int) -> Grounding:
    """Eq. 1–2: similarities of every counted token to every entry, accumulated scores, top K."""
    g = weight.to(tokens.dtype)
    x = torch.sigmoid(eta * tokens.float() @ g.float().t()) * mask.unsqueeze(-1).float()
    scores = x.sum(1)
    index = scores.topk(k, dim=-1).indices
    return Grounding(tokens, mask, x, scores, index, g[index])


def grounding_loss(gr: Grounding, weight: torch.Tensor, beta: float) -> ObjectiveOutput:
    """L_GD (Eq. 3) per sample: the dictionary moves towards the tokens it is mapped to (first
    term, tokens stop-gradient), and the tokens commit to the grounded tokens (β, entries
    stop-gradient). Means over D, over the counted tokens and over the K grounded tokens."""
    u = gr.tokens.float()
    g = weight.float()
    m = gr.mask.float()
    assign = gr.x / gr.x.sum(-1, keepdim=True).clamp(min=1e-12)  # (B, L, C): x_ij / Σ_k x_ik
    recon = ((u.detach() - assign @ g) ** 2).mean(-1)  # (B, L)
    n = m.sum(1)
    term1 = (recon * m).sum(1) / n.clamp(min=1.0)
    xk = gr.x.gather(2, gr.index.unsqueeze(1).expand(-1, u.shape[1], -1))  # (B, L, K)
    sk = gr.scores.gather(1, gr.index).clamp(min=1e-12)  # (B, K)
    centre = torch.einsum("blk,bld->bkd", xk / sk.unsqueeze(1), u)  # Σ_i x_ij / s_j · u_i
    term2 = ((g[gr.index].detach() - centre) ** 2).mean(-1).mean(-1)
    return ObjectiveOutput(term1 + beta * term2, n > 0)


def ground_mask(text_mask: torch.Tensor, region_mask: torch.Tensor, ground_on: str) -> torch.Tensor:
    """Which of `[text, regions]` accumulate scores: both for pairs, one modality for unpaired input."""
    if ground_on not in GROUND:
        raise ValueError(f"ground: {ground_on!r} is not one of {GROUND}")
    t = text_mask if ground_on != "image" else torch.zeros_like(text_mask)
    r = region_mask if ground_on != "text" else torch.zeros_like(region_mask)
    return torch.cat([t, r], 1).bool()


def grounded_allowed(text_mask: torch.Tensor, region_mask: torch.Tensor, k: int) -> torch.Tensor:
    """The Grounded Transformer's attention pattern over `[text (T), regions (R), grounded (K)]`,
    (B, L, L) bool, True = query may attend to key: text and regions attend within their modality
    and to the grounded tokens, never to each other; grounded tokens attend to everything; padded
    keys are closed. Every query row keeps the K grounded keys open, so no row is empty."""
    B, T = text_mask.shape
    R = region_mask.shape[1]
    seg = torch.cat([torch.zeros(T), torch.ones(R), torch.full((k,), 2.0)]).to(text_mask.device)
    cross = ((seg[:, None] == 0) & (seg[None, :] == 1)) | ((seg[:, None] == 1) & (seg[None, :] == 0))
    keys = torch.cat([text_mask.bool(), region_mask.bool(), torch.ones(B, k, dtype=torch.bool, device=text_mask.device)], 1)
    return ~cross.unsqueeze(0) & keys.unsqueeze(1)


# ---------------------------------------------------------------- span masking (§3.2)


def span_lengths(rng: np.random.Generator, p: float, max_span: int, n: int) -> np.ndarray:
    """n span lengths l ~ Geo(p) on {1, 2, …}, resampled above `max_span` (SpanBERT's clipping)."""
    out = rng.geometric(p, n)
    bad = out > max_span
    while bad.any():
        out[bad] = rng.geometric(p, int(bad.sum()))
        bad = out > max_span
    return out


def span_select(n: int, rng: np.random.Generator, p: float, max_span: int, budget: float) -> tuple[np.ndarray, list[int]]:
    """Which of `n` tokens span MLM masks, and the span lengths drawn: spans at uniform starts
    until at least round(budget · n) tokens (≥ 1) are selected; a span is kept whole, so the
    selection may exceed the budget by less than one span (a span longer than the text is the
    whole text). Spans may overlap: the budget counts distinct tokens."""
    select = np.zeros(n, bool)
    lengths: list[int] = []
    if n == 0:
        return select, lengths
    want = max(1, int(round(budget * n)))
    while select.sum() < want:
        length = int(min(span_lengths(rng, p, max_span, 1)[0], n))
        start = int(rng.integers(0, n - length + 1))
        select[start : start + length] = True
        lengths.append(length)
    return select, lengths


# ---------------------------------------------------------------- granularities


class _Unimo2Dataset(GranularityDataset):
    ground = "both"

    def span_mask(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        o = self.cfg.unimo2
        select, _ = span_select(len(ids), rng, o.span_p, o.max_span, o.mask_budget)
        return self.masker(ids, select, rng)

    def collate(self, indices: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        batch = assemble(self.samples(indices, rng), self.corpus, self.tok)
        # span MLM's targets have their own key: the standard `mlm` (every granularity) sees none
        batch["span_mlm_labels"] = batch["mlm_labels"]
        batch["mlm_labels"] = torch.full_like(batch["mlm_labels"], IGNORE)
        batch.update(granularity=self.name, regions_first=False, ground=self.ground)
        return batch


class Unimo2Pairs(_Unimo2Dataset):
    """A retrieved pair (ITM positive) or, with `is_neg_prob`, its text with a random other image
    (negative); span-masked text in both, so [MASK] says nothing about the label (as I-S)."""

    name = PAIRS
    needs = frozenset({"pairs"})

    def __len__(self) -> int:
        return len(self.corpus.pair_text)

    def samples(self, indices: np.ndarray, rng: np.random.Generator) -> list[Sample]:
        return pair_samples(self, indices, rng, self.span_mask, negatives=True)


class Unimo2Images(_Unimo2Dataset):
    """One image's regions alone (the text side is only [CLS] [SEP], which does not ground)."""

    name = IMAGES
    ground = "image"

    def __len__(self) -> int:
        return self.corpus.n_images

    def sample(self, i: int, rng: np.random.Generator) -> Sample:
        n = self.corpus.n_regions(i)
        empty = np.zeros(0, np.int64)
        return Sample(empty, empty, i, np.zeros(n, bool), np.full(n, IGNORE, np.int64), np.zeros(n, bool), item=i)


class Unimo2Texts(_Unimo2Dataset):
    """One sentence of the text corpus alone, span-masked."""

    name = TEXTS
    needs = frozenset({"text_pool"})
    ground = "text"

    def __len__(self) -> int:
        return len(self.corpus.text_pool)

    def samples(self, indices: np.ndarray, rng: np.random.Generator) -> list[Sample]:
        enc = self.encode([self.corpus.texts[self.corpus.text_pool[int(k)]] for k in indices])
        out = []
        for k, ids in zip(indices, enc["input_ids"]):
            ids = np.array(ids, np.int64)
            new_ids, labels = self.span_mask(ids, rng)
            out.append(Sample(new_ids, labels, clean_ids=ids, item=int(k)))
        return out


for _cls in (Unimo2Pairs, Unimo2Images, Unimo2Texts):
    GRANULARITIES.setdefault(_cls.name, _cls)


# ---------------------------------------------------------------- objectives


def batch_grounding(model: nn.Module, out: dict[str, Any], batch: dict[str, Any]) -> Grounding:
    """The batch's grounding: the fusion's (`out["grounding"]`), or computed on the uni-modal
    outputs when the fusion is `full` (the objective alone, on a model that owns the dictionary)."""
    if out.get("grounding") is None:
        if getattr(model, "grounding", None) is None or "text_uni" not in out:
            raise ConfigError("objective grounded: needs encoder: two_stage (its uni-modal outputs)")
        tokens = torch.cat([out["text_uni"], out["concept_uni"], out["region_uni"]], 1)
        mask = ground_mask(out["text_concept_mask"], batch["region_mask"], batch.get("ground", "both"))
        out["grounding"] = model.grounding(tokens, mask)
    return out["grounding"]


@register("grounded")
class GroundedLearning(Objective):
    """L_GD (Eq. 3) on the batch's grounding; β from `unimo2.beta`."""

    needs = ("text_mask", "region_mask")

    def __init__(self, model):
        super().__init__(model)
        self.beta = options(model.cfg).beta

    def forward(self, model, out, batch):
        return grounding_loss(batch_grounding(model, out, batch), model.grounding.weight, self.beta)


@register("span_mlm")
class SpanMaskedLanguageModeling(Objective):
    """Cross-entropy of the span-masked tokens (`span_mlm_labels`) through the tied decoder, from
    the Grounded Transformer's text outputs (regions reach them only through grounded tokens)."""

    needs = ("span_mlm_labels",)
    granularities = (PAIRS, TEXTS)

    def forward(self, model, out, batch):
        labels = batch["span_mlm_labels"]
        h = out["text_hidden"]
        sel = labels != IGNORE
        if not bool(sel.any()):
            z = torch.zeros(labels.shape[0], dtype=h.dtype, device=h.device)
            return ObjectiveOutput(z, torch.zeros_like(sel[:, 0]))
        ce = F.cross_entropy(model.mlm_logits(h[sel]).float(), labels[sel], reduction="none")
        return per_sample_mean(ce, sel.nonzero()[:, 0], labels.shape[0])


@register("unimo2_itm")
class GroundedImageTextMatching(ImageTextMatching):
    """ITM (§3.2) on `unimo2_pairs`: retrieved pairs against random images."""

    granularities = (PAIRS,)
