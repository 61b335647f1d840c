"""Built-in answer graders: `exact`, `numeric`, `math`. Each is a class whose instances are graders
(`load_grader("numeric", {"tolerance": 1e-3})`); all read the reference from `sample.meta["answer"]`.

- exact:   the text after the last "####" (or the whole response) equals the answer, stripped.
- numeric: the last number (or fraction a/b) of the response is within `tolerance` (absolute) or `rel_tolerance` of the answer.
- math:    the final answer (last \\boxed{...}, else after "####", else "answer is ...", else the last number),
           normalised (LaTeX spacing, \\text, \\frac, $, units of %, degrees), compared as a string or as an
           exact rational. Uses `math_verify` (the `math` extra) first when it is installed.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

from minirl_async.graders.base import GradeResult, Sample, extract_answer
from minirl_async.tasks.synthetic import ANSWER_PREFIX

# A number: digits with optional thousands commas, decimals, exponent, or a simple fraction "a/b". A sign
# counts only when it does not join two words: "2024-01-05" is a date and "x-3" a difference, not minus
# five / minus three, so a sign right after a letter, digit or "_" is not part of the number.
_NUMBER = re.compile(r"(?:(?<!\w)[-+])?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+|/\d+)?")


def _reference(sample: Sample) -> str:
    if "answer" not in sample.meta:
        raise ValueError(f"task metadata has no 'answer' (keys: {sorted(sample.meta)}); this grader needs one")
    return str(sample.meta["answer"]).strip()


def _to_number(text: str) -> Fraction | None:
    text = text.replace(",", "").strip()
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return Fraction(num.strip()) / Fraction(den.strip())
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


class ExactGrader:
    """1.0 when the extracted final answer equals `meta['answer']`, else 0.0."""

    def __init__(self, answer_prefix: str = ANSWER_PREFIX, case_sensitive: bool = True):
        self.prefix, self.case_sensitive = answer_prefix, case_sensitive

    def __call__(self, sample: Sample) -> GradeResult:
        ref, got = _reference(sample), extract_answer(sample.response_text, self.prefix)
        if not self.case_sensitive:
            ref, got = ref.lower(), got.lower()
        return GradeResult(float(got == ref), {"extracted": got})


class NumericGrader:
    """1.0 when the last number of the response is close to `meta['answer']`."""

    def __init__(self, tolerance: float = 1e-6, rel_tolerance: float = 0.0):
        self.tol, self.rel_tol = tolerance, rel_tolerance

    def __call__(self, sample: Sample) -> GradeResult:
        ref_text = _reference(sample)
        ref_frac = _to_number(ref_text)
        if ref_frac is None:
            raise ValueError(f"numeric grader: reference answer {ref_text!r} is not a number (or fraction a/b); "
                             "use the 'exact' or 'math' grader for non-numeric answers")
        ref = float(ref_frac)
        found = _NUMBER.findall(sample.response_text)
        if not found:
            return GradeResult(0.0, {"extracted": None})
        got_frac = _to_number(found[-1])
        if got_frac is None:
            return GradeResult(0.0, {"extracted": found[-1]})
        got = float(got_frac)
        ok = math.isclose(got, ref, abs_tol=self.tol, rel_tol=self.rel_tol)
        return GradeResult(float(ok), {"extracted": got})


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...}, braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def normalize_math(ans: str) -> str:
    """Canonical string form of a final math answer (spacing, $, \\text, \\frac, %, degrees, 'x=')."""
    s = ans.strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    for tok in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "$", "\\%", "%", "^\\circ", "^{\\circ}", "\\circ"):
        s = s.replace(tok, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\1/\2", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"^[a-zA-Z]\s*=", "", s)
    s = re.sub(r"\((-?\d+)\)", r"\1", s)
    return s


def extract_math_answer(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if ANSWER_PREFIX in text:
        return extract_answer(text, ANSWER_PREFIX)
    m = list(re.finditer(r"(?:answer is|Answer:)\s*([^\n]+)", text))
    if m:
        return m[-1].group(1).strip().rstrip(".")
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else None


class MathGrader:
    """1.0 when the final answer matches `meta['answer']` mathematically (see module docstring)."""

    def __init__(self, use_math_verify: bool = True):
        self._mv: Any = None
        if use_math_verify:
            try:
                import math_verify

                self._mv = math_verify
            except ImportError:
                self._mv = None

    def __call__(self, sample: Sample) -> GradeResult:
        ref = _reference(sample)
        if self._mv is not None:
            gold = self._mv.parse(f"${ref}$")
            if self._mv.verify(gold, self._mv.parse(sample.response_text)):
                return GradeResult(1.0, {"extracted": "math_verify"})
        got = extract_math_answer(sample.response_text)
        if got is None:
            return GradeResult(0.0, {"extracted": None})
        a, b = normalize_math(got), normalize_math(ref)
        ok = a == b
        if not ok:
            na, nb = _to_number(a.replace("(", "").replace(")", "")), _to_number(b.replace("(", "").replace(")", ""))
            ok = na is not None and nb is not None and na == nb
        return GradeResult(float(ok), {"extracted": got})
