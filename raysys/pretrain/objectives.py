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

import math
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

    def after_update(self, model: nn.Module) -> None:
        """Called after every optimiser step (every rank, same order), with the unwrapped model:
        where an objective updates state that is not trained by gradients (e.g. EMA teachers).
        Its state lives in this module, so checkpoints hold it and a resumed run is exact."""


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


# ---------------------------------------------------------------- MVPTR (papers/002, §3.2–3.3)
#
# These read the two-stage encoder (`ModelConfig.encoder = "two_stage"`): its uni-modal towers
# (`model.tower_embeddings`), its phrase-concept outputs (`out["concept_hidden"]`) and its
# cross-modal layers (`model.cross_encode`). Batches of the `mvptr` granularity
# (`raysys.pretrain.mvptr`) carry the concepts; `vsc` also runs on I-S batches (its positives).

MVPTR_GRANULARITIES = ("mvptr",)
VSC_INIT_TEMPERATURE = 0.07  # CLIP's / ALBEF's initial τ
WPG_MARGIN = 0.2


def vsc_per_sample(sim: torch.Tensor, scale: torch.Tensor | float, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """MVPTR Eq. 1 and L_vsc, per pair: `sim[i, k]` is the cosine of image i and text k, `scale` = 1/τ.
    Returns `-(log p_v2s(V_i, S_i) + log p_s2v(S_i, V_i)) / 2` for each i; its mean is L_vsc.
    `exclude` (off-diagonal, bool) drops pairs that are not negatives (the same image twice)."""
    logits = sim * scale
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    diag = torch.arange(sim.shape[0], device=sim.device)
    v2s = F.cross_entropy(logits, diag, reduction="none")  # image i over texts
    s2v = F.cross_entropy(logits.t(), diag, reduction="none")  # text i over images
    return 0.5 * (v2s + s2v)


def negative_distribution(sim_rows: torch.Tensor, scale: torch.Tensor | float, exclude: torch.Tensor) -> torch.Tensor:
    """Row-wise softmax of `sim_rows · scale` over the allowed candidates (`exclude` False): the
    distribution hard negatives are drawn from (the diagonal and same-image entries excluded)."""
    logits = (sim_rows.detach().float() * scale).masked_fill(exclude, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(p, nan=0.0)


def sample_hard_negatives(probs: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One index per row drawn from `probs` (rows of `negative_distribution`); (index, valid) —
    a row with no allowed candidate has no negative."""
    valid = probs.sum(-1) > 0
    safe = torch.where(valid.unsqueeze(-1), probs, torch.ones_like(probs))
    idx = torch.multinomial(safe, 1, generator=generator).squeeze(-1)
    return idx, valid


def wpg_similarity(phrases: torch.Tensor, phrase_mask: torch.Tensor, regions: torch.Tensor,
                   region_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """MVPTR Eq. 2: `S_wpg(V, S) = 1/M Σ_i max_j g(c_i)·g(r_j)` with g = L2 normalisation, per
    sample; (similarity (B,), valid (B,): the sample has a phrase and a region)."""
    c = F.normalize(phrases.float(), dim=-1)
    r = F.normalize(regions.float(), dim=-1)
    cos = torch.einsum("bch,brh->bcr", c, r).masked_fill(~region_mask.unsqueeze(1), float("-inf"))
    best = cos.max(-1).values  # (B, C)
    pm = phrase_mask & region_mask.any(-1, keepdim=True)
    best = torch.where(pm, best, torch.zeros_like(best))
    n = pm.sum(-1)
    return best.sum(-1) / n.clamp(min=1).to(best.dtype), n > 0


def wpg_hinge(pos: torch.Tensor, neg: torch.Tensor, margin: float = WPG_MARGIN) -> torch.Tensor:
    """L_wpg per sample: `max(0, margin + S_wpg(V_i', S_i) − S_wpg(V_i, S_i))` (the paper prints
    `min`, a typo: a hinge that could only be ≤ 0 would never train)."""
    return torch.clamp(margin + neg - pos, min=0.0)


def _vsc_scale(model: nn.Module) -> torch.Tensor | float:
    """1/τ of the model's VSC objective (the distribution hard negatives come from)."""
    objs = getattr(model, "objectives", {})
    return objs["vsc"].scale() if "vsc" in objs else 1.0 / VSC_INIT_TEMPERATURE


def _towers(model: nn.Module, out: dict[str, Any], batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(text (B,H), image (B,H), same-image mask (B,B) off the diagonal), computed once per batch."""
    if "towers" not in out:
        t, v = model.tower_embeddings(batch)
        out["towers"] = (t, v, _same_image(batch, t.shape[0], t.device))
    return out["towers"]


def _same_image(batch: dict[str, Any], B: int, device: torch.device) -> torch.Tensor:
    """(B, B) bool: pair k shows pair i's image, k ≠ i (not a negative for i)."""
    img = batch.get("image_index")
    eye = torch.eye(B, dtype=torch.bool, device=device)
    return (img.unsqueeze(0) == img.unsqueeze(1)) & ~eye if img is not None else torch.zeros_like(eye)


def hard_negative_pass(model: nn.Module, out: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """For each text S_i, a hard negative image V_i' drawn from p_s2v(S_i, ·) (Eq. 1), and the
    cross-modal layers run on (V_i', S_i); shared by WPG and ITM, computed once per batch."""
    if "hard_negative" not in out:
        t, v, same = _towers(model, out, batch)
        eye = torch.eye(t.shape[0], dtype=torch.bool, device=t.device)
        probs = negative_distribution(t @ v.t(), _vsc_scale(model), same | eye)  # row i: text i over images
        neg, valid = sample_hard_negatives(probs)
        rmask = batch["region_mask"][neg]
        h = model.cross_encode(torch.cat([out["text_uni"], out["concept_uni"]], 1), out["text_concept_mask"],
                               out["region_uni"][neg], rmask)  # fmt: skip
        T, C = out["text_uni"].shape[1], out["concept_uni"].shape[1]
        out["hard_negative"] = {"image": neg, "valid": valid, "text_hidden": h[:, :T],
                                "concept_hidden": h[:, T : T + C], "region_hidden": h[:, T + C :], "region_mask": rmask}  # fmt: skip
    return out["hard_negative"]


@register("vsc")
class VisualSemanticContrastive(Objective):
    """VSC (MVPTR §3.3): in-batch symmetric contrastive loss between the uni-modal towers' L2-normalised
    text and image embeddings, with a learnable temperature τ (stored as log(1/τ), clamped at 100
    like CLIP's). On I-S batches only the positive (retrieved) pairs take part."""

    needs = ("text_mask", "region_mask")
    granularities = (*MVPTR_GRANULARITIES, "is")

    def __init__(self, model):
        super().__init__(model)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / VSC_INIT_TEMPERATURE)))

    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=100.0)

    def forward(self, model, out, batch):
        t, v, same = _towers(model, out, batch)
        labels = batch.get("itm_labels")
        keep = labels != 0 if labels is not None else torch.ones(t.shape[0], dtype=torch.bool, device=t.device)
        B = t.shape[0]
        loss = torch.zeros(B, dtype=torch.float32, device=t.device)
        if int(keep.sum()) < 2:
            return ObjectiveOutput(loss, torch.zeros(B, dtype=torch.bool, device=t.device))
        idx = keep.nonzero().squeeze(-1)
        per = vsc_per_sample(v[idx] @ t[idx].t(), self.scale(), same[idx][:, idx])
        return ObjectiveOutput(loss.index_put((idx,), per), keep)


WPG_NEGATIVES = ("hard", "in_batch")  # raysys.pretrain.config.MvptrConfig.wpg_negative


def in_batch_negatives(same_or_self: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, a uniform draw among the other images of the batch (`same_or_self` True = not a
    negative); (index, valid)."""
    allowed = (~same_or_self).float()
    return sample_hard_negatives(allowed / allowed.sum(-1, keepdim=True).clamp(min=1.0))


@register("wpg")
class WeaklySupervisedPhraseGrounding(Objective):
    """WPG (MVPTR §3.3): phrase concepts vs regions after the cross-modal layers, aggregated by Eq. 2
    into a text-to-image similarity, hinge 0.2 against a negative image. `mvptr.wpg_negative`: `hard`
    (the paper) draws it from p_s2v and re-runs the cross-modal layers on (V_i', S_i); `in_batch`
    (the official code's default) takes a uniform other image of the batch, with its regions from its
    own pair's pass and S_i's phrases from theirs: no extra pass, and a yardstick that does not
    harden as VSC sharpens."""

    needs = ("concept_ids", "concept_masked")
    granularities = MVPTR_GRANULARITIES

    def __init__(self, model):
        super().__init__(model)
        opts = dict(getattr(model.cfg, "objective_options", {}).get("mvptr") or {})
        self.negative = opts.get("wpg_negative", "hard")  # checkpoints from before the option: the paper's
        if self.negative not in WPG_NEGATIVES:
            raise ValueError(f"mvptr.wpg_negative: {self.negative!r} is not one of {', '.join(WPG_NEGATIVES)}")

    def forward(self, model, out, batch):
        phrases = batch["concept_ids"].ne(IGNORE).any(-1) & ~batch["concept_masked"]  # masked concepts are [MASK]
        pos, ok_pos = wpg_similarity(out["concept_hidden"], phrases, out["region_hidden"], batch["region_mask"])
        if self.negative == "in_batch":
            B, dev = pos.shape[0], pos.device
            j, valid = in_batch_negatives(_same_image(batch, B, dev) | torch.eye(B, dtype=torch.bool, device=dev))
            neg, ok_neg = wpg_similarity(out["concept_hidden"], phrases, out["region_hidden"][j], batch["region_mask"][j])
        else:
            neg_out = hard_negative_pass(model, out, batch)
            valid = neg_out["valid"]
            neg, ok_neg = wpg_similarity(neg_out["concept_hidden"], phrases, neg_out["region_hidden"], neg_out["region_mask"])
        return ObjectiveOutput(wpg_hinge(pos, neg), ok_pos & ok_neg & valid)


@register("itm_hard")
class HardNegativeImageTextMatching(Objective):
    """ITM (MVPTR Eq. 4) on n matched pairs and n hard negatives: for each text, an image drawn from
    the VSC distribution p_s2v (the same draw WPG uses). Per sample: the mean of its positive's and
    its negative's cross-entropy."""

    needs = ("text_mask", "region_mask")
    granularities = (*MVPTR_GRANULARITIES, "codis")  # codis: raysys.pretrain.codis's retrieved pairs

    def forward(self, model, out, batch):
        neg_out = hard_negative_pass(model, out, batch)
        pos_logits = out["itm_logits"].float()
        pooled = model.pool_masked(neg_out["text_hidden"], batch["text_mask"], neg_out["region_hidden"],
                                   neg_out["region_mask"])  # fmt: skip
        neg_logits = model.itm_head(pooled).float()
        B = pos_logits.shape[0]
        ones = torch.ones(B, dtype=torch.long, device=pos_logits.device)
        loss = 0.5 * (F.cross_entropy(pos_logits, ones, reduction="none")
                      + F.cross_entropy(neg_logits, ones * 0, reduction="none"))  # fmt: skip
        return ObjectiveOutput(loss, neg_out["valid"], {"logits": pos_logits})


@register("mcr")
class MaskedConceptRecovering(Objective):
    """MCR (MVPTR §3.2): tag concepts of the visual tower masked at 0.25 (80/10/10), each masked one
    classified over the tag vocabulary (the detector classes) from the visual tower's output,
    through an MLP head this objective owns."""

    needs = ("mcr_labels", "vtag_ids")
    granularities = MVPTR_GRANULARITIES

    def __init__(self, model):
        super().__init__(model)
        H, eps = model.hidden_size, model.lm.config.layer_norm_eps
        self.head = nn.Sequential(nn.Linear(H, H), nn.GELU(), nn.LayerNorm(H, eps=eps), nn.Linear(H, model.cfg.num_classes))

    def forward(self, model, out, batch):
        labels = batch["mcr_labels"]
        h = out["tag_uni"]
        sel = labels != IGNORE
        if not bool(sel.any()):
            return _empty(labels.shape[0], h)
        ce = F.cross_entropy(self.head(h[sel]).float(), labels[sel], reduction="none")
        return per_sample_mean(ce, sel.nonzero()[:, 0], labels.shape[0])
