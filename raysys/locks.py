"""One writer per output directory, and no temporaries left behind by a killed one.

Every stage writes its output atomically (hidden temporaries renamed into place), so a second run
on the same `--out` would not corrupt a shard, but two runs would race on the same tables, the
manifest and each other's temporaries. `output_lock` makes the second one stop at once with one
line naming the holder. The lock is a sibling file (`.NAME.raysys-lock` next to `NAME`), not a file
inside the output: a refused or failed run leaves nothing under `--out`, and the lock never lands
in a table directory. A lock whose process is gone (killed, crashed) is stale and taken over.

A killed run also leaves its hidden temporaries (`.texts.tmp-1a2b3c4d/`, `.part-00000.parquet.
1a2b3c4d.tmp`, a new dataset's `.NAME.tmp-1a2b3c4d/` sibling). Holding the lock, nothing else can be
writing them, so `sweep_temporaries` removes them at the start of the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from raysys.config import ConfigError

# The hidden temporaries that raysys.contract (and checkpoint/export writers) create.
TEMPORARY = re.compile(r"^\..+\.tmp(-[0-9a-f]{8})?$")


class OutputLocked(ConfigError):
    """Another live raysys process holds the output's lock (a user error: exit status 2)."""


def lock_path(out: str | os.PathLike) -> Path:
    p = Path(out).expanduser().resolve()
    return p.with_name(f".{p.name}.raysys-lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


def _holder(path: Path) -> dict | None:
    """The live holder of the lock at `path`, or None when there is none or it is stale."""
    info = _read(path)
    if info is None:
        return None
    if info.get("host") not in (None, socket.gethostname()):
        return info  # another node's process: cannot be checked, so it holds
    return info if _alive(info["pid"]) else None


def _try_create(path: Path, info: dict) -> bool:
    """Create the lock with its content in one step (a hard link of a finished file), so a reader
    never sees a half-written lock."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(info))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _describe(info: dict, out: Path) -> str:
    host = f" on {info['host']}" if info.get("host") not in (None, socket.gethostname()) else ""
    cmd = f" ({info['command']})" if info.get("command") else ""
    return (f"{out}: another raysys run holds the lock, pid {info['pid']}{host}{cmd}; "
            f"wait for it, or stop it (lock file {lock_path(out)})")  # fmt: skip


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, sweep: bool = True) -> Iterator[Path]:
    """Hold the lock of output directory `out` for the block; refuse (OutputLocked) while a live
    process holds it; take over a stale one. `out` need not exist; a path that exists and is not a
    directory is refused before any work. With `sweep`, stale temporaries go first."""
    target = Path(out).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{out}: exists and is not a directory; give a dataset/output directory")
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv[:3]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    mine = False
    for _ in range(5):
        if _try_create(path, info):
            mine = True
            break
        holder = _holder(path)
        if holder is not None:
            if holder["pid"] == os.getpid() and holder.get("host") == info["host"]:
                break  # this process already holds it (a stage inside a pipeline command)
            raise OutputLocked(_describe(holder, target))
        # stale: move it aside (atomic, so two takers cannot both remove a fresh lock) and retry
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}"))
        for old in path.parent.glob(f"{path.name}.stale-*"):
            old.unlink(missing_ok=True)
    else:
        raise OutputLocked(f"{target}: could not take the lock {path}")
    try:
        if sweep:
            sweep_temporaries(target)
        yield target
    finally:
        if mine and (_read(path) or {}).get("pid") == os.getpid():
            path.unlink(missing_ok=True)


def sweep_temporaries(out: str | os.PathLike) -> list[Path]:
    """Remove the hidden temporaries a killed run left in `out` (any depth) and a new dataset's
    `.NAME.tmp-*` build directory next to it. Only call it holding `output_lock(out)`."""
    out = Path(out)
    found: list[Path] = []
    if out.parent.is_dir():
        found += [p for p in out.parent.glob(f".{out.name}.tmp*") if TEMPORARY.match(p.name)]
    if out.is_dir():
        for dirpath, dirnames, filenames in os.walk(out):
            for name in [*dirnames, *filenames]:
                if TEMPORARY.match(name):
                    found.append(Path(dirpath) / name)
            dirnames[:] = [d for d in dirnames if not TEMPORARY.match(d)]
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found
