"""`raysys evaluate {zeroshot,finetune,suite}`: zero-shot retrieval with the ITM head, fine-tuning on
the downstream tasks (VQA v2, NLVR2, SNLI-VE, RefCOCO+, retrieval) with the meta-average, and the
fixed-budget downstream suite of a dataset (the demo world's)."""

from __future__ import annotations

import argparse
import json

from raysys import config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="zero-shot retrieval and downstream fine-tuning; last line is JSON")
    esub = p.add_subparsers(dest="evaluation", metavar="KIND")
    esub.required = True

    z = esub.add_parser(
        "zeroshot",
        help="zero-shot image<->text retrieval on the gold split with the ITM head",
        description="Score every (image, text) pair of DIR's gold evaluation split with the checkpoint's ITM "
        "head; print R@1/5/10 both ways, mean/median rank and ITM ROC-AUC. CHECKPOINT 'base' = the "
        "un-pre-trained model. Options: ZeroShotConfig fields as key=value (split=dev max_images=100 "
        "coarse=tags coarse_top_n=20 ray=never ...), or a YAML file (its `zeroshot:` section or top level).",
    )
    z.add_argument("--checkpoint", required=True, help="model.pt from `raysys pretrain`, or 'base'")
    z.add_argument("--data", required=True, help="dataset directory with images/, texts/, gold/")
    z.add_argument("--config", default=None, help="YAML with ZeroShotConfig fields (or a 'zeroshot:' section)")
    z.add_argument("--compare-base", action="store_true", help="also evaluate 'base' and print both in a table")
    z.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    z.add_argument("overrides", nargs="*", metavar="key=value")
    z.set_defaults(func=run_zeroshot)

    f = esub.add_parser(
        "finetune",
        help="fine-tune on a downstream task (vqa, nlvr2, ve, refcoco, retrieval) and report its metric",
        description="Fine-tune CHECKPOINT on one task (--task with --train/--eval/--images) or on every "
        "`runs:` entry of a config (then the meta-average over VQA, NLVR2, VE, RefCOCO+ is printed). "
        "Hyper-parameters default to the papers' values; override any FinetuneConfig field, e.g. "
        "vqa.lr=1e-4 steps=10. Formats are detected from the files or named with --format.",
    )
    f.add_argument("--checkpoint", required=True, help="model.pt from `raysys pretrain`, or 'base'")
    f.add_argument("--task", default=None, help="vqa | nlvr2 | ve | refcoco | retrieval (aliases: snli-ve, refcoco+, …), or a task a --plugin registers")
    f.add_argument("--train", nargs="+", default=None, metavar="FILE", help="training files (VQA: questions + annotations)")
    f.add_argument("--eval", nargs="+", default=None, metavar="FILE", help="evaluation files")
    f.add_argument("--images", default=None, help="dataset dir holding the task's images/ (featurize or import)")
    f.add_argument("--eval-images", default=None, help="dataset dir of the eval images (default: --images)")
    f.add_argument("--format", default="auto", help="reader format (default: detected)")
    f.add_argument("--config", default=None, help="YAML with FinetuneConfig fields (or a 'finetune:' section)")
    f.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    f.add_argument("overrides", nargs="*", metavar="key=value")
    f.set_defaults(func=run_finetune)

    s = esub.add_parser(
        "suite",
        help="fine-tune on a dataset's downstream suite with a fixed budget; last line: meta_average + per-task JSON",
        description="Fine-tune CHECKPOINT on each task of DIR's downstream suite (the task files `raysys world` "
        "writes from its hidden truth: vqa, nlvr2, ve, refcoco, retrieval) with the same budget, and score each "
        "task's eval split. Prints per-task scores, then one JSON line with `meta_average` (VQA, NLVR2, VE, "
        "RefCOCO+ among the tasks run) and one key per task. Options: SuiteConfig fields as key=value "
        "(steps=150 lr=1e-4 batch_size=32 tasks=[vqa,ve] mlflow=true ...).",
    )
    s.add_argument("--checkpoint", required=True, help="model.pt / checkpoint dir from `raysys pretrain`, or 'base'")
    s.add_argument("--data", required=True, help="dataset dir whose manifest lists a downstream suite (raysys world)")
    s.add_argument("--config", default=None, help="YAML with SuiteConfig fields (or a 'suite:' section)")
    s.add_argument("--items-out", default=None, help="also write each eval item's score to this JSON file")
    s.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(func=run_suite)


