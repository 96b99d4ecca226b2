"""Reading `.pt` files safely: `torch.load(weights_only=True)` with one-line refusals.

Every checkpoint raysys writes is torch's zip format holding tensors and plain containers, so it
loads with the weights-only unpickler, which never imports a class or calls a function named in the
file. Anything else — a pickle naming `os.system` through `__reduce__` (at the top or nested in a
dict), a raw pickle, an empty, truncated or random file — is not a raysys checkpoint, and the user
gets one line saying so (a `ContractError`: exit status 2). Torch's own message ends with advice to
re-run with `weights_only=False`, which for a tampered file would run its payload: it is never shown.

`check_checkpoint` refuses such files before a command imports torch and the model code: it reads
the pickle's opcodes (`pickletools.genops` only parses, it never executes) and refuses any global
outside torch and the few containers the weights-only unpickler allows. It is an early, cheap
refusal; the barrier that counts stays `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

from raysys.contract import ContractError

NOT_SAFE = "not a safe raysys checkpoint"
# Globals outside the `torch` package that torch's weights-only unpickler allows by default.
ALLOWED_GLOBALS = frozenset({"collections.OrderedDict", "collections.Counter", "_codecs.encode", "builtins.set",
                             "builtins.frozenset", "builtins.bytearray", "builtins.complex", "builtins.slice"})  # fmt: skip


def _named(name: str) -> str:
    return f"it names the Python object {name}, which a weights-only checkpoint never does"


def _reason(e: BaseException) -> str:
    """Why the weights-only unpickler refused, in a few words and without torch's advice."""
    text = str(e)
    m = re.search(r"(?:Unsupported global: |unsupported )GLOBAL ([\w.]+)", text, re.IGNORECASE)
    if m:
        return _named(m.group(1))
    if isinstance(e, EOFError) or not text.strip():
        return "the file is empty or truncated"
    if isinstance(e, pickle.UnpicklingError):
        m = re.search(r"(Unsupported operand \d+|invalid load key[^.\n]*)", text)
        return f"not a weights-only pickle ({m.group(1) if m else 'refused by the weights-only unpickler'})"
    first = text.strip().splitlines()[0].split(". ")[0]
    return f"not a torch checkpoint file ({first[:100]})"


def load_weights(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`; any refusal or corrupt file is one ContractError."""
    import torch  # lazy: check_checkpoint, run before a command's heavy imports, must not pay torch's start-up

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about legacy (non-zip) files before refusing them
            return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, UnicodeDecodeError, ValueError, KeyError) as e:
        raise ContractError(path, None, "checkpoint", f"{NOT_SAFE}, refused: {_reason(e)}") from None
    except RuntimeError as e:  # PytorchStreamReader: not a zip archive, missing records, bad magic number
        if not re.search(r"zip|archive|magic number|PytorchStreamReader|record|storage", str(e), re.IGNORECASE):
            raise
        raise ContractError(path, None, "checkpoint", f"{NOT_SAFE}, refused: {_reason(e)}") from None


def load_payload(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint's top-level mapping (`load_weights`, and it must be a dict)."""
    payload = load_weights(path, map_location)
    if not isinstance(payload, dict):
        raise ContractError(path, None, "checkpoint", f"{NOT_SAFE}, refused: holds a {type(payload).__name__}, not a mapping")
    return payload


def pickle_globals(data: bytes) -> list[str]:
    """Every `module.name` a pickle would import, read from its opcodes without running it."""
    names: list[str] = []
    strings: list[str] = []  # STACK_GLOBAL takes module and name from the last two pushed strings
    for op, arg, _pos in pickletools.genops(data):
        if op.name == "GLOBAL":
            names.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            names.append(".".join(strings[-2:]) if len(strings) >= 2 else "<unknown>")
        elif isinstance(arg, str) and "UNICODE" in op.name:
            strings.append(arg)
    return names


def local_model_path(src: str | os.PathLike, model_file: str = "model.pt") -> Path:
    """The model file of a local checkpoint given as the file, a `file://` URI or a checkpoint
    directory holding `model_file`; a one-line error when there is none."""
    p = Path(str(src).removeprefix("file://")).expanduser()
    if p.is_dir():
        p = p / model_file
    if not p.is_file():
        raise ContractError(p, None, "checkpoint", "not found (expected model.pt or a checkpoint directory holding it)")
    return p


def check_checkpoint(src: str | os.PathLike, model_file: str = "model.pt") -> None:
    """Refuse a local checkpoint that is missing or not safe, in milliseconds, before a command
    imports the model code and reads its data: `base` and URIs (checked once downloaded) pass."""
    s = str(src)
    if s == "base" or ("://" in s and not s.startswith("file://")):
        return
    p = local_model_path(s, model_file)
    if p.stat().st_size == 0:
        raise ContractError(p, None, "checkpoint", f"{NOT_SAFE}, refused: the file is empty")
    try:
        with zipfile.ZipFile(p) as z:
            pkl = [n for n in z.namelist() if n.endswith("data.pkl")]
            if not pkl:
                raise ContractError(p, None, "checkpoint", f"{NOT_SAFE}, refused: a zip without torch's data.pkl")
            data = z.read(pkl[0])
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        raise ContractError(p, None, "checkpoint",
                            f"{NOT_SAFE}, refused: not torch's zip format (a raw pickle, a truncated or a foreign file)") from None
    try:
        names = pickle_globals(data)
    except Exception:  # a pickle the parser cannot follow is not one torch.save wrote
        raise ContractError(p, None, "checkpoint", f"{NOT_SAFE}, refused: its pickle is corrupt") from None
    bad = [n for n in names if not (n.startswith("torch.") or n in ALLOWED_GLOBALS)]
    if bad:
        raise ContractError(p, None, "checkpoint", f"{NOT_SAFE}, refused: {_named(bad[0])}")
