"""What every reader of a task file shares: JSON/JSONL loading and typed field access whose errors
are one `ContractError` line naming the file, the 1-based entry and the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raysys.contract import ContractError


def load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ContractError(path, e.lineno, "json", f"not valid JSON: {e.msg} (column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ContractError(path, None, "encoding", f"not valid UTF-8 (byte {e.start})") from None


def load_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ContractError(path, n, "json", f"not valid JSON: {e.msg} (column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise ContractError(path, n, "json", f"expected an object per line, got {type(obj).__name__}")
                rows.append((n, obj))
    except UnicodeDecodeError as e:
        raise ContractError(path, None, "encoding", f"not valid UTF-8 (byte {e.start})") from None
    return rows


def json_rows(path: Path) -> list[tuple[int, dict]]:
    """Entries of a JSON list or JSONL file, numbered from 1 (JSONL: line numbers)."""
    head = path.read_bytes()[:4096].lstrip()
    if head.startswith(b"["):
        data = load_json(path)
        rows = []
        for n, obj in enumerate(data, start=1):
            if not isinstance(obj, dict):
                raise ContractError(path, n, "json", f"expected an object, got {type(obj).__name__}")
            rows.append((n, obj))
        return rows
    return load_jsonl(path)


def get_field(obj: dict, keys: tuple[str, ...], path: Path, row: int, kind: type | tuple = str) -> Any:
    """The first of `keys` present in `obj`, type-checked; a one-line error names the first key."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    for k in keys:
        if k in obj and obj[k] is not None:
            v = obj[k]
            if (isinstance(v, bool) and bool not in kinds) or not isinstance(v, kinds):
                want = "/".join(t.__name__ for t in kinds)
                raise ContractError(path, row, k, f"expected {want}, got {type(v).__name__} {str(v)[:40]!r}")
            if isinstance(v, str) and not v.strip():
                raise ContractError(path, row, k, "empty")
            return v
    raise ContractError(path, row, keys[0], "missing" + (f" (also looked for {', '.join(keys[1:])})" if len(keys) > 1 else ""))


def peek(path: Path) -> Any:
    """The JSON document of a file, or the first row of a JSONL file; None for other text."""
    head = path.read_bytes()[:4096].lstrip()
    if head.startswith(b"["):
        return load_json(path)
    if head.startswith(b"{"):
        try:
            return load_json(path)
        except ContractError as err:
            try:
                rows = load_jsonl(path)
            except ContractError:
                raise err from None
            return rows[0][1] if rows else {}
    return None


def split_ok(value: Any, split: str) -> bool:
    return not split or str(value) == split

