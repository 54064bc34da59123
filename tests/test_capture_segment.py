"""Reasoning-step segmentation on real excerpts of the R1 and Sky-T1 files."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from memshare.traces.segment import (
    SegmenterConfig,
    chars_to_tokens,
    enforce_min_length,
    segment_text,
    segment_tokens,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "reasoning"
R1 = DATA / "deepseek_r1_aime24_math500.jsonl"
SKY = DATA / "skyt1_27b_math500.jsonl"


def r1_text(i: int) -> str:
    with R1.open(encoding="utf-8") as f:
        return str(json.loads(f.readlines()[i])["reasoning"])


def sky_text(i: int) -> str:
    with SKY.open(encoding="utf-8") as f:
        return str(json.loads(f.readlines()[i])["code"][0])


def starting_with(text: str, starts: list[int], prefix: str) -> int:
    return sum(text.startswith(prefix, s) for s in starts)


def test_r1_excerpt_splits_at_blank_lines_and_let_me_check() -> None:
    text = r1_text(1)
    i = text.index("I should verify if it's a valid triangle. Let me check")
    excerpt = text[i : i + 260]
    # "...valid triangle. Let me check the triangle inequality.\n\nAB + BC > AC: ...\n\nAB + AC"
    starts = segment_text(excerpt, SegmenterConfig())
    assert 0 in starts
    assert excerpt.index("Let me check") in starts  # cue after a sentence end
    assert excerpt.index("AB + BC > AC") in starts  # after a blank line
    assert excerpt.index("AB + AC > BC") in starts
    # a cue inside a sentence is not a step: "But is this sufficient? Let me check."
    text2 = r1_text(2)
    j = text2.index("But is this sufficient? Let me check.")
    ex2 = text2[j - 2 : j + 60]
    s2 = segment_text(ex2)
    assert ex2.index("But is") in s2 and ex2.index("Let me check") in s2


def test_sky_excerpt_splits_at_wait_and_alternatively() -> None:
    text = sky_text(0)
    i = text.index("Therefore, the polar coordinates are (3, π/2).")
    excerpt = text[i : i + 700]
    starts = segment_text(excerpt)
    assert excerpt.index("Wait a minute") in starts
    assert excerpt.index("Alternatively") in starts
    no_blank = segment_text(excerpt, SegmenterConfig(blank_lines=False))
    assert excerpt.index("Wait a minute") in no_blank
    # with blank lines off, only cue phrases start steps
    assert all(any(excerpt.startswith(c, s) for c in SegmenterConfig().cues) for s in no_blank if s)


def test_every_line_opening_wait_in_sky_t1_starts_a_step() -> None:
    text = sky_text(0)
    want = {m.start() for m in re.finditer(r"(?m)^Wait\b", text)}
    assert want, "the Sky-T1 excerpt should say Wait at a line start"
    assert want <= set(segment_text(text))


def test_cues_are_case_sensitive_whole_words_at_sentence_starts() -> None:
    text = "Butter is good. But wait, no.\nWaiting is bad. so wait here. Hmm, ok."
    starts = segment_text(text, SegmenterConfig(blank_lines=False))
    assert starts == [0, text.index("But wait"), text.index("Hmm")]
    custom = segment_text(text, SegmenterConfig(cues=("so wait",), blank_lines=False))
    assert custom == [0, text.index("so wait")]


def test_min_length_merges_short_steps() -> None:
    assert enforce_min_length([0, 3, 10, 12, 30], 40, 8) == [0, 10, 30]
    assert enforce_min_length([0, 10, 36], 40, 8) == [0, 10]  # short last step merged
    assert enforce_min_length([0], 5, 8) == [0]


def test_chars_to_tokens_maps_inside_a_token_to_that_token() -> None:
    starts = [0, 4, 9, 15]
    assert chars_to_tokens([0, 5, 9, 14, 100], starts) == [0, 1, 2, 3]


@pytest.mark.parametrize("which", ["r1", "sky"])
def test_segment_tokens_on_whole_texts(which: str) -> None:
    text = r1_text(0) if which == "r1" else sky_text(3)
    # whitespace tokens as a stand-in tokenizer: character starts of each word
    token_starts = [m.start() for m in re.finditer(r"\S+", text)]
    steps = segment_tokens(text, token_starts, SegmenterConfig(min_tokens=20))
    assert steps[0] == 0 and steps == sorted(set(steps))
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    assert min(gaps) >= 20
    assert len(token_starts) - steps[-1] >= 20
    assert len(steps) > 10  # long chains of thought have many steps


def test_cue_phrases_take_precedence_over_blank_lines() -> None:
    text = "a b c d\n\ne f g\nWait h i j k l"
    token_starts = [m.start() for m in re.finditer(r"\S+", text)]
    assert segment_tokens(text, token_starts, SegmenterConfig(min_tokens=4)) == [0, 7]
    assert segment_tokens(text, token_starts, SegmenterConfig(min_tokens=3)) == [0, 4, 7]
    only_blank = SegmenterConfig(cues=(), min_tokens=4)
    assert segment_tokens(text, token_starts, only_blank) == [0, 4]
