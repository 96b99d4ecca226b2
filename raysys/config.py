"""Typed configs: dataclasses loaded from YAML, overridden by `key=value` on the command line.

YAML is parsed with `yaml.safe_load` only: a config never executes code. Each stage module owns
its dataclass; this module only knows how to fill any dataclass from nested dicts, so a Tune
search space can address any field by its dotted path (`objectives.mlm_prob=0.2`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


# Count fields that must be >= 1 wherever a config declares them with a positive default. A field
# whose default is 0 (`steps: int = 0  # 0 = epochs x steps per epoch`) keeps 0 as its "derive
# it" value; a dataclass adds its own names with a `POSITIVE: ClassVar[tuple[str, ...]]`.
POSITIVE_COUNTS = frozenset({
    "images", "epochs", "batch_size", "k", "shards", "workers", "grad_accum", "block_rows", "query_batch",
    "shard_size", "rows_per_shard", "captions_per_image", "embed_batch_size", "pipe_batch_size", "eval_batch_size",
    "chunk_pairs", "shard_min_pairs", "num_answers", "max_side", "detector_input", "feature_input", "roi_pool",
    "feature_batch", "max_regions", "max_text_len", "feature_dim", "coarse_top_n", "threads_per_actor",
})  # fmt: skip


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping with the same key twice: YAML would silently keep
    the last one, so `lr: 1e-4` further down a file would undo the `lr` a reader sees first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            with contextlib.suppress(TypeError):  # an unhashable key: construct_mapping reports it
                if key in seen:
                    line = key_node.start_mark.line + 1
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (line {line})",
                                                            key_node.start_mark)  # fmt: skip
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def safe_load(text: str) -> Any:
    """`yaml.safe_load` that also refuses duplicate keys: never executes code, never guesses."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def parse_value(text: str) -> Any:
    """Parse an override's value as a YAML scalar/list (`5`, `0.1`, `true`, `[a, b]`, `null`)."""
    if text == "":
        return ""
    try:
        return safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override value {text!r}: not valid YAML: {str(e).splitlines()[0]}") from None


def set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {key}: '{p}' is not a section")
    d[parts[-1]] = value


def apply_overrides(d: dict, overrides: list[str] | None) -> dict:
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value")
        k, v = item.split("=", 1)
        set_dotted(d, k.strip(), parse_value(v.strip()))
    return d


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        out = [_coerce(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `2e-4` (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: {value!r} is not a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict | None, path: str = "") -> T:
    """Build dataclass `cls` from a nested dict; unknown keys are errors (typos must not pass)."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{path or cls.__name__}: unknown key(s) {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = {k: _coerce(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    _check_counts(cls, kwargs, path)
    return cls(**kwargs)


def _check_counts(cls: type, kwargs: dict[str, Any], path: str) -> None:
    """No config integer is negative; a count with a positive default (POSITIVE_COUNTS, the
    class's own POSITIVE) is at least 1. Checked while parsing, so `--dry-run` shows it too."""
    positive = POSITIVE_COUNTS | set(getattr(cls, "POSITIVE", ()))
    for f in dataclasses.fields(cls):
        v = kwargs.get(f.name)
        if not isinstance(v, int) or isinstance(v, bool):
            continue
        name = f"{path}.{f.name}" if path else f.name
        if v < 0:
            raise ConfigError(f"{name}: {v} is negative")
        default = f.default if f.default is not dataclasses.MISSING else None
        if v == 0 and f.name in positive and isinstance(default, int) and default > 0:
            raise ConfigError(f"{name}: must be at least 1, got 0")


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_yaml(path: str | Path | None) -> dict:
    if path is None:
        return {}
    p = Path(path)
    try:
        data = safe_load(p.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory, expected a YAML config file") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a YAML text file (byte {e.start} is not UTF-8)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None, section: str | None = None) -> T:
    """Load `cls` from a YAML file (optionally one top-level section of it) plus overrides."""
    data = load_yaml(path)
    if section is not None:
        data = data.get(section, {}) or {}
    return from_dict(cls, apply_overrides(data, overrides))


def load_section(
    cls: type[T], path: str | Path | None, overrides: list[str] | None, section: str, flags: dict[str, Any] | None = None
) -> T:
    """Load `cls` from the `section:` of a YAML file, or from its top level when it has no such
    section; `flags` (command-line options, None = not given) are set next, overrides last and
    relative to that section. One rule, so that one file and one override list mean the same
    thing to `raysys world` / `raysys featurize` and to `jobs/featurize.py`."""
    data = load_yaml(path)
    if isinstance(data.get(section), dict):
        data = data[section]
    data.update({k: v for k, v in (flags or {}).items() if v is not None})
    return from_dict(cls, apply_overrides(data, overrides))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`: how params go to MLflow and Tune."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def dump(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)
