"""Pre-training objectives (paper §3.3), registered by name.

An objective is an `nn.Module` (so a later method — MVPTR's concept recovery, CODIS's codebook,
UNIMO-2's grounded dictionary — can own parameters) that turns the encoder's hidden states and a
batch into a **per-sample** loss and a per-sample validity mask. Per sample, because the §3.4
curriculum weights each retrieved pair by the model's own match probability `w_ITM`; the
curriculum then reduces `(loss, valid, weight)` to one number (`raysys.pretrain.curriculum.reduce_term`).

Register a new one with `@register("name")`; a granularity names the objectives it uses, and the
model builds every objective named in its config. Nothing in the core needs editing.

Label conventions (what the collators of `raysys.pretrain.granularities` produce):
- `mlm_labels` (B, T): original token id at masked text positions, -100 elsewhere;
- `mrc_labels` (B, R): detector class of each masked region, -100 elsewhere; optional
  `mrc_probs` (B, R, C): a stored class distribution, which switches MRC to KL divergence;
- `mrfr_mask` (B, R): masked regions whose input feature is regressed (L2);
- `pmrtc_labels` (B, R, L): sub-word ids of the phrase linked to each masked region, -100 padded;
- `itm_labels` (B,): 1 retrieved pair, 0 random re-pairing, -100 not an ITM sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from raysys.pretrain.model import VLModel

IGNORE = -100


@dataclass
class ObjectiveOutput:
    """`loss[i]` is sample i's mean loss over its targets; `valid[i]` says it had any."""

    loss: torch.Tensor  # (B,) float
    valid: torch.Tensor  # (B,) bool
    extras: dict[str, torch.Tensor] | None = None


OBJECTIVES: dict[str, type[Objective]] = {}


def register(name: str):
    def deco(cls: type[Objective]) -> type[Objective]:
        if name in OBJECTIVES and OBJECTIVES[name] is not cls:
            raise ValueError(f"objective {name!r} is already registered")
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return deco


def build_objectives(names, model: VLModel) -> nn.ModuleDict:
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        from raysys.config import ConfigError

        raise ConfigError(f"unknown objective(s) {unknown}; registered: {sorted(OBJECTIVES)}")
    return nn.ModuleDict({n: OBJECTIVES[n](model) for n in names})


class Objective(nn.Module):
    name = ""

    def __init__(self, model: VLModel):
        super().__init__()

    def forward(self, model: VLModel, out: dict[str, Any], batch: dict[str, Any]) -> ObjectiveOutput:
        raise NotImplementedError


def per_sample_mean(values: torch.Tensor, sample_idx: torch.Tensor, batch_size: int) -> ObjectiveOutput:
    """Average item losses (one per masked token / region) per sample."""
    sums = torch.zeros(batch_size, dtype=values.dtype, device=values.device).index_add(0, sample_idx, values)
    counts = torch.bincount(sample_idx, minlength=batch_size)
    return ObjectiveOutput(sums / counts.clamp(min=1).to(values.dtype), counts > 0)


def _empty(batch_size: int, like: torch.Tensor) -> ObjectiveOutput:
    z = torch.zeros(batch_size, dtype=like.dtype, device=like.device)
    return ObjectiveOutput(z, torch.zeros(batch_size, dtype=torch.bool, device=like.device))


@register("mlm")
class MaskedLanguageModeling(Objective):
    """Cross-entropy of masked text tokens (tags, phrases or sentence words) through the tied decoder.
    Only masked positions go through the 30k-way decoder: that is most of the head's cost."""

    def forward(self, model, out, batch):
        labels = batch["mlm_labels"]
        h = out["text_hidden"]
        sel = labels != IGNORE
        if not bool(sel.any()):
            return _empty(labels.shape[0], h)
        logits = model.mlm_logits(h[sel]).float()
        ce = F.cross_entropy(logits, labels[sel], reduction="none")
        return per_sample_mean(ce, sel.nonzero()[:, 0], labels.shape[0])


@register("mrc")
class MaskedRegionClassification(Objective):
    """Predict the detector class of a masked region: cross-entropy against the detected class id,
    or KL(stored distribution ‖ prediction) when the images table carries class distributions."""

    def forward(self, model, out, batch):
        labels = batch["mrc_labels"]
        h = out["region_hidden"]
        sel = labels != IGNORE
        if not bool(sel.any()):
            return _empty(labels.shape[0], h)
        logits = model.mrc_head(h[sel]).float()
        probs = batch.get("mrc_probs")
        if probs is not None:
            target = probs[sel].float()
            loss = F.kl_div(F.log_softmax(logits, -1), target, reduction="none").sum(-1)
        else:
            loss = F.cross_entropy(logits, labels[sel], reduction="none")
        return per_sample_mean(loss, sel.nonzero()[:, 0], labels.shape[0])


@register("mrfr")
class MaskedRegionFeatureRegression(Objective):
    """L2 regression of a masked region's output to its input feature (mean over feature dims, so
    the scale does not depend on the feature dimension)."""

    def forward(self, model, out, batch):
        sel = batch["mrfr_mask"]
        h = out["region_hidden"]
        if not bool(sel.any()):
            return _empty(sel.shape[0], h)
        pred = model.mrfr_head(h[sel]).float()
        target = batch["region_feats"][sel].float()
        loss = (pred - target).pow(2).mean(-1)
        return per_sample_mean(loss, sel.nonzero()[:, 0], sel.shape[0])


@register("pmrtc")
class PhraseGuidedMaskedRegionToTokenClassification(Objective):
    """p-MRTC (§3.3.2): classify a masked region into the sub-word tokens of its linked noun phrase,
    through the MLM decoder (the BERT vocabulary is the label space). A phrase has several
    sub-words, so the target is the uniform distribution over them: the loss is the mean
    cross-entropy over the phrase's sub-words (its floor is the entropy of that distribution)."""

    def forward(self, model, out, batch):
        labels = batch["pmrtc_labels"]  # (B, R, L)
        h = out["region_hidden"]
        tok_ok = labels != IGNORE
        sel = tok_ok.any(-1)
        if not bool(sel.any()):
            return _empty(labels.shape[0], h)
        logp = F.log_softmax(model.mlm_logits(h[sel]).float(), -1)  # (N, V)
        tok = labels[sel]
        ok = tok_ok[sel]
        nll = -logp.gather(1, tok.clamp(min=0)) * ok
        loss = nll.sum(1) / ok.sum(1)
        return per_sample_mean(loss, sel.nonzero()[:, 0], labels.shape[0])


@register("itm")
class ImageTextMatching(Objective):
    """Binary match / no-match on [CLS] (two logits; the softmax of the match logit is `w_ITM`)."""

    def forward(self, model, out, batch):
        labels = batch["itm_labels"]
        logits = out["itm_logits"].float()
        valid = labels != IGNORE
        loss = F.cross_entropy(logits, labels.clamp(min=0), reduction="none") * valid
        return ObjectiveOutput(loss, valid, {"logits": logits})
