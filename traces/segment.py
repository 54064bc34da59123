"""Reasoning-step segmentation: where a chain of thought starts a new step.

A step starts at the first character after a blank line, and at a cue phrase ("Wait",
"Alternatively", "Let me check", "Hmm", "But", ...) that opens a line or a sentence. Cues are
case-sensitive and must end at a word boundary ("But" does not match "Butter"; "Wait" matches
"Wait," and "Wait a minute"). Every step has at least ``min_tokens`` tokens (except a lone
first one): cue boundaries closer than that to the previous kept one are dropped and a
too-short last step is merged into the one before; then a blank-line boundary is kept only
where it is at least ``min_tokens`` from every kept boundary (cues take precedence).

Both public reasoning files need this mix: the DeepSeek-R1 texts rarely say "Wait" and break
steps with blank lines and "Let me check / verify"; Sky-T1 says "Wait" about six times per
response.

Invariant: :func:`segment_tokens` returns sorted, unique token offsets that start with 0 (for
a non-empty text) and lie in ``[0, len(token_starts))``.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_CUES: tuple[str, ...] = (
    "Wait",
    "Alternatively",
    "Let me check",
    "Let me verify",
    "Let me double-check",
    "Let me confirm",
    "Hmm",
    "But",
)
DEFAULT_MIN_TOKENS = 32


@dataclass(frozen=True)
class SegmenterConfig:
    """What starts a step; recorded in the trace's capture settings."""

    cues: tuple[str, ...] = DEFAULT_CUES
    blank_lines: bool = True  # a blank line ends a step
    min_tokens: int = DEFAULT_MIN_TOKENS  # minimum step length in tokens
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)  # cue phrases

    def __post_init__(self) -> None:
        if self.min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {self.min_tokens}")
        cues = [c.strip() for c in self.cues if c.strip()]
        pattern = r"(?!)"  # matches nothing
        if cues:
            alt = "|".join(re.escape(c) for c in sorted(set(cues), key=len, reverse=True))
            # at the start of the text or a line, or after a sentence end and spaces
            pattern = rf"(?:^|(?<=\n)|(?<=[.!?:;][ \t])|(?<=[.!?][ \t]{{2}}))(?=(?:{alt})\b)"
        object.__setattr__(self, "_pattern", re.compile(pattern))

    def to_dict(self) -> dict[str, object]:
        """The settings as the manifest records them."""
        return {
            "cues": list(self.cues),
            "blank_lines": self.blank_lines,
            "min_tokens": self.min_tokens,
        }


_BLANK_LINE = re.compile(r"\n[ \t]*\n\s*(?=\S)")  # ends before the text after a blank line


def step_starts(text: str, config: SegmenterConfig | None = None) -> tuple[list[int], list[int]]:
    """Character offsets where a cue phrase starts a step, and where text after a blank line
    does (each sorted; 0 is not included unless a cue opens the text)."""
    cfg = config or SegmenterConfig()
    cues = sorted({m.end() for m in cfg._pattern.finditer(text) if m.end() < len(text)})
    blanks: list[int] = []
    if cfg.blank_lines:
        blanks = sorted({m.end() for m in _BLANK_LINE.finditer(text) if m.end() < len(text)})
    return cues, blanks


def segment_text(text: str, config: SegmenterConfig | None = None) -> list[int]:
    """Character offsets where steps start (always 0 first for a non-empty text), before the
    minimum-length rule."""
    if not text:
        return []
    cues, blanks = step_starts(text, config)
    return sorted({0, *cues, *blanks})


def chars_to_tokens(char_offsets: Sequence[int], token_starts: Sequence[int]) -> list[int]:
    """Map character offsets to the tokens that contain them (unique, sorted).

    ``token_starts[i]`` is the character offset where token ``i`` starts (non-decreasing).
    A character inside a token maps to that token.
    """
    out: set[int] = set()
    n = len(token_starts)
    for c in char_offsets:
        i = bisect.bisect_right(token_starts, c) - 1
        if 0 <= i < n:
            out.add(i)
    return sorted(out)


def enforce_min_length(boundaries: Sequence[int], total: int, min_tokens: int) -> list[int]:
    """Drop boundaries that would leave a step shorter than ``min_tokens`` tokens."""
    kept: list[int] = []
    for b in sorted(set(boundaries)):
        if not 0 <= b < total:
            continue
        if not kept or b - kept[-1] >= min_tokens:
            kept.append(b)
    if len(kept) > 1 and total - kept[-1] < min_tokens:
        kept.pop()
    return kept


def segment_tokens(
    text: str, token_starts: Sequence[int], config: SegmenterConfig | None = None
) -> list[int]:
    """Token offsets where steps start, for tokens whose character starts in ``text`` are
    ``token_starts``; the first token always starts a step.

    Cue phrases take precedence over blank lines: cue boundaries are thinned to the minimum
    length first, then a blank-line boundary is added only where it lies at least
    ``min_tokens`` from every kept boundary and from the end.
    """
    cfg = config or SegmenterConfig()
    total = len(token_starts)
    if not total:
        return []
    cues, blanks = step_starts(text, cfg)
    kept = enforce_min_length([0, *chars_to_tokens(cues, token_starts)], total, cfg.min_tokens)
    for b in chars_to_tokens(blanks, token_starts):
        i = bisect.bisect_left(kept, b)
        before = kept[i - 1] if i > 0 else None
        after = kept[i] if i < len(kept) else total
        if (before is None or b - before >= cfg.min_tokens) and after - b >= cfg.min_tokens:
            kept.insert(i, b)
    return kept
