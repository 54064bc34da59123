"""A capture's output directory: a fresh one must hold no trace; a resumed one is checked.

A resumed capture must be the interrupted one: the same settings, inputs and model (only
``limit`` may change), else a one-line :class:`~memshare.errors.InputError` naming the
setting. A directory killed before its first commit starts over; a directory that holds
files that are not a trace's is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memshare.errors import InputError
from memshare.traces.capture.options import CaptureOptions
from memshare.traces.manifest_file import load_manifest
from memshare.traces.schema import FULL_KV_GLOB, MANIFEST, Manifest


def has_trace_files(path: Path) -> bool:
    """True if ``path`` holds a manifest, requests, KV or full-KV shards (or leftovers)."""
    names = ("manifest.json", "manifest.json.tmp", "requests.jsonl")
    return (
        any((path / n).exists() for n in names)
        or any(path.glob("kv-*.bin"))
        or any(path.glob(FULL_KV_GLOB))
    )


def check_output(o: CaptureOptions) -> Manifest | None:
    """Fail early on a bad output directory; the existing manifest when resuming one."""
    out = o.output
    if out.exists() and not out.is_dir():
        raise InputError(str(out), "exists and is not a directory", "choose another -o")
    if not o.resume:
        if out.is_dir() and has_trace_files(out):
            raise InputError(
                str(out),
                "already holds a trace (or leftovers of one)",
                "pass --resume to continue that capture, or choose another -o, or delete it",
            )
        first = next(out.iterdir(), None) if out.is_dir() else None
        if first is not None:
            raise InputError(
                str(out),
                f"is not empty ({first.name}): a trace is written into a new or empty folder",
                "choose another -o",
            )
        return None
    if not out.is_dir():
        return None  # nothing to resume yet: a fresh capture
    if not (out / MANIFEST).is_file():
        if any(out.iterdir()) and not has_trace_files(out):
            raise InputError(
                str(out),
                "--resume: not a capture (no manifest.json, and files that are not a trace's)",
                "pass the directory of an interrupted capture, or drop --resume",
            )
        return None  # killed before its first commit: start over
    manifest = load_manifest(out)
    if manifest.kind != "kv" or manifest.capture.get("tool") != "memshare capture":
        raise InputError(
            str(out / MANIFEST),
            f"--resume: not a capture (a {manifest.kind!r} trace written by "
            f"{manifest.capture.get('tool') or manifest.source.get('format') or 'an importer'})",
            "resume only directories written by `memshare capture`",
        )
    return manifest


_IGNORED_ON_RESUME = ("limit",)


def check_resume_matches(old: Manifest, new: Manifest, where: str) -> None:
    """The resumed capture's settings, inputs and model are the interrupted one's (all but
    ``limit``); the first difference raises, naming the setting."""
    fix = "resume with the options of the interrupted capture, or capture into a new -o"
    pairs: list[tuple[str, Any, Any]] = [
        ("block_size", old.block_size, new.block_size),
        ("model", old.model, new.model),
        ("sketch", old.sketch, new.sketch),
    ]
    for key in sorted(set(old.capture) | set(new.capture)):
        if key not in _IGNORED_ON_RESUME:
            pairs.append((f"capture.{key}", old.capture.get(key), new.capture.get(key)))
    oi, ni = old.source.get("inputs", {}), new.source.get("inputs", {})
    for key in ("mode", "sha256", "prompt_field", "text_field"):
        pairs.append((f"inputs.{key}", oi.get(key), ni.get(key)))
    om, nm = old.source.get("model", {}), new.source.get("model", {})
    for key in ("model", "model_format", "model_sha256"):
        pairs.append((f"model.{key}", om.get(key), nm.get(key)))
    for name, a, b in pairs:
        if a != b:
            raise InputError(
                where,
                f"--resume: setting {name} was {_short(a)} in the interrupted capture, now "
                f"{_short(b)}",
                fix,
            )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
