"""The run directory OUT: `raysys demo`, `raysys sweep` and the `jobs/` entrypoints all write
their OUT through `local_run_dir`, so a shared path and an s3:// / gs:// URI behave alike, and
record each stage's figures in OUT/summary.json through `read_summary` / `record`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from raysys.contract import write_text_atomic

log = logging.getLogger(__name__)
SUMMARY = "summary.json"


def read_summary(out: Path) -> dict[str, Any]:
    p = out / SUMMARY
    return json.loads(p.read_text()) if p.exists() else {}


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    write_text_atomic(out / SUMMARY, json.dumps(summary, indent=2))


def record(out: Path, name: str, figures: dict[str, Any]) -> dict[str, Any]:
    """Put one stage's figures under `name` in OUT/summary.json (the others kept); returns the summary."""
    summary = read_summary(out)
    summary[name] = figures
    write_summary(out, summary)
    return summary


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


@contextlib.contextmanager
def local_run_dir(out: str | os.PathLike) -> Iterator[Path]:
    """A local directory standing for OUT, which may be a path or a URI (s3://, gs://, hdfs://, file://).

    A path is used as is (on a multi-node cluster it must be a shared mount, because Ray tasks on
    other nodes write into it). A URI goes through pyarrow's filesystems: its current contents
    are downloaded into a scratch directory first (so a re-run resumes from finished shards and a
    later stage sees earlier stages' outputs), and the scratch directory is uploaded back when the
    block exits, also when it fails, since partial output is what a resume needs. Credentials come
    from the environment (AWS_* / instance profile, GOOGLE_APPLICATION_CREDENTIALS / metadata
    server), never from a config.
    """
    if not is_uri(out):
        p = Path(out)
        p.mkdir(parents=True, exist_ok=True)
        yield p
        return
    out = str(out)
    fs, remote = pafs.FileSystem.from_uri(out)
    root = os.environ.get("RAYSYS_SCRATCH") or tempfile.gettempdir()
    scratch = Path(tempfile.mkdtemp(prefix=f"raysys-{hashlib.sha1(out.encode()).hexdigest()[:10]}-", dir=root))
    try:
        if fs.get_file_info(remote).type == pafs.FileType.Directory:
            log.info("downloading %s -> %s", out, scratch)
            pafs.copy_files(remote, str(scratch), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        try:
            yield scratch
        finally:
            _relocate_summary(scratch, out)
            log.info("uploading %s -> %s", scratch, out)
            fs.create_dir(remote, recursive=True)
            pafs.copy_files(str(scratch), remote, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _relocate_summary(scratch: Path, out: str) -> None:
    """Stages record paths in summary.json; make them name the URI, not the scratch copy."""
    p = scratch / SUMMARY
    if p.exists():
        p.write_text(p.read_text().replace(str(scratch), out.rstrip("/")))
