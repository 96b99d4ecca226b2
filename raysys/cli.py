"""The `raysys` command. Subcommands live in `raysys.commands.*`; each module's `register`
adds its parsers. Command modules stay import-light (no torch/ray at import) so `raysys --help`
is instant; handlers import what they need.

Errors: anything the user can fix (a bad config value, a bad input row, a missing or unreadable
input file, a tampered checkpoint, a concurrent run holding the output's lock), raised here or
inside a Ray task, becomes one line on stderr and exit status 2 (`run_guarded`, shared with the
`jobs/` entrypoints). `--debug` prints the traceback instead. Anything else is a bug and keeps its
traceback (exit status 1).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator

import yaml

from raysys import progress
from raysys.config import ConfigError
from raysys.env import apply_offline_env
from raysys.plugins import load_plugins

# Order = order in `raysys --help`.
COMMAND_MODULES = [
    "raysys.commands.world",
    "raysys.commands.importers",
    "raysys.commands.validate",
    "raysys.commands.featurize",
    "raysys.commands.retrieve",
    "raysys.commands.pretrain",
    "raysys.commands.export",
    "raysys.commands.evaluate",
    "raysys.commands.sweep",
    "raysys.commands.demo",
    "raysys.commands.bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raysys",
        description="Pre-train a vision-and-language transformer from unpaired image and text corpora, on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error (exit status 2)")
    parser.add_argument(
        "--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
        help="import a module (or a .py file) that registers an objective, task or index backend; "
        "repeatable; also read from RAYSYS_PLUGINS (raysys.plugins)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


# OSErrors about a path the user named: reported as "PATH: reason".
USER_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)


def _causes(exc: BaseException, wrappers: bool = False) -> Iterator[BaseException]:
    """`exc` and what it wraps, outermost first. Ray's wrappers (RayTaskError and its
    `as_instanceof_cause` twins) carry the original as `.cause`, Python's as `__cause__`; a
    wrapper is yielded only with `wrappers` (its string is a remote traceback, not a message)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        inner = getattr(e, "cause", None)
        if not isinstance(inner, BaseException):
            inner = None
        if inner is None or wrappers:
            yield e
        todo.extend(c for c in (inner, e.__cause__) if isinstance(c, BaseException))


# The last line of a remote traceback that Ray carries only as text (an actor's failed constructor,
# a Ray Data UDF's error under its UserCodeException, a Ray Train worker's failure).
_REMOTE_USER_ERROR = re.compile(
    r"^(?:raysys\.\w+\.)?(?:ContractError|ConfigError|OutputLocked|FileNotFoundError|IsADirectoryError|"
    r"NotADirectoryError|PermissionError): (.+)$", re.MULTILINE)  # fmt: skip
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ERRNO = re.compile(r"^\[Errno \d+\] (.+?): '(.+)'$")


def _remote_user_error(e: BaseException) -> str | None:
    """A user error that a Ray exception (class from the `ray` package) holds only as traceback text."""
    if not type(e).__module__.startswith("ray"):
        return None
    m = _REMOTE_USER_ERROR.search(_ANSI.sub("", str(e)))
    if m is None:
        return None
    errno = _ERRNO.match(m.group(1).strip())
    return f"{errno.group(2)}: {errno.group(1)}" if errno else m.group(1).strip()


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def user_error(exc: BaseException) -> str | None:
    """One line for an error the user can fix, else None (an internal error)."""
    from raysys.contract import ContractError  # lazy: numpy + pyarrow would slow raysys --help

    for e in _causes(exc):
        if isinstance(e, (ConfigError, ContractError)):
            return _one_line(str(e))
        if isinstance(e, USER_OS_ERRORS):
            where = e.filename if e.filename is not None else ""
            return _one_line(f"{where}: {e.strerror}" if where and e.strerror else str(e))
        if isinstance(e, yaml.YAMLError):
            return _one_line(f"not valid YAML: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        if isinstance(e, UnicodeDecodeError):
            return _one_line(f"input is not valid UTF-8 text (byte {e.start}: {e.reason})")
    for e in _causes(exc, wrappers=True):
        remote = _remote_user_error(e)
        if remote is not None:
            return _one_line(remote)
    return None


def run_guarded(fn: Callable[[], int | None], prog: str, debug: bool = False, whole_process: bool = True) -> int:
    """Run a command body: a user error is one line `PROG: error: ...` on stderr and status 2
    (with `debug`, its traceback too); any other exception propagates with its traceback.
    `whole_process`: this process exits next, so after the line its stderr may be silenced (see
    `_quiet_exit`); False when a caller (a test, a notebook) runs the command in its own process."""
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        msg = user_error(e)
        if msg is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
        if whole_process and not debug:
            _quiet_exit()
        return 2


def _quiet_exit() -> None:
    """After the one line, Ray's exit hooks and abandoned Ray Data iterators may still print a
    stopped worker's traceback; nothing after the error line is news to the user."""
    sys.stderr.flush()
    if "ray" not in sys.modules:
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    import ray  # lazy: only once a command has imported it

    if ray.is_initialized():
        ray.shutdown()


# Library chatter that every run prints: faiss's loader (tries AVX512, then AVX2, ...), Ray's note
# that token authentication is on (it is, by design: docs/cluster.md), MLflow creating its tables.
QUIET_LOGGERS = {"faiss.loader": logging.WARNING, "ray._private.authentication": logging.ERROR,
                 "mlflow.store.db.utils": logging.WARNING}


def quiet_loggers(verbose: bool = False) -> None:
    """Library start-up chatter (`QUIET_LOGGERS`) is debug output: an error stays the only line a
    failed command prints. Progress bars follow one rule (`raysys.progress`)."""
    progress.apply_env()
    if not verbose:
        for name, level in QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(level)


def main(argv: list[str] | None = None) -> int:
    apply_offline_env()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=progress.LOG_FORMAT,
        stream=sys.stderr,
    )
    quiet_loggers(args.verbose)

    def body() -> int | None:
        load_plugins(args.plugin)
        return args.func(args)

    # argv None: the `raysys` console script or `python -m raysys`, a process of its own
    return run_guarded(body, "raysys", debug=args.debug, whole_process=argv is None)


if __name__ == "__main__":
    sys.exit(main())
