"""A converted copy of a GGUF model, made once and reused: GGUF -> safetensors folder.

Loading the default model's GGUF file takes tens of seconds (metadata parsing and
dequantisation); a safetensors copy loads in well under a second. The copy lives in a user
cache folder keyed by the GGUF file's sha256, so a changed file gets a new copy:

    $MEMSHARE_CACHE_DIR, else $XDG_CACHE_HOME/memshare, else ~/.cache/memshare
        models/<gguf stem>-<sha256[:16]>/   config.json, model.safetensors, tokenizer files,
                                            memshare-model.json (written last: the marker)

Invariant: a folder with ``memshare-model.json`` is complete. It is built in a temporary
sibling folder, every file fsynced, the marker written last, then renamed into place; a
crashed conversion leaves only a ``.tmp-*`` folder, which the next conversion ignores (and
removes when it is older than an hour). Two processes converting at once both succeed; the
second rename loses and its copy is discarded.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memshare.traces.files import file_sha256

MARKER = "memshare-model.json"
_STALE_TMP_S = 3600.0


def cache_root() -> Path:
    """The memshare cache folder (not created)."""
    env = os.environ.get("MEMSHARE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "memshare"


def converted_dir(gguf: Path, sha256: str, root: Path | None = None) -> Path:
    """Where the converted copy of ``gguf`` lives (whether or not it exists yet)."""
    return (root or cache_root()) / "models" / f"{gguf.stem}-{sha256[:16]}"


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a complete converted folder, or ``None``."""
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_tmp(models: Path) -> None:
    now = time.time()
    for p in models.glob(".*.tmp-*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def ensure_converted(
    gguf: Path,
    convert: Callable[[Path, Path], dict[str, Any]],
    *,
    root: Path | None = None,
    sha256: str | None = None,
) -> tuple[Path, dict[str, Any]]:
    """The converted folder of ``gguf`` and its marker, converting first if needed.

    ``convert(gguf, folder)`` writes the model into the empty ``folder`` and returns extra
    facts for the marker. Returns ``(folder, marker)``.
    """
    digest = sha256 or file_sha256(gguf)
    target = converted_dir(gguf, digest, root)
    marker = read_marker(target)
    if marker is not None and marker.get("gguf_sha256") == digest:
        return target, marker
    models = target.parent
    models.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(models)
    tmp = models / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        extra = convert(gguf, tmp)
        marker = {
            "gguf_sha256": digest,
            "gguf_file": str(gguf),
            "gguf_bytes": gguf.stat().st_size,
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra,
        }
        _fsync_tree(tmp)
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _fsync_tree(tmp)
        if target.exists():  # an incomplete leftover (no marker) or a concurrent winner
            if read_marker(target) is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                done = read_marker(target)
                assert done is not None
                return target, done
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if read_marker(target) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        fd = os.open(models, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    done = read_marker(target)
    if done is None:
        raise RuntimeError(f"converted model folder {target} has no {MARKER} after conversion")
    return target, done
