"""Built-in answer graders: `exact`, `numeric`, `math`. Each is a class whose instances are graders
(`load_grader("numeric", {"tolerance": 1e-3})`); all read the reference from `sample.meta["answer"]`.

- exact:   the text after the last "####" (or the whole response) equals the answer, stripped.
- numeric: the last number (or fraction a/b) of the response is within `tolerance` (absolute) or
           `rel_tolerance` of the answer, compared exactly as rationals (no float rounding or overflow).
- math:    the final answer (last \\boxed{...}, else after "####", else "answer is ...", else the last number),
           normalised (LaTeX spacing, \\text, \\frac, $, units of %, degrees), compared as a string or as an
           exact rational. Tuples and intervals keep their commas and brackets: \\boxed{4,2} is not 42 and
           \\boxed{12} is not (1,2). When `math_verify` (the `math` extra) is installed it is tried first, in
           worker processes shared by the process's math graders (`_MathVerifyPool`): its SIGALRM timeouts
           cannot work in the runner's threads, and sympy can spin in C code no signal interrupts. Each
           answer is bounded by `verify_timeout_s` (and by half the runner's budget, `fit_time_budget`): a
           worker past it is killed, and a timeout or error there falls back to the built-in comparison.

Numbers: optional sign, digits with optional thousands separators (1,234,567 only: groups of three), an
optional decimal part and exponent, or a fraction a/b of two such. A part with more than `MAX_DIGITS` digits
or an exponent beyond +-`MAX_EXPONENT` is not a number (so `1e15000000` cannot stall the grader computing
10**15000000 while holding the GIL). A response that cannot be parsed scores 0; a reference that cannot
be parsed (numeric grader) is an error naming the task's answer.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
import weakref
from fractions import Fraction
from typing import Any

from minirl_async.graders.base import GradeResult, Sample, extract_answer
from minirl_async.tasks.synthetic import ANSWER_PREFIX

log = logging.getLogger(__name__)

MAX_DIGITS = 1000
MAX_EXPONENT = 1000

# A number in text: digits (with thousands separators only in groups of three), decimals, an exponent or a
# simple fraction "a/b". A sign counts only when it does not join two words: "2024-01-05" is a date and
# "x-3" a difference, not minus five / minus three, so a sign right after a letter, digit or "_" is not part
# of the number. "4,2" is two numbers, never 42.
_NUMBER = re.compile(r"(?:(?<!\w)[-+])?(?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d*)?|\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+|/\d+)?")
_BRACE = re.compile(r"[{}]")
_DECIMAL = re.compile(r"([-+]?)(\d{1,3}(?:,\d{3})+|\d*)(?:\.(\d*))?(?:[eE]([-+]?\d+))?")


def _reference(sample: Sample) -> str:
    if "answer" not in sample.meta:
        raise ValueError(f"task metadata has no 'answer' (keys: {sorted(sample.meta)}); this grader needs one")
    return str(sample.meta["answer"]).strip()


def _decimal(text: str) -> Fraction | None:
    m = _DECIMAL.fullmatch(text.strip())
    if m is None:
        return None
    sign, whole, frac, exp = m.groups()
    whole, frac = whole.replace(",", ""), frac or ""
    if not (whole or frac) or len(whole) + len(frac) > MAX_DIGITS:
        return None
    e = 0
    if exp is not None:
        if len(exp.lstrip("+-").lstrip("0")) > 6:  # checked before int(): no huge exponent is ever built
            return None
        e = int(exp)
        if abs(e) > MAX_EXPONENT:
            return None
    value = Fraction(int(whole or "0") * 10 ** len(frac) + int(frac or "0"), 10 ** len(frac)) * Fraction(10) ** e
    return -value if sign == "-" else value


def _to_number(text: str) -> Fraction | None:
    """An exact rational for a number or a fraction a/b (see the module docstring), else None. Never raises."""
    text = text.strip()
    if "/" in text:
        num, den = text.split("/", 1)
        a, b = _decimal(num), _decimal(den)
        return a / b if a is not None and b is not None and b != 0 else None
    return _decimal(text)


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
        for name, t in (("tolerance", tolerance), ("rel_tolerance", rel_tolerance)):
            if not (isinstance(t, (int, float)) and 0 <= t < float("inf")):
                raise ValueError(f"numeric grader: {name} must be a finite number >= 0 (got {t!r})")
        self.tol, self.rel_tol = tolerance, rel_tolerance
        self._tol, self._rel = Fraction(tolerance), Fraction(rel_tolerance)

    def __call__(self, sample: Sample) -> GradeResult:
        ref_text = _reference(sample)
        ref = _to_number(ref_text)
        if ref is None:
            raise ValueError(f"numeric grader: reference answer {ref_text!r} is not a number (or fraction a/b) "
                             f"within {MAX_DIGITS} digits and exponent +-{MAX_EXPONENT}; use the 'exact' or "
                             "'math' grader for non-numeric answers")
        found = _NUMBER.findall(sample.response_text)
        if not found:
            return GradeResult(0.0, {"extracted": None})
        got = _to_number(found[-1])
        if got is None:
            return GradeResult(0.0, {"extracted": found[-1][:100], "error": "not a number within limits"})
        ok = abs(got - ref) <= max(self._rel * max(abs(got), abs(ref)), self._tol)
        return GradeResult(float(ok), {"extracted": found[-1][:100]})


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...}, braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for m in _BRACE.finditer(text, i):  # braces only: linear in C over long answers
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return text[i + 1:m.start()]
    return None


def normalize_math(ans: str) -> str:
    """Canonical string form of a final math answer (spacing, $, \\text, \\frac, %, degrees, 'x=').
    Brackets and commas of tuples and intervals stay; parentheses around a single number go ("(-5)" -> "-5")."""
    s = ans.strip().strip("*_").strip()   # markdown emphasis around the answer: **42**
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = s.replace("{,}", "")              # LaTeX thousands separator: 1{,}000
    for tok in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\$", "$", "\\%", "%", "^\\circ", "^{\\circ}",
                "\\circ"):
        s = s.replace(tok, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\1/\2", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"^[a-zA-Z]\s*=", "", s)
    s = re.sub(r"\(([-+]?(?:\d+\.?\d*|\.\d+))\)", r"\1", s)
    return s


def extract_math_answer(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if ANSWER_PREFIX in text:
        return extract_answer(text, ANSWER_PREFIX)
    m = list(re.finditer(r"(?:answer is|Answer:)\s*:?\s*([^\n]+)", text))
    if m:
        return m[-1].group(1).strip().rstrip(".")
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else None


# ---------------------------------------------------------------------------------------------------------
# math_verify in worker processes
# ---------------------------------------------------------------------------------------------------------

_MV_WORKER = r'''
import inspect, json, os, sys
sys.path[:0] = json.loads(sys.argv[1])
import math_verify
# Timeouts off (they need SIGALRM); the grader bounds each request and kills a worker that overruns it.
P = {"parsing_timeout": None} if "parsing_timeout" in inspect.signature(math_verify.parse).parameters else {}
V = {"timeout_seconds": None} if "timeout_seconds" in inspect.signature(math_verify.verify).parameters else {}
out = os.fdopen(os.dup(1), "w")  # the protocol's own descriptor: stray prints go to /dev/null, not into it
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
out.write("ready\n"); out.flush()
for line in sys.stdin:
    try:
        req = json.loads(line)
        gold = math_verify.parse(req["gold"], **P)
        pred = math_verify.parse(req["pred"], **P)
        reply = {"ok": bool(math_verify.verify(gold, pred, **V))}
    except Exception as e:
        reply = {"error": (type(e).__name__ + ": " + str(e))[:300]}
    out.write(json.dumps(reply) + "\n"); out.flush()
'''


def _kill(p: subprocess.Popen[bytes]) -> None:
    try:
        p.kill()
        p.wait(5)
    except (OSError, subprocess.SubprocessError):
        pass


def _read_line(p: subprocess.Popen[bytes], deadline: float) -> bytes | None:
    """One line of a worker's stdout by `deadline` (monotonic), read unbuffered; None on timeout or EOF."""
    assert p.stdout is not None
    fd, buf = p.stdout.fileno(), b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return None
        buf += chunk
    return buf


