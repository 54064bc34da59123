"""Model inputs: problem sets (generate mode) and reasoning texts (teacher-forced mode).

Both are JSONL files, one object per line (a ``.txt`` file is one text). Field names are
auto-detected from the first record (GSM8K ``question``, MATH-500 ``problem``, AIME
``prompt``; DeepSeek-R1 ``reasoning``, Sky-T1 ``code[0]``); ``--field`` overrides with a
dotted path where list indices are written ``code.0`` or ``code[0]``.

Invariant: an item's id is ``<file stem>-<line index>`` (0-based over the file's non-empty
lines), so ids do not depend on ``--limit`` and a resumed capture finds the same ids.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memshare.errors import InputError
from memshare.limits import check_limit
from memshare.traces.files import file_sha256

PROMPT_FIELDS = ("question", "problem", "prompt", "input", "instruction", "query")
TEXT_FIELDS = ("reasoning", "code.0", "response", "output", "completion", "generation", "text")
ANSWER_FIELDS = ("answer", "gt", "final_answer", "solution")

_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


@dataclass(frozen=True)
class InputItem:
    """One request to capture: a prompt (and, teacher-forced, the output text)."""

    id: str
    index: int  # line index in the source file (0-based, non-empty lines)
    prompt: str  # problem text ("" when a texts file has no prompt field)
    text: str | None = None  # teacher-forced output text
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InputSet:
    """The items of one input file and where they came from."""

    items: list[InputItem]
    source: dict[str, Any]


def parse_path(path: str) -> tuple[str | int, ...]:
    """``"code[0]"`` / ``"code.0"`` / ``"a.b[2].c"`` -> ``("code", 0)`` / ... ."""
    parts: list[str | int] = []
    for chunk in path.strip().split("."):
        if not chunk:
            raise ValueError(f"empty segment in field path {path!r}")
        pos = 0
        for m in _SEGMENT.finditer(chunk):
            if m.start() != pos:
                raise ValueError(f"cannot parse field path {path!r}")
            pos = m.end()
            name, index = m.group(1), m.group(2)
            if name is not None:
                parts.append(int(name) if name.isdigit() else name)
            else:
                parts.append(int(index))
        if pos != len(chunk):
            raise ValueError(f"cannot parse field path {path!r}")
    if not parts:
        raise ValueError(f"empty field path {path!r}")
    return tuple(parts)


def get_path(obj: Any, path: tuple[str | int, ...]) -> Any:
    """Follow ``path`` into nested dicts/lists; ``KeyError`` naming the failing segment."""
    cur = obj
    for i, part in enumerate(path):
        shown = _show(path[: i + 1])
        if isinstance(part, int) and isinstance(cur, list):
            if part >= len(cur):
                raise KeyError(f"{shown}: index out of range (list of {len(cur)})")
            cur = cur[part]
        elif isinstance(cur, dict) and str(part) in cur:
            cur = cur[str(part)]
        else:
            kind = type(cur).__name__
            have = f"; fields: {', '.join(sorted(cur))}" if isinstance(cur, dict) else ""
            raise KeyError(f"{shown}: not found in a {kind}{have}")
    return cur


def _show(path: Sequence[str | int]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _detect(record: dict[str, Any], candidates: Sequence[str]) -> str | None:
    for cand in candidates:
        try:
            value = get_path(record, parse_path(cand))
        except KeyError:
            continue
        if isinstance(value, str) and value.strip():
            return cand
    return None


def _read_jsonl(path: Path, option: str) -> list[tuple[int, dict[str, Any]]]:
    if not path.exists():
        raise InputError(str(path), "does not exist", f"check the path given to {option}")
    if not path.is_file():
        raise InputError(str(path), "is not a file", f"pass a JSONL file to {option}")
    rows: list[tuple[int, dict[str, Any]]] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _utf8(raw, f"{path}:{lineno}", option)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(
                    f"{path}:{lineno}", f"not valid JSON ({e.msg})", f"{option} takes JSONL"
                ) from None
            if not isinstance(obj, dict):
                raise InputError(
                    f"{path}:{lineno}", "is not a JSON object", f"{option} takes JSONL objects"
                )
            rows.append((lineno, obj))
    if not rows:
        raise InputError(str(path), "holds no records", f"pass a non-empty file to {option}")
    return rows


def _utf8(raw: bytes, where: str, option: str) -> str:
    """One line (or a whole .txt file) as text; a binary file is one InputError."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            where,
            f"is not UTF-8 text (byte {e.start + 1}): a binary file?",
            f"{option} takes a UTF-8 text file",
        ) from None


