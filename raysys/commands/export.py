"""`raysys export CHECKPOINT --out DIR`: a pre-training checkpoint as a Hugging Face folder."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint as a HF save_pretrained folder (backbone + heads + tokenizer); last line is JSON",
        description="CHECKPOINT is a model.pt, a Ray Train checkpoint directory holding one (e.g. the "
        "'checkpoint' printed by `raysys pretrain`), or a URI of either. The folder loads with "
        "transformers.AutoModel / AutoTokenizer (the backbone) and with raysys.experiments.export.load_exported "
        "(the full model with its heads).",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="model.pt, a checkpoint directory, or a URI")
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the one the model was trained with)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip reloading the folder and comparing its logits with the checkpoint's")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raysys.checkpoints import check_checkpoint  # lazy: keeps raysys --help fast
    from raysys.locks import output_lock  # lazy: keeps raysys --help fast

    check_checkpoint(args.checkpoint)  # a tampered or missing file: one line, before the model code loads
    from raysys.experiments.export import compare, export_checkpoint  # lazy: keeps raysys --help fast

    with output_lock(args.out, sweep=False):
        result = export_checkpoint(args.checkpoint, args.out, tokenizer=args.tokenizer)
        if not args.no_verify:
            diffs = compare(args.checkpoint, args.out)
            result["max_abs_diff"] = diffs
            result["verified"] = max(diffs.values()) < 1e-4
    print(json.dumps(result, separators=(",", ":")))
    return 0 if result.get("verified", True) else 1
