"""Pre-training objectives (paper §3.3), registered by name.

An objective is an `nn.Module` (so a later method — MVPTR's concept recovery, CODIS's codebook,
UNIMO-2's grounded dictionary — can own parameters) that turns the encoder's hidden states and a
batch into a **per-sample** loss and a per-sample validity mask. Per sample, because the §3.4
curriculum weights each retrieved pair by the model's own match probability `w_ITM`; the
curriculum then reduces `(loss, valid, weight)` to one number (`raysys.pretrain.curriculum.reduce_term`).

A new objective is one registered class and nothing else: `@register("name")` on an `Objective`
subclass that declares the batch keys it reads (`needs`) and the granularities whose batches it
applies to (`granularities`, `ALL` by default). The model builds every objective its config names
(the standard five plus `extra_objectives`) and, on a batch of granularity g, runs those that apply
to g, in the model's order; `loss_weights.name` scales its term. Nothing in the core needs editing.

Label conventions (what the collators of `raysys.pretrain.granularities` produce):
- `mlm_labels` (B, T): original token id at masked text positions, -100 elsewhere;
- `mrc_labels` (B, R): detector class of each masked region, -100 elsewhere; optional
  `mrc_probs` (B, R, C): a stored class distribution, which switches MRC to KL divergence;
- `mrfr_mask` (B, R): masked regions whose input feature is regressed (L2);
- `pmrtc_labels` (B, R, L): sub-word ids of the phrase linked to each masked region, -100 padded;
- `itm_labels` (B,): 1 retrieved pair, 0 random re-pairing, -100 not an ITM sample.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raysys.config import ConfigError

IGNORE = -100
ALL = "*"  # `granularities = (ALL,)`: the objective applies to a batch of any granularity


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


def build_objectives(names: Iterable[str], model: nn.Module) -> nn.ModuleDict:
    names = list(names)
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise ConfigError(f"unknown objective(s) {unknown}; registered: {sorted(OBJECTIVES)}")
    return nn.ModuleDict({n: OBJECTIVES[n](model) for n in names})


class Objective(nn.Module):
    """One pre-training loss. `model` is the `VLModel` (typed as a plain module here so that this
    module does not depend on the model's: objectives only call what they read off it).

    `needs`: the batch keys `forward` reads (checked before it runs, so a granularity that does not
    produce them fails with the key's name). `granularities`: the granularity names whose batches it
    applies to, or `(ALL,)`."""

    name = ""
    needs: tuple[str, ...] = ()
    granularities: tuple[str, ...] = (ALL,)

    def __init__(self, model: nn.Module):
        super().__init__()

    @classmethod
    def applies_to(cls, granularity: str | None) -> bool:
        return granularity is not None and (ALL in cls.granularities or granularity in cls.granularities)

    def forward(self, model: nn.Module, out: dict[str, Any], batch: dict[str, Any]) -> ObjectiveOutput:
        raise NotImplementedError


def active_objectives(objectives: Mapping[str, Objective], batch: dict[str, Any]) -> tuple[str, ...]:
    """The names of `objectives` (in their order) to run on `batch`: `batch["objectives"]` when the
    caller names them (`()` = encode only), else those that apply to `batch["granularity"]`. Fails
    on an objective whose needed keys the batch lacks."""
    if "objectives" in batch:
        return tuple(batch["objectives"])
    g = batch.get("granularity")
    names = tuple(n for n, o in objectives.items() if o.applies_to(g))
    for n in names:
        missing = [k for k in objectives[n].needs if k not in batch]
        if missing:
            raise KeyError(f"objective {n!r} applies to granularity {g!r}, but its batches have no {missing}")
    return names


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

    needs = ("mlm_labels",)
    granularities = (ALL,)

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

    needs = ("mrc_labels",)
    granularities = ("rt", "image", "pairs")

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

    needs = ("mrfr_mask", "region_feats")
    granularities = ("rt", "image", "pairs")

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

    needs = ("pmrtc_labels",)
    granularities = ("rp",)

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

    needs = ("itm_labels",)
    granularities = ("is",)

    def forward(self, model, out, batch):
        labels = batch["itm_labels"]
        logits = out["itm_logits"].float()
        valid = labels != IGNORE
        loss = F.cross_entropy(logits, labels.clamp(min=0), reduction="none") * valid
        return ObjectiveOutput(loss, valid, {"logits": logits})