def _pick_field(
    rows: list[tuple[int, dict[str, Any]]],
    given: str | None,
    candidates: Sequence[str],
    path: Path,
    option: str,
    what: str,
) -> tuple[str | int, ...]:
    first = rows[0][1]
    if given is not None:
        try:
            parsed = parse_path(given)
        except ValueError as e:
            raise InputError(option, str(e), "write e.g. --field reasoning or code[0]") from None
        try:
            get_path(first, parsed)
        except KeyError as e:
            raise InputError(
                f"{path}:{rows[0][0]}",
                f"{option} {given!r}: {e.args[0]}",
                "pass a field that holds the " + what,
            ) from None
        return parsed
    found = _detect(first, candidates)
    if found is None:
        for cand in candidates:
            try:
                value = get_path(first, parse_path(cand))
            except KeyError:
                continue
            kind = "is empty" if isinstance(value, str) else f"holds a {type(value).__name__}"
            raise InputError(
                f"{path}:{rows[0][0]}",
                f"the {what} field {cand!r} {kind}",
                f"fix the record, or name a field that holds the {what} with {option}",
            )
        raise InputError(
            f"{path}:{rows[0][0]}",
            f"no {what} field found (looked for {', '.join(candidates)}; the record has "
            f"{', '.join(sorted(first))})",
            f"name it with {option}",
        )
    return parse_path(found)


def _string_at(
    obj: dict[str, Any],
    path: tuple[str | int, ...],
    where: str,
    option: str,
    *,
    nonempty: bool = True,
) -> str:
    try:
        value = get_path(obj, path)
    except KeyError as e:
        raise InputError(
            where, f"{option} {_show(path)!r}: {e.args[0]}", "fix the record or the field"
        ) from None
    if not isinstance(value, str):
        raise InputError(
            where,
            f"{option} {_show(path)!r} holds a {type(value).__name__}, not text",
            "point the field at a string (e.g. code[0] for a list of strings)",
        )
    if nonempty and not value.strip():
        raise InputError(
            where, f"{option} {_show(path)!r} is empty", "drop the record or fill the field"
        )
    return value


def _answer(obj: dict[str, Any]) -> dict[str, Any]:
    for name in ANSWER_FIELDS:
        value = obj.get(name)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return {"answer": value}
    return {}


def read_problems(path: Path, *, field: str | None = None, limit: int | None = None) -> InputSet:
    """Prompts for generate mode from a problem set (GSM8K, MATH-500, AIME, ...)."""
    check_limit(limit)
    rows = _read_jsonl(path, "--dataset")
    prompt_path = _pick_field(rows, field, PROMPT_FIELDS, path, "--field", "prompt")
    items = []
    for index, (lineno, obj) in enumerate(rows[:limit] if limit else rows):
        prompt = _string_at(obj, prompt_path, f"{path}:{lineno}", "--field")
        items.append(InputItem(f"{path.stem}-{index:05d}", index, prompt, None, _answer(obj)))
    source = {
        "mode": "generate",
        "file": str(path),
        "sha256": file_sha256(path),
        "prompt_field": _show(prompt_path),
        "records_in_file": len(rows),
    }
    return InputSet(items, source)


def read_texts(
    path: Path,
    *,
    field: str | None = None,
    prompt_field: str | None = None,
    limit: int | None = None,
) -> InputSet:
    """Texts for teacher-forced mode (reasoning chains), each with its problem if present.

    A ``.txt`` file is one text with no prompt.
    """
    check_limit(limit)
    if path.suffix == ".txt" and path.is_file():
        text = _utf8(path.read_bytes(), str(path), "--texts")
        if not text.strip():
            raise InputError(str(path), "is empty", "pass a file with text to --texts")
        item = InputItem(f"{path.stem}-00000", 0, "", text, {})
        return InputSet(
            [item], {"mode": "teacher_forced", "file": str(path), "sha256": file_sha256(path)}
        )
    rows = _read_jsonl(path, "--texts")
    text_path = _pick_field(rows, field, TEXT_FIELDS, path, "--field", "text")
    if prompt_field is not None:
        p_path: tuple[str | int, ...] | None = _pick_field(
            rows, prompt_field, PROMPT_FIELDS, path, "--prompt-field", "prompt"
        )
    else:
        found = _detect(rows[0][1], PROMPT_FIELDS)
        p_path = parse_path(found) if found else None
    items = []
    for index, (lineno, obj) in enumerate(rows[:limit] if limit else rows):
        where = f"{path}:{lineno}"
        text = _string_at(obj, text_path, where, "--field")
        prompt = _string_at(obj, p_path, where, "--prompt-field", nonempty=False) if p_path else ""
        items.append(InputItem(f"{path.stem}-{index:05d}", index, prompt, text, _answer(obj)))
    source = {
        "mode": "teacher_forced",
        "file": str(path),
        "sha256": file_sha256(path),
        "text_field": _show(text_path),
        "prompt_field": _show(p_path) if p_path else None,
        "records_in_file": len(rows),
    }
    return InputSet(items, source)


def bundled_prompts() -> Path:
    """The small GSM8K prompt set shipped in ``memshare/data`` (embedded default)."""
    from importlib.resources import as_file, files

    ref = files("memshare") / "data" / "gsm8k_prompts.jsonl"
    with as_file(ref) as p:
        return Path(p)
