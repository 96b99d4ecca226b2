"""Pieces several tasks share: UNITER's MLP head, the head wrapper, single-image pair batches,
batched prediction, and the classification loss and accuracy. A task module picks what fits and
writes the rest itself."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysys.evaluate.downstream import pair_batch, to_device
from raysys.evaluate.metrics import accuracy
from raysys.evaluate.tasks.registry import Collate, Encoded, State, TaskData


def mlp_head(vl: nn.Module, inp: int, hidden: int, out: int) -> nn.Sequential:
    """UNITER's task head (Linear → GELU → LayerNorm → Linear), its Linear layers initialised like
    the encoder's own (normal with the encoder's `initializer_range`, zero bias)."""
    cfg = vl.lm.config
    net = nn.Sequential(nn.Linear(inp, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=cfg.layer_norm_eps),
                        nn.Linear(hidden, out))  # fmt: skip
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=cfg.initializer_range)
            nn.init.zeros_(m.bias)
    return net


class Head(nn.Module):
    """A task's trainable layers `net` and how they read the encoder's output:
    `read(net, encoded, batch)` → logits."""

    def __init__(self, net: nn.Module, read: Callable[[nn.Module, Encoded, dict[str, Any]], torch.Tensor]):
        super().__init__()
        self.net = net
        self.read = read

    def forward(self, enc: Encoded, batch: dict[str, Any]) -> torch.Tensor:
        return self.read(self.net, enc, batch)


def on_pooled(net: nn.Module, enc: Encoded, batch: dict[str, Any]) -> torch.Tensor:
    """The head reads the pooled vector ([CLS] or mean, `ModelConfig.pooling`)."""
    return net(enc.pooled)


def single_image_batch(data: TaskData, idx: np.ndarray, tokenizer) -> dict[str, Any]:
    """Examples `idx` as (text, first image) pairs; the caller adds the labels."""
    return pair_batch(data.imageset, tokenizer, [data.tokens[int(i)] for i in idx], [data.images[int(i)][0] for i in idx])


def class_labels(data: TaskData, idx: np.ndarray) -> torch.Tensor:
    return torch.tensor([data.examples[int(i)].label for i in idx], dtype=torch.long)


def classify_collate(data: TaskData, idx: np.ndarray, tokenizer, state: State, rng=None) -> dict[str, Any]:
    """(text, image) pairs with integer class labels."""
    batch = single_image_batch(data, idx, tokenizer)
    batch["labels"] = class_labels(data, idx)
    return batch


def cross_entropy(logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    return F.cross_entropy(logits, batch["labels"].to(logits.device))


def predict(model: nn.Module, data: TaskData, tokenizer, state: State, batch_size: int, device,
            collate: Collate) -> Iterator[tuple[np.ndarray, torch.Tensor]]:  # fmt: skip
    """(example indices, logits on the CPU) for every evaluation batch, in order."""
    n = len(data.examples)
    with torch.inference_mode():
        for lo in range(0, n, batch_size):
            idx = np.arange(lo, min(n, lo + batch_size))
            batch = collate(data, idx, tokenizer, state, None)
            yield idx, model(to_device(batch, device)).float().cpu()


def argmax_predictions(model: nn.Module, data: TaskData, tokenizer, state: State, batch_size: int, device,
                       collate: Collate) -> list[int]:  # fmt: skip
    return [p for _, logits in predict(model, data, tokenizer, state, batch_size, device, collate)
            for p in logits.argmax(dim=1).tolist()]  # fmt: skip


def per_item(data: TaskData, scores, ids: list[str] | None = None) -> dict[str, list]:
    """Each evaluation item's own score (percent; the headline is their mean), keyed by the
    example's uid: what a paired bootstrap over items resamples (`raysys report`)."""
    return {"ids": ids if ids is not None else [str(ex.uid) for ex in data.examples],
            "scores": [round(float(s), 4) for s in scores]}  # fmt: skip


def classify_accuracy(collate: Collate):
    """The metric of a classification task: accuracy (percent) of the argmax class."""

    def metric(model: nn.Module, data: TaskData, tokenizer, state: State, batch_size: int, device) -> dict[str, Any]:
        preds = argmax_predictions(model, data, tokenizer, state, batch_size, device, collate)
        labels = np.array([ex.label for ex in data.examples])
        return {"accuracy": accuracy(np.array(preds), labels), "n_eval": len(data.examples),
                "per_item": per_item(data, 100.0 * (np.array(preds) == labels))}  # fmt: skip

    return metric
