"""Export a pre-training checkpoint as a Hugging Face `save_pretrained` folder.

Why this layout: downstream users want the *backbone* with nothing but transformers
(`AutoModel.from_pretrained(DIR)` gives the pre-trained BERT encoder, `AutoTokenizer` its
tokenizer), while fine-tuning and evaluation in this package want the *whole* model with its
region embedding and heads (`load_exported(DIR)`). One folder serves both:

| file | what |
|---|---|
| `config.json`, `model.safetensors` | the backbone, `BertForMaskedLM.save_pretrained` (MLM head tied to the word embeddings) |
| `tokenizer.json`, `vocab.txt`, `tokenizer_config.json`, … | the tokenizer the model was trained with |
| `raysys_heads.safetensors` | every non-backbone tensor: region embedding, MRC / MRFR / ITM heads, objective parameters |
| `raysys_model.json` | `ModelConfig` + the checkpoint's provenance (recipe, steps, pre-training config) |

Only safetensors and JSON are written: like the checkpoints, an export never carries a pickle.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from ray.train import Checkpoint
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from raysys.checkpoints import local_model_path
from raysys.config import ConfigError
from raysys.contract import ContractError
from raysys.pretrain.model import ModelConfig, VLModel, load_checkpoint, load_tokenizer
from raysys.pretrain.ray_train import MODEL_FILE

EXPORT_FORMAT = "raysys.export/1"
HEADS_FILE = "raysys_heads.safetensors"
META_FILE = "raysys_model.json"


@contextlib.contextmanager
def local_model_file(src: str | os.PathLike) -> Iterator[Path]:
    """`model.pt` of a checkpoint given as the file, a Ray Train checkpoint directory, or a URI of
    either (s3://, gs://, … downloaded through Ray Train's `Checkpoint`)."""
    s = str(src)
    if "://" in s and not s.startswith("file://"):
        if s.endswith(".pt"):
            s = s.rsplit("/", 1)[0]
        with Checkpoint(s).as_directory() as d:
            yield Path(d) / MODEL_FILE
        return
    yield local_model_path(s, MODEL_FILE)


def export_checkpoint(src: str | os.PathLike, out: str | os.PathLike, tokenizer: str | None = None) -> dict[str, Any]:
    """Write the export folder for checkpoint `src` into `out` (atomically: a temporary sibling
    folder renamed into place). Returns a summary."""
    with local_model_file(src) as f:
        model, extra = load_checkpoint(f)
    model.eval()
    try:
        tok = load_tokenizer(tokenizer or model.cfg.model_path)
    except OSError as e:
        raise ConfigError(f"tokenizer of {model.cfg.model_path or 'the packaged MiniLM'} not loadable ({e}); "
                          "pass --tokenizer FOLDER") from None  # fmt: skip
    out = Path(out).expanduser().resolve()
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.lm.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    heads = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("lm.")}
    save_file(heads, str(tmp / HEADS_FILE), metadata={"format": EXPORT_FORMAT})
    meta = {
        "format": EXPORT_FORMAT,
        "model_config": {**asdict(model.cfg), "objectives": list(model.cfg.objectives)},
        "source": str(src),
        "extra": extra,
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    for f in tmp.glob("*.safetensors"):  # safetensors writes a private 0600 temp file and renames it:
        f.chmod(0o644)  # an export is shared like the JSON beside it (readable, writable by its owner)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    n = sum(v.numel() for v in model.parameters())
    return {"out": str(out), "files": sorted(p.name for p in out.iterdir()), "parameters": n,
            "head_tensors": len(heads), "recipe": extra.get("recipe"), "steps": extra.get("steps")}  # fmt: skip


def load_exported(path: str | os.PathLike):
    """The full `VLModel` from an export folder (backbone through transformers, heads from
    safetensors); every tensor must be accounted for."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.exists():
        raise ContractError(meta_path, None, "format", "not a raysys export folder (raysys_model.json missing)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ContractError(meta_path, None, "format", f"unknown export format {meta.get('format')!r}")
    d = dict(meta["model_config"])
    # the folder's config.json already holds the trained layer count and dropout
    d.update(model_path=str(path), num_layers=0, dropout=None, objectives=tuple(d.get("objectives", ())))
    d.setdefault("pooling", "cls")  # exports from before the field pooled on [CLS]
    model = VLModel(ModelConfig(**d), pretrained=True)
    missing, unexpected = model.load_state_dict(load_file(str(path / HEADS_FILE)), strict=False)
    missing = [k for k in missing if not k.startswith("lm.")]
    if missing or unexpected:
        raise ContractError(path / HEADS_FILE, None, "tensors", f"missing {missing[:3]} unexpected {unexpected[:3]}")
    model.eval()
    return model


def fixed_batch(model, tokenizer, seed: int = 0, regions: int = 5) -> dict[str, Any]:
    """A small deterministic batch (two captions, random regions) for comparing two copies of a model."""
    g = torch.Generator().manual_seed(seed)
    enc = tokenizer(["a dog catches a frisbee in the park", "two people ride horses on a beach"],
                    padding=True, return_tensors="pt")  # fmt: skip
    B = enc["input_ids"].shape[0]
    x1y1 = torch.rand(B, regions, 2, generator=g) * 0.5
    wh = torch.rand(B, regions, 2, generator=g) * 0.5
    box = torch.cat([x1y1, x1y1 + wh], -1)
    loc = torch.cat([box, (wh[..., :1] * wh[..., 1:])], -1)
    return {
        "input_ids": enc["input_ids"],
        "text_mask": enc["attention_mask"].bool(),
        "region_feats": torch.randn(B, regions, model.cfg.feature_dim, generator=g),
        "region_loc": loc,
        "region_mask": torch.ones(B, regions, dtype=torch.bool),
        "objectives": (),
    }


def logits(model, batch: dict[str, Any]) -> dict[str, Any]:
    """The model's outputs that a head turns into logits: ITM, MLM over text, MRC over regions."""
    with torch.no_grad():
        out = model(batch)
        return {
            "itm": out["itm_logits"],
            "mlm": model.mlm_logits(out["text_hidden"]),
            "mrc": model.mrc_head(out["region_hidden"]),
        }


def compare(src: str | os.PathLike, exported: str | os.PathLike) -> dict[str, float]:
    """Max |difference| of each logit family between the checkpoint and the export (full model),
    and of the last hidden state between the checkpoint's backbone and `AutoModel` of the export."""
    with local_model_file(src) as f:
        ref, _ = load_checkpoint(f)
    ref.eval()
    exp = load_exported(exported)
    tok = AutoTokenizer.from_pretrained(str(exported))
    batch = fixed_batch(ref, tok)
    a, b = logits(ref, batch), logits(exp, batch)
    diffs = {k: float((a[k] - b[k]).abs().max()) for k in a}
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # BertModel adds an untrained pooler and drops the MLM head: expected
    try:
        auto = AutoModel.from_pretrained(str(exported)).eval()
    finally:
        hf_logging.set_verbosity(level)
    with torch.no_grad():
        h_ref = ref.lm.bert(input_ids=batch["input_ids"], attention_mask=batch["text_mask"].long()).last_hidden_state
        h_auto = auto(input_ids=batch["input_ids"], attention_mask=batch["text_mask"].long()).last_hidden_state
    diffs["backbone_hidden"] = float((h_ref - h_auto).abs().max())
    return diffs