def _section(path: str | None, section: str) -> dict:
    data = config.load_yaml(path)
    return data[section] if isinstance(data.get(section), dict) else data


def _check_checkpoint(checkpoint: str) -> None:
    """A missing or tampered checkpoint is one line, before the model code and the data load."""
    from raysys.checkpoints import check_checkpoint  # lazy: numpy + pyarrow would slow raysys --help

    check_checkpoint(checkpoint)


def run_zeroshot(args: argparse.Namespace) -> int:
    if not args.dry_run:
        _check_checkpoint(args.checkpoint)
    from raysys.evaluate import zeroshot  # lazy: torch, ray and the model code would slow raysys --help

    cfg = config.from_dict(zeroshot.ZeroShotConfig, config.apply_overrides(_section(args.config, "zeroshot"), args.overrides))
    cfg.check()
    if args.dry_run:
        print(config.dump(cfg), end="")
        return 0
    if args.compare_base and args.checkpoint != "base":
        # the demo stage's comparison: base gets the checkpoint's number of layers; prints the table
        out = zeroshot.zeroshot_stage(cfg, args.data, {"checkpoint": args.checkpoint})
        result = {**out["pretrained"], "base": out["base"], "margin_t2i_r5": out["margin_t2i_r5"]}
    else:
        result = zeroshot.evaluate_zeroshot(args.checkpoint, args.data, cfg)
        print(zeroshot.format_table({"pretrained" if args.checkpoint != "base" else "base": result}))
    print(json.dumps(result, default=str))
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    if not args.dry_run:
        _check_checkpoint(args.checkpoint)
    from raysys.evaluate import finetune  # lazy: torch and the model code would slow raysys --help

    cfg = config.from_dict(finetune.FinetuneConfig, config.apply_overrides(_section(args.config, "finetune"), args.overrides))
    if args.task:
        if not (args.train and args.eval and args.images):
            raise config.ConfigError("finetune --task needs --train, --eval and --images")
        runs = [finetune.TaskRun(args.task, list(args.train), list(args.eval), args.images, args.eval_images or "", args.format)]
    else:
        runs = cfg.runs
    if args.dry_run:
        print(config.dump(cfg), end="")
        return 0
    out = finetune.run_finetune(args.checkpoint, cfg, runs)
    for t, r in out["tasks"].items():
        print(f"{t:<10} {r['headline']} = {r['score']:.2f}  (train {r['n_train']}, eval {r['n_eval_examples']}, "
              f"{r['steps']} steps, {r['seconds']} s)")  # fmt: skip
    if out.get("meta_average") is not None:
        print(f"meta-average over {out['meta_tasks']}: {out['meta_average']:.2f}")
    print(json.dumps(out, default=str))
    return 0


def run_suite(args: argparse.Namespace) -> int:
    from raysys.evaluate import suite  # lazy: torch and the model code would slow raysys --help

    cfg = config.from_dict(suite.SuiteConfig, config.apply_overrides(_section(args.config, "suite"), args.overrides))
    if args.dry_run:
        print(config.dump(cfg), end="")
        return 0
    result = suite.run_suite(args.checkpoint, args.data, cfg)
    if args.items_out:
        suite.write_items(result, args.items_out)
    print(suite.format_scores(result))
    print(json.dumps(suite.summary(result), default=str))
    return 0
