"""Token caches are verified before use: the sha256 of every file is recorded in meta.json when the cache is written
and checked when a run reads it again, so a changed or damaged cache is re-tokenized instead of trained on.

Cost: one sha256 pass over the cache (≈1.3 GB/s per core here; a 10B-token uint32 cache is 40 GB, ≈30 s). A file is
hashed again only when its size or mtime changed since its last successful check (the stamp lives beside the caches,
in `CACHE/verified/<fingerprint>.json`): a changed file always has a new mtime, so edits are always caught; rot that
keeps the mtime is caught on the first read after it, not on every read.
"""

from __future__ import annotations

import json
from pathlib import Path

from midtrain.io import sha256_file, write_json_atomic


def file_digests(directory: Path) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} of the cache's data files (meta.json, which records them, excluded)."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(directory.iterdir()) if p.is_file() and p.name != "meta.json"}


def cache_problem(directory: Path, stamp: Path) -> str | None:
    """Why the cache in `directory` cannot be used (a file missing, resized or changed), or None. Caches written
    before checksums were recorded pass (their sizes are still checked when they load)."""
    try:
        listed = json.loads((directory / "meta.json").read_text()).get("files")
    except (OSError, ValueError, AttributeError) as exc:
        return f"{directory / 'meta.json'}: unreadable ({exc})"
    if not isinstance(listed, dict):
        return None
    try:
        seen = json.loads(stamp.read_text()) if stamp.is_file() else {}
    except (OSError, ValueError):
        seen = {}
    checked = {}
    for name, meta in listed.items():
        path = directory / name
        if not path.is_file():
            return f"{path}: missing from the token cache"
        stat = path.stat()
        key = [stat.st_size, stat.st_mtime_ns]
        if stat.st_size != meta["bytes"]:
            return f"{path}: {stat.st_size} bytes, the cache recorded {meta['bytes']}"
        if seen.get(name) != key and sha256_file(path) != meta["sha256"]:
            return f"{path}: checksum mismatch (the token cache changed after it was written)"
        checked[name] = key
    if checked != seen:
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(stamp, checked)
        except OSError:  # a read-only cache is still usable; it is hashed again next time
            pass
    return None
