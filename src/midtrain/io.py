"""Durable file writes: every file midtrain leaves behind is either complete or absent.

Pattern everywhere: write to a temp name in the same directory, fsync, `os.replace` (atomic on POSIX), fsync the
directory so the rename itself survives a power cut. Directories (checkpoints, exports, soups) go through
`publish_dir`, the one place that builds, fsyncs and swaps a directory into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsyncs every file below `root`, then each directory (so the entries themselves are durable)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk or a signal: no temp file is left behind
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def publish_dir(
    target: Path,
    fill: Callable[[Path], None],
    *,
    failed: Callable[[BaseException, Path], BaseException | None] | None = None,
) -> Path:
    """Builds directory `target` atomically: `fill(tmp)` writes into `target.tmp-<pid>`, which is fsynced and then
    swapped into place (an existing `target` is replaced whole: readers see the old one or the new one).

    Temp dirs of earlier crashed writers of `target` are removed first (one writer per run directory: the run lock).
    If `fill` fails, `failed(exc, tmp)` may turn the error into a clearer one (it sees the partial files) before the
    temp dir is removed; then that error, or the original, is raised.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f"{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        fill(tmp)
        fsync_tree(tmp)
    except BaseException as exc:
        clearer = failed(exc, tmp) if failed is not None and isinstance(exc, Exception) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if clearer is not None:
            raise clearer from None
        raise
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    return target
