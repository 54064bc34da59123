"""Answer extraction and comparison for GSM8K and MATH-500 (docs/fidelity.md, "Answers").

``extract_answer`` finds a model's final answer in its text, ``gold_answer`` reads a dataset
row's reference answer, ``answers_equal`` compares two answers after normalization. Kinds:
``"gsm8k"`` and ``"math500"``; ``detect_kind`` tells them apart from a row's fields.

Invariants: no function raises on any text (a text without an answer gives ``None``, and
``None`` equals nothing); comparison is symmetric; two answers that both parse as numbers
(integers, decimals, ``a/b``, ``\\frac{a}{b}``, mixed numbers) compare by exact value, so
``0.5``, ``1/2``, ``\\dfrac12`` and ``$0.50`` are one answer. Pure Python, no torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, Literal

Kind = Literal["gsm8k", "math500"]
KINDS: tuple[Kind, ...] = ("gsm8k", "math500")

# a number in running text: optional sign (not a hyphen after a word), optional $, digits with
# thousands commas or plain, optional decimals, optional "/denominator"; ".5" too
_NUM = re.compile(
    r"(?<![\w.])(?:(?<![\w)\]])-\s?)?\\?\$?\s?"
    r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:\s?/\s?\d+(?:\.\d+)?)?"
)
_ANSWER_IS = re.compile(r"answer is[:\s]*(.+?)(?:\.\s|\.?$|\n)", re.IGNORECASE | re.MULTILINE)
_VERDICTS = frozenset({"correct", "incorrect", "right", "wrong", "consistent", "not"})
_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")
_FRAC = re.compile(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}")
_MIXED = re.compile(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces; also
    ``\\boxed 5``. ``None`` when there is none or its braces never close."""
    i, j = max((text.rfind(c), text.rfind(c) + len(c)) for c in ("\\boxed", "\\fbox"))
    if i < 0:
        return None
    if text.startswith(" ", j):
        m = re.match(r"\s+([^\s$]+)", text[j:])
        return m.group(1) if m else None
    if not text.startswith("{", j):
        return None
    depth = 0
    k = j
    while k < len(text):
        c = text[k]
        if c == "\\":  # an escaped \{ or \} is a literal brace
            k += 2
            continue
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return text[j + 1 : k]
        k += 1
    return None


def _answer_is(text: str) -> str | None:
    """What follows the last "answer is": its first ``$...$``/``\\(...\\)``, else its
    leading number, else all of it up to the sentence end; not a verdict ("is correct")."""
    found = _ANSWER_IS.findall(text)
    if not found:
        return None
    tail = re.sub(r"^(?:indeed|still|simply|just)\s+", "", str(found[-1]).strip(), flags=re.I)
    if m := re.search(r"\$(.+?)\$|\\\((.+?)\\\)", tail):
        return str(m[1] or m[2]).strip()
    first = tail.split()[0] if tail.split() else ""
    if first.lower().strip(",.!") in _VERDICTS:
        return None
    return first.rstrip(",") if _NUM.fullmatch(first.rstrip(",")) else tail


def _last_number(text: str) -> str | None:
    found = _NUM.findall(text)
    if not found:
        return None
    return re.sub(r"[\s,$\\]", "", found[-1])


def number_value(s: str) -> Fraction | None:
    """Exact value of ``s`` when it is a number: ``-3``, ``1,000``, ``$2.50``, ``.5``, ``3/4``,
    ``\\frac{3}{4}`` (after ``normalize_math``: ``\\dfrac 34`` too), ``2\\frac{1}{2}``."""
    t = re.sub(r"[\s,$]|\\\$|\\!|\{,\}", "", s).rstrip(".")
    try:
        if m := _MIXED.fullmatch(t):
            v = int(m[2]) + Fraction(int(m[3]), int(m[4]))
            return -v if m[1] else v
        if m := _FRAC.fullmatch(t):
            v = Fraction(m[2]) / Fraction(m[3])
            return -v if m[1] else v
        if "/" in t:
            a, _, b = t.partition("/")
            if _PLAIN_NUMBER.fullmatch(a) and _PLAIN_NUMBER.fullmatch(b):
                return Fraction(a) / Fraction(b)
            return None
        return Fraction(t) if _PLAIN_NUMBER.fullmatch(t) else None
    except ZeroDivisionError:
        return None


def _unwrap_text(s: str) -> str:
    """``\\text{X}`` (``\\textbf``, ``\\mbox``, ``\\mathrm``) -> ``X``; a trailing one after
    something else is a unit and goes."""
    cmd = r"\\(?:text|textbf|mbox|mathrm)\s*\{([^{}]*)\}"
    s = re.sub(r"(?<=\S)\s*" + cmd + r"(?:\^\{?\d\}?)?\s*$", "", s)
    s = re.sub(r"(?<=\S)\s*" + cmd + r"(?:\^\{?\d\}?)?\s*$", "", s)  # "1\text{ m}\text{ s}"
    return re.sub(cmd, r"\1", s)


