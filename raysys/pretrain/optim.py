"""The optimiser step every training loop of raysys shares: pre-training (local and Ray Train) and
fine-tuning. One place decides the AdamW parameter groups, the warm-up/decay schedule, gradient
accumulation and clipping, so a change to any of them reaches every loop at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class OptimHyper(Protocol):
    """The fields a config needs for `make_optimizer` (PretrainConfig and the fine-tune task
    settings both have them)."""

    lr: float
    weight_decay: float
    warmup_ratio: float
    grad_clip: float


def make_optimizer(model: torch.nn.Module, hp: OptimHyper, total_steps: int):
    """AdamW (no decay on biases and LayerNorms), linear warm-up then linear decay to 0."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)  # biases, LayerNorms, the modality vector
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr
    )
    warm = max(1, int(round(hp.warmup_ratio * total_steps))) if hp.warmup_ratio > 0 else 0

    def factor(s: int) -> float:
        if warm and s < warm:
            return (s + 1) / warm
        return max(0.0, (total_steps - s) / max(1, total_steps - warm))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@dataclass
class Optimizer:
    """AdamW + schedule + clipping + accumulation: `backward(loss)` once per micro-batch, then
    `update()` once per optimiser step. Gradients are cleared after the update, so a loop can
    never step on gradients of an earlier step."""

    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    params: list[torch.nn.Parameter]
    grad_clip: float = 0.0
    grad_accum: int = 1

    @classmethod
    def build(cls, model: torch.nn.Module, hp: OptimHyper, total_steps: int, grad_accum: int = 1) -> Optimizer:
        opt, sched = make_optimizer(model, hp, total_steps)
        return cls(opt, sched, list(model.parameters()), hp.grad_clip, grad_accum)

    @property
    def lr(self) -> float:
        return float(self.sched.get_last_lr()[0])

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum if self.grad_accum > 1 else loss).backward()

    def update(self) -> None:
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
