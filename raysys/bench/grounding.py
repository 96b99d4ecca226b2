"""Phrase grounding (MVPTR's WPG) of a checkpoint against random negative images, vs its step-0 model.

WPG's training term hinges each text's phrase-to-region similarity (Eq. 2) against a *hard*
negative image drawn from the VSC distribution, which sharpens as VSC trains: the term can stay
flat while grounding improves. This bench holds the yardstick still: the same fixed batches of the
`mvptr` granularity, each text against a *random* other image of its batch, scored for the
checkpoint and for the model the same config starts from (step 0, same seed). It reports the
hinge, the mean similarity gap (positive − negative) and the share of texts whose own image wins.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="the dataset the checkpoint was pre-trained on")
    p.add_argument("--checkpoint", required=True, help="a model.pt of recipe mvptr")
    p.add_argument("--config", default=None, help="the pre-training YAML of that run (its step-0 model is the baseline)")
    p.add_argument("--batches", type=int, default=25, help="fixed batches, spread over the data")
    p.add_argument("--seed", type=int, default=0, help="the random negatives")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="pre-training config overrides")


def grounding(model, batches: list[dict[str, Any]], generator: torch.Generator) -> dict[str, float]:
    from raysys.pretrain.objectives import IGNORE, wpg_hinge, wpg_similarity  # lazy: keeps raysys --help fast

    model.eval()
    hinge, gap, wins = [], [], []
    with torch.no_grad():
        for b in batches:
            b = {**b, "objectives": ()}
            out = model(b)
            phrases = b["concept_ids"].ne(IGNORE).any(-1) & ~b["concept_masked"]
            pos, ok = wpg_similarity(out["concept_hidden"], phrases, out["region_hidden"], b["region_mask"])
            perm = torch.randperm(len(b["image_index"]), generator=generator)
            rmask = b["region_mask"][perm]
            h = model.cross_encode(torch.cat([out["text_uni"], out["concept_uni"]], 1), out["text_concept_mask"],
                                   out["region_uni"][perm], rmask)  # fmt: skip
            T, C = out["text_uni"].shape[1], out["concept_uni"].shape[1]
            neg, ok_neg = wpg_similarity(h[:, T : T + C], phrases, h[:, T + C :], rmask)
            keep = ok & ok_neg & (b["image_index"][perm] != b["image_index"])
            hinge.append(wpg_hinge(pos, neg)[keep])
            gap.append((pos - neg)[keep])
            wins.append((pos > neg)[keep].float())
    cat = torch.cat
    return {"wpg_random_negative": round(cat(hinge).mean().item(), 4), "gap": round(cat(gap).mean().item(), 4),
            "own_image_wins": round(cat(wins).mean().item(), 4), "texts": int(cat(hinge).numel())}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    from raysys import config  # lazy: keeps raysys --help fast
    from raysys.pretrain.config import PretrainConfig  # lazy: as above
    from raysys.pretrain.loop import build_pretrain_model, prepare  # lazy: as above
    from raysys.pretrain.model import load_checkpoint  # lazy: as above

    cfg = config.load(PretrainConfig, args.config, [*args.overrides, "input=memory"])
    setup = prepare(cfg, args.data)
    if "mvptr" not in setup.streams:
        raise config.ConfigError(f"bench grounding: recipe {cfg.recipe!r} has no mvptr granularity (use recipe: mvptr)")
    stream = setup.streams["mvptr"]
    every = max(1, len(stream) // args.batches)
    batches = [stream.batch(j) for j in range(0, len(stream), every)][: args.batches]
    model, extra = load_checkpoint(args.checkpoint)
    return {
        "bench": "grounding",
        "checkpoint": args.checkpoint,
        "steps": extra.get("steps"),
        "step0": grounding(build_pretrain_model(cfg, setup), batches, torch.Generator().manual_seed(args.seed)),
        "checkpoint_scores": grounding(model, batches, torch.Generator().manual_seed(args.seed)),
    }
