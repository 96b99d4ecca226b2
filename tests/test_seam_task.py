"""The task seam (issue 15): a downstream task defined entirely in this file — its reader, head,
batches, loss and metric — registered by name and fine-tuned end to end by the unchanged
`raysys evaluate finetune`, loaded with `raysys --plugin tests/test_seam_task.py`.

The toy task: "is the image's first region tagged with the most common first tag?" (binary), read
from a JSONL file the test writes from a small demo world."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raysys.cli import main
from raysys.contract import ContractError
from raysys.evaluate.downstream import image_ids, load_images
from raysys.evaluate.tasks import TASKS, Example, State, Task, TaskData, TaskHyper, read_task, register_task
from raysys.evaluate.tasks.common import Head, predict, single_image_batch
from raysys.evaluate.tasks.formats import get_field, json_rows
from raysys.pretrain.model import ModelConfig, build_model, save_checkpoint

TOY = "toy"
PLUGIN_MODULE = f"raysys_plugin_{Path(__file__).stem}"  # the name raysys.plugins imports this file under


@dataclass
class ToyHyper(TaskHyper):
    lr: float = 1e-3
    epochs: int = 2
    batch_size: int = 8


def read_toy(files: list[Path], split: str = "") -> list[Example]:
    """JSONL rows `{image, text, label: 0/1}`."""
    out = []
    for p in files:
        for n, r in json_rows(p):
            label = get_field(r, ("label",), p, n, int)
            out.append(Example(f"{p.stem}:{n}", [get_field(r, ("image",), p, n, str)], get_field(r, ("text",), p, n, str),
                               label, [[]]))  # fmt: skip
    return out


def toy_head(vl: nn.Module, state: State) -> nn.Module:
    """A small MLP on the pooled vector whose last layer starts at zero: every first logit is 0,
    so the first loss is exactly ln 2 — the test's proof that this head and loss ran."""
    H = vl.hidden_size
    net = nn.Sequential(nn.Linear(H, H), nn.GELU(), nn.Linear(H, 1))
    nn.init.zeros_(net[2].weight)
    nn.init.zeros_(net[2].bias)
    return Head(net, lambda net, enc, batch: net(enc.pooled).squeeze(-1))


def toy_collate(data: TaskData, idx: np.ndarray, tokenizer, state: State, rng=None) -> dict[str, Any]:
    batch = single_image_batch(data, idx, tokenizer)
    batch["labels"] = torch.tensor([float(data.examples[int(i)].label) for i in idx])
    return batch


def toy_loss(logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, batch["labels"].to(logits.device))


def toy_metric(model: nn.Module, data: TaskData, tokenizer, state: State, batch_size: int, device) -> dict[str, Any]:
    preds = [int(x) for _, logits in predict(model, data, tokenizer, state, batch_size, device, toy_collate)
             for x in (logits > 0).tolist()]  # fmt: skip
    labels = [ex.label for ex in data.examples]
    return {"accuracy": 100.0 * float(np.mean(np.array(preds) == np.array(labels))), "n_eval": len(labels),
            "majority": 100.0 * max(np.mean(labels), 1 - np.mean(labels))}  # fmt: skip


register_task(Task(
    TOY, "accuracy", {"jsonl": read_toy}, lambda files: "jsonl", head=toy_head, collate=toy_collate, loss=toy_loss,
    metric=toy_metric, hyper=ToyHyper, setup=lambda hp, train: {"positives": sum(ex.label for ex in train.examples)},
    report=lambda state: {"positives": state["positives"]},
))  # fmt: skip


# ---------------------------------------------------------------- the test


def _write_toy_files(world: Path, out: Path) -> tuple[Path, Path, int]:
    """40 images of the world: 30 to train on, 10 to evaluate; returns the train positives."""
    ids = image_ids(world)[:40]
    im = load_images(world, ids)
    first = [im.tags[im.regions(i)][0] for i in range(len(ids))]
    common = Counter(first).most_common(1)[0][0]
    rows = [{"image": iid, "text": f"is the first region a {common}?", "label": int(t == common)} for iid, t in zip(ids, first)]
    train, evald = out / "toy_train.jsonl", out / "toy_eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))
    evald.write_text("".join(json.dumps(r) + "\n" for r in rows[30:]))
    return train, evald, sum(r["label"] for r in rows[:30])


def test_a_task_from_a_plugin_fine_tunes_end_to_end(small_world, tmp_path, capsys, monkeypatch):
    from _pretrain_fixtures import tiny_bert_folder  # here, so the file also loads as a plugin outside pytest

    train, evald, positives = _write_toy_files(small_world, tmp_path)
    assert 0 < positives < 30  # both classes are present
    bert = tiny_bert_folder(tmp_path / "bert")
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, build_model(ModelConfig(model_path=str(bert), feature_dim=2048, num_classes=80), seed=0),
                    {"recipe": "muvla"})  # fmt: skip
    # the plugin registers the task; before it is loaded the name is unknown
    monkeypatch.setenv("RAYSYS_PLUGINS", "")  # restored after the test (load_plugins exports the list)
    monkeypatch.delitem(TASKS, TOY)
    monkeypatch.delitem(sys.modules, PLUGIN_MODULE, raising=False)
    args = ["evaluate", "finetune", "--task", TOY, "--checkpoint", str(ckpt), "--train", str(train), "--eval", str(evald),
            "--images", str(small_world), "steps=1", "mlflow=false", "eval_batch_size=4", "log_every=0"]  # fmt: skip
    assert main(args) == 2
    assert f"unknown {TOY!r}" in capsys.readouterr().err

    assert main(["--plugin", __file__, *args]) == 0
    assert TOY in TASKS and PLUGIN_MODULE in sys.modules
    lines = capsys.readouterr().out.strip().splitlines()
    out = json.loads(lines[-1])
    r = out["tasks"][TOY]
    assert lines[-2].startswith(f"{TOY:<10} accuracy = ")
    assert r["headline"] == "accuracy" and r["score"] == r["accuracy"] and 0.0 <= r["score"] <= 100.0
    assert r["n_train"] == 30 and r["n_eval_examples"] == r["n_eval"] == 10 and r["steps"] == 1
    assert r["positives"] == positives  # the task's own report hook
    assert r["final_loss"] == pytest.approx(math.log(2), abs=1e-6)  # the toy head (zero logits) and BCE ran
    assert 50.0 <= r["majority"] <= 100.0
    assert out["scores"] == {TOY: r["score"]} and out["meta_average"] is None  # not a paper task


def test_a_registered_task_reads_its_files(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"image": "a", "text": "x", "label": 1}\n{"image": "b", "text": "y", "label": "no"}\n')
    with pytest.raises(ContractError, match="row 2: field 'label': expected int"):
        read_task(TOY, [f])
    f.write_text('{"image": "a", "text": "x", "label": 1}\n')
    (ex,) = read_task(TOY, [f])
    assert ex.images == ["a"] and ex.label == 1 and isinstance(ex, Example)