def normalize_math(s: str) -> str:
    """The canonical text of a MATH answer (the rules of docs/fidelity.md): no surrounding
    ``$``, no ``\\left``/``\\right``/``\\!``/spacing, ``dfrac``/``tfrac`` -> ``frac``, no
    degrees, percent or dollar signs, no ``\\text`` units, no whitespace, no trailing ``.``,
    ``\\frac12`` -> ``\\frac{1}{2}``, ``\\sqrt2`` -> ``\\sqrt{2}``, ``x=5`` -> ``5``."""
    s = s.strip()
    for a, b in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        while len(s) >= 2 * len(a) and s.startswith(a) and s.endswith(b):
            s = s[len(a) : -len(b)].strip()
    s = _unwrap_text(s)
    s = re.sub(r"\\left\b|\\right\b|\\displaystyle|(?<!\\)\\[!,;:> ]", "", s)
    s = s.replace("dfrac", "frac").replace("tfrac", "frac").replace("{,}", "")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°|\\circ", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"_\{(\w+)\}", r"_\1", s)  # 4210_{5} -> 4210_5
    s = re.sub(r"\^\{?(?:th|st|nd|rd)\}?", "", s)  # 12^{th} -> 12
    if s.count("=") == 1 and len(s.split("=")[0]) <= 2:
        s = s.split("=")[1]
    s = re.sub(r"^[A-Za-z]\\in(?![A-Za-z])", "", s)  # x\in[-2,7] -> [-2,7]
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    if m := re.fullmatch(r"\(([A-Za-z])\)", s):  # multiple choice "(C)" -> "C"
        s = m[1]
    return s


def extract_answer(text: str, kind: Kind) -> str | None:
    """A model's final answer in ``text``: the last ``\\boxed{...}``, else the last "the
    answer is X", else (GSM8K and MATH-500 alike) the last number. GSM8K answers come back
    normalized (``\\boxed{\\$1,500}`` -> ``1500``), or as the last number in them."""
    _check(kind)
    found = last_boxed(text)
    if found is None:
        found = _answer_is(text)
    if found is None:
        return _last_number(text)
    if kind == "gsm8k":
        norm = normalize_math(found)
        return norm if number_value(norm) is not None else _last_number(found) or found.strip()
    return found.strip()


def gold_answer(row: Mapping[str, Any], kind: Kind) -> str:
    """The reference answer of a dataset row: GSM8K's text after the last ``####`` (commas and
    ``$`` dropped); MATH-500's ``answer`` field (``gt`` where a row has only that)."""
    _check(kind)
    if kind == "gsm8k":
        text = str(row["answer"])
        if "####" not in text:
            raise ValueError("a GSM8K answer ends with '#### N'; this one has no '####'")
        return re.sub(r"[\s,$]", "", text.rsplit("####", 1)[1])
    key = "answer" if "answer" in row else "gt"
    return str(row[key]).strip()


def answers_equal(a: str | None, b: str | None, kind: Kind) -> bool:
    """Whether two answers are the same: equal exact values when both are numbers, else equal
    normalized text; tuples and intervals compare element by element the same way."""
    _check(kind)
    if a is None or b is None:
        return False
    na, nb = normalize_math(a), normalize_math(b)
    return _same(na, nb)


def _same(na: str, nb: str) -> bool:
    if na == nb:
        return True
    va, vb = number_value(na), number_value(nb)
    if va is not None and vb is not None:
        return va == vb
    pa, pb = _parts(na), _parts(nb)
    if pa is None or pb is None or pa[0] != pb[0] or len(pa[1]) != len(pb[1]):
        return False
    if len(pa[1]) < 2 and not pa[0]:  # not a list: nothing left to compare
        return False
    if pa[0]:  # a tuple, interval or matrix: in order
        return all(_same(x, y) for x, y in zip(pa[1], pb[1], strict=True))
    rest = list(pb[1])  # a bare list of solutions "1,-2": in any order
    for x in pa[1]:
        hit = next((i for i, y in enumerate(rest) if _same(x, y)), None)
        if hit is None:
            return False
        rest.pop(hit)
    return True


def _parts(s: str) -> tuple[str, list[str]] | None:
    """``(1,\\frac{1}{2}]`` -> ``("(]", ["1", "\\frac{1}{2}"])``: the brackets and the
    elements at top-level commas (a bare list ``1,2`` has brackets ``""``); a ``pmatrix``'s
    entries in row order, its brackets naming the kind and the row count."""
    if m := re.fullmatch(r"\\begin\{([pbv]?matrix)\}(.*)\\end\{\1\}", s):
        rows = m[2].split("\\\\")
        return f"{m[1]}{len(rows)}", [e for r in rows for e in r.split("&")]
    brackets = ""
    if len(s) >= 2 and s[0] in "([{" and s[-1] in ")]}":
        brackets, s = s[0] + s[-1], s[1:-1]
    out, depth, cur = [], 0, ""
    for c in s:
        depth += (c in "([{") - (c in ")]}")
        if c == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += c
    out.append(cur)
    return (brackets, out) if depth == 0 else None


def detect_kind(row: Mapping[str, Any]) -> Kind:
    """``"gsm8k"`` for a row whose ``answer`` ends with ``#### N``; ``"math500"`` for one with
    ``problem``/``solution``/``answer`` (or a ``gt`` field: Sky-T1 style)."""
    answer = row.get("answer")
    if isinstance(answer, str) and "####" in answer:
        return "gsm8k"
    if ("problem" in row or "solution" in row or "question" in row) and (
        "answer" in row or "gt" in row
    ):
        return "math500"
    raise ValueError(f"cannot tell the dataset from the fields {sorted(row)}")


def _check(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
