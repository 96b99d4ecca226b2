"""`raysys import {lxmert-tsv,vinvl-tsv,texts}`: standard formats into a dataset directory."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="import detector features or texts into a dataset directory")
    isub = p.add_subparsers(dest="format_kind", metavar="KIND")
    isub.required = True

    q = isub.add_parser("lxmert-tsv", help="LXMERT/bottom-up-attention obj36 TSV + VG vocabulary → images/")
    q.add_argument("file")
    q.add_argument("--vocab", required=True, help="objects_vocab.txt (class ids index it)")
    q.add_argument("--out", required=True)
    q.add_argument("--feature-dim", type=int, default=2048)
    q.set_defaults(func=_lxmert)

    q = isub.add_parser("vinvl-tsv", help="VinVL feature TSV + label TSV → images/")
    q.add_argument("features", help="feature TSV: id, num_boxes, base64 float32 N×(D+6)")
    q.add_argument("--labels", required=True, help="label/prediction TSV: id, JSON objects with rect, class, conf")
    q.add_argument("--labelmap", default=None, help="VinVL label map JSON (label_to_idx) for class ids")
    q.add_argument("--out", required=True)
    q.add_argument("--feature-dim", type=int, default=2048)
    q.set_defaults(func=_vinvl)

    q = isub.add_parser("texts", help="text lines / TSV column / COCO-Karpathy JSON / Flickr8k captions.tsv → texts/ (+ gold/)")
    q.add_argument("files", nargs="+")
    q.add_argument("--format", required=True, choices=["lines", "tsv", "coco-json", "flickr8k"])
    q.add_argument("--out", required=True)
    q.add_argument("--column", type=int, default=0, help="tsv: 0-based column holding the text")
    q.add_argument("--header", action="store_true", help="tsv: skip the first line")
    q.add_argument("--source", default=None, help="source name stored per text (default: file stem)")
    q.add_argument("--max-captions", type=int, default=5, help="coco-json: captions per image (Karpathy: 5; 0 = all)")
    q.add_argument("--max-text-chars", type=int, default=10_000,
                   help="longer texts are counted and skipped (default 10000; 0 = no limit)")  # fmt: skip
    q.add_argument("--strict", action="store_true", help="fail on a text over --max-text-chars instead of skipping it")
    q.set_defaults(func=_texts)


def _report(man: dict) -> int:
    print(json.dumps({"counts": man["counts"], "feature_dim": man.get("feature_dim"), **(
        {"skipped": man["skipped"]} if man.get("skipped") else {})}, separators=(",", ":")))
    return 0


def _checked(a: argparse.Namespace, fn) -> int:
    """Run an import holding OUT's lock (stale temporaries of a killed import are swept first)."""
    from raysys.config import ConfigError  # lazy: keeps raysys --help fast
    from raysys.locks import output_lock  # lazy: keeps raysys --help fast

    if getattr(a, "feature_dim", 1) < 1:
        raise ConfigError(f"--feature-dim must be at least 1, got {a.feature_dim}")
    for name in ("column", "max_captions", "max_text_chars"):
        if getattr(a, name, 0) < 0:
            raise ConfigError(f"--{name.replace('_', '-')}: {getattr(a, name)} is negative")
    with output_lock(a.out):
        return _report(fn())


def _lxmert(a: argparse.Namespace) -> int:
    from raysys.data.importers import import_lxmert_tsv  # lazy: keeps raysys --help fast

    return _checked(a, lambda: import_lxmert_tsv(a.file, a.vocab, a.out, a.feature_dim))


def _vinvl(a: argparse.Namespace) -> int:
    from raysys.data.importers import import_vinvl_tsv  # lazy: keeps raysys --help fast

    return _checked(a, lambda: import_vinvl_tsv(a.features, a.labels, a.out, a.labelmap, a.feature_dim))


def _texts(a: argparse.Namespace) -> int:
    from raysys.data.importers import import_texts  # lazy: keeps raysys --help fast

    return _checked(a, lambda: import_texts(a.files, a.format, a.out, a.column, a.header, a.source, a.max_captions,
                                            max_text_chars=a.max_text_chars, strict=a.strict))
