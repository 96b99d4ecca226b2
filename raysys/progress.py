"""What a command shows on the console besides its result: progress bars, and Ray's share of stderr.

One rule decides every bar, raysys's own and the ones libraries draw (transformers' weight loading,
Ray Data's operators), so a terminal user sees rate and ETA of each long stage while a log file, a CI
run or a pipe gets no carriage-return noise (`enabled`):

- `RAYSYS_PROGRESS=1` / `0` forces bars on / off;
- otherwise they are off when `CI` is set, and on exactly when stderr is a terminal.

Bars go to stderr, so the last stdout line of every command stays its compact JSON. Ray workers
cannot see the user's terminal: the driver exports its decision (`apply_env`) before it starts Ray,
the workers inherit it, and a bar made inside a worker is Ray's `tqdm_ray`, which the driver draws.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

ENV = "RAYSYS_PROGRESS"

#: The one format of the log lines a raysys driver prints: raysys's own and Ray's (`ray.init(logging_format=)`).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Lines Ray streams from its workers that are known to be harmless at every run (shown with -v):
#: Ray Train's and Ray Data's own actors are created with their arguments in the object store
#: (core_worker.cc, "max_restarts > 0"), a loaded machine delays the State API that Ray Train's
#: placement-group cleaner polls, and Ray Data in a training worker says its bars are off.
WORKER_NOISE = (
    "has constructor arguments in the object store and max_restarts > 0",
    "Failed to query Ray Train Controller actor state",
    "Progress bars disabled. To enable, set",
)

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def enabled() -> bool:
    """Whether progress bars are drawn in this process (the module doc's rule)."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in _TRUE:
        return True
    if forced in _FALSE:
        return False
    if os.environ.get("CI", "").strip().lower() not in ("", *_FALSE):
        return False
    return _stderr_is_tty()


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def apply_env() -> None:
    """Export this process's decision for what it starts next: Ray workers (`RAYSYS_PROGRESS`, Ray
    Data's default), transformers' bars (read from the environment when it is imported) and the
    colour codes Ray puts on worker lines (noise in a log file)."""
    on = enabled()
    os.environ[ENV] = "1" if on else "0"
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "0" if on else "1"
    if not on:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not _stderr_is_tty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def _in_ray_worker() -> bool:
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    try:
        return bool(ray.is_initialized()) and ray._private.worker.global_worker.mode == ray.WORKER_MODE
    except AttributeError:  # a partly imported or future Ray: draw locally
        return False


def _make(total: int | None, desc: str, unit: str, initial: int, show: bool) -> Any:
    if show and _in_ray_worker():
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm  # lazy: only inside a Ray worker

        b = ray_tqdm(desc=desc, total=total, unit=unit)
        b.n = initial
        return b
    from tqdm import tqdm  # lazy: keeps raysys --help fast (the CLI imports this module)

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=not show, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5, smoothing=0.1)  # fmt: skip


@contextmanager
def bar(*, total: int | None, desc: str, unit: str = "it", initial: int = 0, on: bool = True) -> Iterator[Any]:
    """A tqdm bar with rate and ETA on stderr, or a disabled one (`enabled()` false, or `on` false,
    e.g. every rank but 0): callers call `.update(n)` unconditionally. Closed on exit."""
    show = on and enabled()
    b = _make(total, desc, unit, initial, show)
    try:
        if show and not _in_ray_worker():  # log lines print above the bar instead of through it
            from tqdm.contrib.logging import logging_redirect_tqdm  # lazy: keeps raysys --help fast

            with logging_redirect_tqdm():
                yield b
        else:
            yield b
    finally:
        b.close()


def track(
    items: Iterable[T],
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    weight: Callable[[T], int] | None = None,
    initial: int = 0,
    on: bool = True,
) -> Iterator[T]:
    """`items`, advancing a `bar` after the loop body has handled each one: by `weight(item)`
    (rows in a batch) or by 1. `total` defaults to `initial + len(items)` when `items` has a length.
    Once `items` is exhausted the bar reads `total`: a `weight` that can only estimate an item's
    share of the input (phrase rows per parsed text) must not leave a finished stage at 97 %."""
    if total is None and hasattr(items, "__len__"):
        total = initial + len(items)  # type: ignore[arg-type]
    with bar(total=total, desc=desc, unit=unit, initial=initial, on=on) as b:
        for x in items:
            yield x
            b.update(weight(x) if weight is not None else 1)
        if total is not None and b.n != total:
            b.n = total
            b.refresh()


def configure_ray() -> None:
    """Before this driver starts Ray: workers inherit the progress decision (`apply_env`) and Ray
    Data in this process follows it."""
    apply_env()
    on = enabled()
    if "ray.data" in sys.modules:  # imported before the decision was exported: set it directly
        from ray.data.context import DataContext  # lazy: already imported (checked above)

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = on
        ctx.enable_operator_progress_bars = on


def after_ray_init(verbose: bool = False) -> None:
    """After this driver's `ray.init(logging_format=LOG_FORMAT)`: drop the `WORKER_NOISE` lines
    from what Ray prints from its workers (unless `verbose`). Ray offers no public hook, so this
    wraps the handlers of its stdstream dispatcher (private API: a Ray without it keeps printing
    everything)."""
    if verbose:
        return
    try:
        from ray._private import ray_logging  # lazy: Ray is running
    except ImportError:
        return
    disp = getattr(ray_logging, "global_worker_stdstream_dispatcher", None)
    handlers = getattr(disp, "handlers", None)
    if not isinstance(handlers, list):
        return
    disp.handlers = [(name, h if getattr(h, "raysys_filtered", False) else _without_noise(h)) for name, h in handlers]


def _without_noise(handle: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def filtered(data: dict[str, Any]) -> None:
        lines = [ln for ln in data.get("lines", []) if not any(n in ln for n in WORKER_NOISE)]
        if lines or not data.get("lines"):
            handle({**data, "lines": lines})

    filtered.raysys_filtered = True  # type: ignore[attr-defined]
    return filtered
