"""The multi-granular curriculum (paper §3.4): how granularity batches are mixed, and how the
model's own image-text match probability `w_ITM` weights the retrieved pairs from epoch m on.

    L = L_RT + L_RP + L_IS                  if epoch < m
    L = L_RT + w_ITM · (L_RP + L_IS)        if epoch ≥ m

`w_ITM` is per sample: the softmax match probability of each *positive retrieved* pair, computed
without gradient (the weight must not teach the ITM head to lower itself to shrink the loss).
ITM negatives (random re-pairings) keep weight 1 — their job is to train the matcher. This module
holds the whole of it: when the weighting turns on (`weights_active`), how `w_ITM` is computed
(`match_weights`), and how it and `loss_weights` weight each objective's term (`granularity_loss`);
`raysys.pretrain.loop.make_step` only calls `granularity_loss` per batch.

Mixing strategies are pure functions of the global step, so a resumed or distributed run draws
the same granularity at the same step on every rank:
- `round_robin`: one granularity per step, cycling in order (the paper's "iteratively pre-trained
  on each granularity");
- `proportional`: one granularity per step, drawn in proportion to its number of batches — each
  epoch is a seeded shuffle of a bag holding every granularity's batches exactly once;
- `joint`: one batch of every granularity per step, losses summed (the formula above, literally).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from raysys.config import ConfigError
from raysys.pretrain.objectives import ObjectiveOutput

# Granularities whose samples are retrieved (weakly aligned) pairs: the ones w_ITM weights.
WEIGHTED_GRANULARITIES = ("rp", "is")


# ---------------------------------------------------------------- w_ITM


def itm_match_weights(itm_logits: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Per-sample weights: softmax match probability for eligible (positive retrieved) pairs, 1 for
    the rest (ITM negatives). Detached: no gradient flows through a weight."""
    with torch.no_grad():
        p = torch.softmax(itm_logits.detach().float(), dim=-1)[:, 1]
        return torch.where(eligible.to(p.device), p, torch.ones_like(p))


def reduce_term(out: ObjectiveOutput, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over samples that have targets of `weight · per-sample loss`.

    The denominator is the number of valid samples, not the sum of weights: a batch of poorly
    aligned pairs should contribute *less*, which renormalising would undo.
    """
    valid = out.valid.to(out.loss.dtype)
    w = valid if weights is None else valid * weights.to(out.loss.dtype)
    return (out.loss * w).sum() / valid.sum().clamp(min=1.0)


def weights_active(epoch: int, m: int, enabled: bool) -> bool:
    return enabled and epoch >= m


def match_weights(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """w_ITM for each sample of a batch: the model's match probability on the *unmasked* pair, in
    eval mode and without gradient (masking the linked phrase would otherwise bias the estimate)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            clean = {**batch, "input_ids": batch["clean_input_ids"], "region_masked": None, "objectives": ()}
            logits = model(clean)["itm_logits"]
    finally:
        model.train(was_training)
    return itm_match_weights(logits, batch["itm_eligible"])


def granularity_loss(
    model: torch.nn.Module, batch: dict[str, Any], epoch: int, m: int, enabled: bool, loss_weights: Mapping[str, float]
) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """One granularity batch's part of L, and what to log: `(part, [(name, value), …])`.

    From epoch m on (when `enabled`), the terms of a WEIGHTED_GRANULARITIES batch are weighted per
    sample by `w_ITM` (logged as `w_itm`: its mean over the eligible samples); every term is then
    scaled by `loss_weights[name]` (absent = 1). The logged values are the *unweighted* terms."""
    logged: list[tuple[str, torch.Tensor]] = []
    weights = None
    if batch["granularity"] in WEIGHTED_GRANULARITIES and weights_active(epoch, m, enabled):
        weights = match_weights(model, batch)
        elig = batch["itm_eligible"]
        if bool(elig.any()):
            logged.append(("w_itm", weights[elig.to(weights.device)].mean()))
    out = model(batch)
    part = out["aux_zero"]
    for name, res in out["losses"].items():
        term = reduce_term(res, weights)
        part = part + (term * loss_weights[name] if name in loss_weights else term)
        if bool(res.valid.any()):
            logged.append((name, reduce_term(res).detach()))
        logged += [(k, v.detach()) for k, v in (res.extras or {}).get("log", {}).items()]  # e.g. codebook_usage
    return part, logged


# ---------------------------------------------------------------- mixing strategies


class Mixer:
    """Which (granularity, batch index within that granularity) pairs a global step uses."""

    def __init__(self, names: Sequence[str], batches_per_epoch: dict[str, int], seed: int):
        if not names:
            raise ValueError("no granularities to mix")
        self.names = list(names)
        self.nb = {n: max(1, int(batches_per_epoch[n])) for n in names}
        self.seed = seed

    @property
    def steps_per_epoch(self) -> int:
        return sum(self.nb.values())

    def at(self, step: int) -> list[tuple[str, int]]:
        raise NotImplementedError


class RoundRobin(Mixer):
    def at(self, step: int) -> list[tuple[str, int]]:
        g = len(self.names)
        return [(self.names[step % g], step // g)]


class Proportional(Mixer):
    def __init__(self, names, batches_per_epoch, seed):
        super().__init__(names, batches_per_epoch, seed)
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is None or self._cache[0] != e:
            bag = np.concatenate([np.full(self.nb[n], i) for i, n in enumerate(self.names)])
            order = np.random.default_rng([self.seed, 0x5EED, e]).permutation(bag)
            # rank of each slot among the slots of its granularity in this epoch
            within = np.zeros(len(order), dtype=np.int64)
            for i in range(len(self.names)):
                pos = np.flatnonzero(order == i)
                within[pos] = np.arange(len(pos))
            self._cache = (e, order, within)
        return self._cache[1], self._cache[2]

    def at(self, step: int) -> list[tuple[str, int]]:
        e, s = divmod(step, self.steps_per_epoch)
        order, within = self._epoch(e)
        n = self.names[int(order[s])]
        return [(n, e * self.nb[n] + int(within[s]))]


class Joint(Mixer):
    @property
    def steps_per_epoch(self) -> int:
        return max(self.nb.values())

    def at(self, step: int) -> list[tuple[str, int]]:
        return [(n, step) for n in self.names]


MIXERS: dict[str, type[Mixer]] = {"round_robin": RoundRobin, "proportional": Proportional, "joint": Joint}


def make_mixer(strategy: str, names: Sequence[str], batches_per_epoch: dict[str, int], seed: int) -> Mixer:
    if strategy not in MIXERS:
        raise ConfigError(f"mixing: unknown strategy {strategy!r}; known: {sorted(MIXERS)}")
    return MIXERS[strategy](names, batches_per_epoch, seed)