class _MathVerifyPool:
    """Up to `size` worker processes running math_verify on their main thread. A request waits for an idle
    worker (started in the background, never on the caller's time beyond its deadline) and returns
    True/False, or None on an error or past the deadline (the worker is then killed: it may be stuck in C)."""

    def __init__(self, size: int, boot_timeout_s: float = 120.0):
        self.size, self.boot_timeout_s = size, boot_timeout_s
        self._cond = threading.Condition()
        self._idle: list[subprocess.Popen[bytes]] = []
        self._count = 0  # idle + busy + booting
        self.broken: str | None = None
        weakref.finalize(self, _MathVerifyPool._shutdown, self._idle)

    @staticmethod
    def _shutdown(idle: list[subprocess.Popen[bytes]]) -> None:
        for p in idle:
            _kill(p)

    def _boot(self) -> None:
        p: subprocess.Popen[bytes] | None = None
        try:
            p = subprocess.Popen([sys.executable, "-c", _MV_WORKER, json.dumps(sys.path)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
            ok = _read_line(p, time.monotonic() + self.boot_timeout_s) == b"ready\n"
        except OSError:
            ok = False
        with self._cond:
            if ok and p is not None:
                self._idle.append(p)
            else:
                self._count -= 1
                if self.broken is None:
                    self.broken = "math_verify worker did not start (import failed or took over " \
                                  f"{self.boot_timeout_s:.0f}s); using the built-in comparison"
                    log.warning(self.broken)
            self._cond.notify_all()
        if not ok and p is not None:
            _kill(p)

    def _acquire(self, deadline: float) -> subprocess.Popen[bytes] | None:
        with self._cond:
            while True:
                if self.broken is not None:
                    return None
                if self._idle:
                    return self._idle.pop()
                if self._count < self.size:
                    self._count += 1
                    threading.Thread(target=self._boot, name="math-verify-boot", daemon=True).start()
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def _release(self, p: subprocess.Popen[bytes], healthy: bool) -> None:
        with self._cond:
            if healthy:
                self._idle.append(p)
            else:
                self._count -= 1
            self._cond.notify_all()
        if not healthy:
            _kill(p)

    def verify(self, gold: str, pred: str, timeout_s: float) -> tuple[bool | None, str]:
        deadline = time.monotonic() + timeout_s
        p = self._acquire(deadline)
        if p is None:
            return None, self.broken or "no math_verify worker free in time"
        assert p.stdin is not None
        try:
            p.stdin.write((json.dumps({"gold": gold, "pred": pred}) + "\n").encode())
            p.stdin.flush()
            line = _read_line(p, deadline)
        except OSError:
            line = None
        if line is None:
            self._release(p, healthy=False)
            return None, f"math_verify took over {timeout_s:.1f}s (worker killed)"
        self._release(p, healthy=True)
        try:
            reply = json.loads(line)
        except ValueError:
            return None, "math_verify worker sent an unreadable reply"
        if "ok" in reply:
            return bool(reply["ok"]), ""
        return None, str(reply.get("error", "math_verify failed"))[:300]

    def close(self) -> None:
        with self._cond:
            idle = list(self._idle)
            self._idle.clear()  # the same list the finalizer holds
            self._count -= len(idle)
        for p in idle:
            _kill(p)


_POOLS: dict[int, _MathVerifyPool] = {}
_POOLS_LOCK = threading.Lock()


def _shared_pool(size: int) -> _MathVerifyPool:
    """One pool per size for the whole process: workers are stateless, and booting one (sympy) takes seconds."""
    with _POOLS_LOCK:
        pool = _POOLS.get(size)
        if pool is None:
            pool = _POOLS[size] = _MathVerifyPool(size)
        return pool


class MathGrader:
    """1.0 when the final answer matches `meta['answer']` mathematically (see module docstring)."""

    def __init__(self, use_math_verify: bool = True, verify_timeout_s: float = 5.0, verify_workers: int = 4,
                 response_chars: int = 20000):
        if verify_timeout_s <= 0 or verify_workers < 1 or response_chars < 1:
            raise ValueError("math grader needs verify_timeout_s > 0, verify_workers >= 1 and response_chars >= 1")
        self.verify_timeout_s, self.response_chars = verify_timeout_s, response_chars
        self._mv: _MathVerifyPool | None = None
        if use_math_verify and importlib.util.find_spec("math_verify") is not None:
            self._mv = _shared_pool(verify_workers)

    def fit_time_budget(self, seconds: float) -> None:
        """Called by GraderRunner with its per-sample limit: math_verify gets at most half of it, so a slow
        expression falls back to the built-in comparison (a 0 unless it matches) instead of a timeout."""
        self.verify_timeout_s = min(self.verify_timeout_s, 0.5 * seconds)

    def close(self) -> None:
        """Stop the idle math_verify workers (shared by the process's math graders; started again on demand)."""
        if self._mv is not None:
            self._mv.close()

    def __call__(self, sample: Sample) -> GradeResult:
        ref = _reference(sample)
        b = normalize_math(ref)
        info: dict[str, Any] = {}
        if self._mv is not None:
            ok_mv, why = self._mv.verify(f"${ref}$", sample.response_text[-self.response_chars:], self.verify_timeout_s)
            if ok_mv:
                return GradeResult(1.0, {"extracted": "math_verify"})
            if ok_mv is None:
                info["math_verify"] = why
        try:  # everything below parses the response: nothing it contains may raise out of the grader
            got = extract_math_answer(sample.response_text)
            if got is None:
                return GradeResult(0.0, {**info, "extracted": None})
            a = normalize_math(got)
            ok = a == b
            if not ok:
                na, nb = _to_number(a), _to_number(b)
                ok = na is not None and nb is not None and na == nb
                if not ok and na is None and nb is not None and last_boxed(sample.response_text) is None:
                    # "The answer is 42, as required.": a numeric reference against the FIRST number of the
                    # answer sentence (the first only: listing candidates gains nothing)
                    first = _NUMBER.findall(got)
                    n0 = _to_number(first[0]) if first else None
                    ok = n0 is not None and n0 == nb
        except (ValueError, ArithmeticError, RecursionError) as e:
            return GradeResult(0.0, {**info, "extracted": None, "error": f"{type(e).__name__}: {e}"[:200]})
        return GradeResult(float(ok), {**info, "extracted": got[:200]})
