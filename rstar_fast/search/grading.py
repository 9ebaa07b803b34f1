"""Answer grading: `grade(gold, pred) -> bool`.

Cheap checks run first, in the caller's process (they are linear string work and cannot
hang): normalised string equality, plain numbers ("1,000", "16.0" vs "16", percent, answers
rounded to 4 decimals as the step executor prints them) and multiple-choice letters. What they
cannot settle goes to math-verify (the parser/verifier with the best published recall) in a
small pool of persistent worker processes; each comparison has a wall-clock limit and a worker
that overruns it is killed and replaced (math-verify's own signal timeout cannot interrupt a
hung sympy call in C code, nor work off the main thread). A comparison that times out grades
False.

`Grader` is the pool (blocking `grade`, async `agrade`, `close()`); the module-level `grade`
uses a shared one created on first use.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import json
import os
import queue
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import IO, Any

log = logging.getLogger(__name__)

class GradingError(RuntimeError):
    """The grader pool cannot be used (closed, or its workers cannot start)."""


class _WorkerDied(GradingError):
    """A grading worker ended during a comparison (killed, or crashed by it)."""


# ----------------------------------------------------------------------------- fast checks


def _strip_wrapper(s: str, cmd: str) -> str:
    """Replace every `\\cmd{X}` by X (balanced braces)."""
    key = "\\" + cmd + "{"
    while True:
        i = s.find(key)
        if i == -1:
            return s
        depth = 0
        for j in range(i + len(key) - 1, len(s)):
            if s[j] == "{":
                depth += 1
            elif s[j] == "}":
                depth -= 1
                if depth == 0:
                    s = s[:i] + s[i + len(key) : j] + s[j + 1 :]
                    break
        else:
            return s


# Rewrites that make an answer say what its writer meant before anything compares it. Both
# sides get them, so two answers equal as written stay equal.
_THOUSANDS_BANG = re.compile(r"(?<=\d),\s*\\!\s*(?=\d{3}(?!\d))")  # MATH's "111,\!111"
# a list's "and" (MATH's "19 \text{ and } 43", "7, -2, \text{ and } -5", "12 and 13"): a comma
_AND_TEXT = re.compile(r"\s*,?\s*(?:\\text\{\s*and\s*\}|(?<![A-Za-z\\])and(?![A-Za-z]))\s*")
# what extraction leaves of one: numbers a space apart ("19 43", not "10 000"), or whole items
# two apart ("(0,0)  (1,1)", "n\ge 3  n=1", "10^{3}  10^{4}"; not the factors of "2  \pi" or
# "(x+1)  (x-2)", nor "x^2 +  2x")
_SPACED_NUMBERS = re.compile(r"[-+]?\d+(?:\.\d+)?(?:\s+[-+]?\d+(?:\.\d+)?)+")
_SPACED_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?: \d{3})+(?:\.\d+)?")
_SPACED_ITEMS = re.compile(r"(?<=\S)[ \t]{2,}(?=\S)")
_RELATION = re.compile(r"=|<|>|\\(?:[lg]eq?|neq?|in)(?![A-Za-z])")
_OPEN_END = re.compile(r"(?:[-+*/=<>^_,\\]|\\(?:[lg]eq?|neq?|in|cdot|times|pm|mp|div)|\\[,;:! ])$")


def _whole_item(piece: str) -> bool:
    """A statement ("n=1"), a tuple or interval ("(0, 1]") or a number ("10^{3}", "-\\frac{1}{2}",
    "\\sqrt{2}"), with nothing left open."""
    if _OPEN_END.search(piece) or piece[0] in "*/=<>^_,":
        return False
    if _RELATION.search(piece) or re.match(r"[-+]?(?:\d|\\[dt]?frac|\\sqrt)", piece) and not re.search(r"\s", piece):
        return True
    return piece[0] in "([" and piece[-1] in ")]" and len(_list_items(piece[1:-1])) > 1


def _spaced_items(s: str) -> str:
    pieces = _SPACED_ITEMS.split(s)
    return ", ".join(pieces) if len(pieces) > 1 and all(map(_whole_item, pieces)) else s
# "x=-3orx=11", "x=1 \text{ or } x=3": alternatives, listed as math-verify reads a list
_OR_EQUATIONS = re.compile(r"(?<=[\d})])\s*(?:\\text\{\s*or\s*\}|or)\s*(?=[A-Za-z](?:_\{?\w+\}?)?\s*=)")
_BARE_ARG = r"(\\(?!(?:[dt]?frac|sqrt|left|right|text|mathrm|operatorname|mathbf|begin)(?![A-Za-z]))[A-Za-z]+|[0-9A-Za-z])"
_BARE_FRAC = re.compile(r"\\([dt]?frac)\s*" + _BARE_ARG + r"\s*" + _BARE_ARG)
_BARE_SQRT = re.compile(r"\\sqrt\s*" + _BARE_ARG)
# a unit a number carries ("30\mathrm{mph}", "5\text{ cm}^2"), with its power (not a
# one-letter name, which may be a variable or i: see _is_unit); never leaving a power behind,
# which would then fall to the number
_UNIT_POWER = r"(?:\s*\^\s*(?:\d|\{\s*-?\d+\s*\}))?"
_WRAPPED_UNIT = re.compile(
    r"(?<=\d)(?:\s|\\[,;:! ]|~)*\\(?:text|mathrm|mbox)\{([\s~]*[A-Za-z][A-Za-z\s.~]*)\}" + _UNIT_POWER + r"(?!\s*\^)")
# a number followed by words only, as extraction leaves "\boxed{18 \text{ dollars}}" or
# "\boxed{10 \text{ inches}^2}"
_NUMBER_WORDS = re.compile(
    r"([A-Za-z]\s*=\s*)?([-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+))(?:\s|\\[,;:! ]|~)*([A-Za-z]{2,}(?:\s+[A-Za-z]{2,})*)" + _UNIT_POWER + r"\s*")
# words that make a "\\text{...}" after a number part of the answer, not its unit
_NOT_UNITS = {"pi", "sqrt", "frac", "ln", "log", "sin", "cos", "tan", "cot", "sec", "csc", "exp",
              "inf", "infty", "mod", "and", "or", "if", "for", "when", "where", "otherwise", "is",
              "are", "all", "some", "any", "each", "every", "with", "of", "the", "to", "in", "on",
              "at", "as", "by", "then", "else", "so", "such", "that", "not", "no", "only", "but"}


def _is_unit(words: str) -> bool:
    """Words of two letters or more, none of which makes them part of the answer."""
    found = re.findall(r"[a-z]+", words.lower())
    return bool(found) and min(map(len, found)) >= 2 and not _NOT_UNITS.intersection(found)


def _unwrapped(s: str) -> str:
    """The answer inside the `$...$`, `\\(...\\)`, `\\[...\\]` or `\\boxed{...}` that wrap all of it."""
    while True:
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$" and "$" not in s[1:-1]:
            inner = s[1:-1]
        elif s[:2] in ("\\(", "\\[") and s[-2:] == s[:2].replace("(", ")").replace("[", "]") \
                and s[:2] not in s[2:-2] and s[-2:] not in s[2:-2]:
            inner = s[2:-2]
        elif s.startswith("\\boxed{") and s.endswith("}") and _strip_wrapper(s, "boxed") == s[7:-1]:
            inner = s[7:-1]
        else:
            return s
        s = inner.strip()


# Unicode that math-verify reads as text: what a LaTeX writer would have typed. Full-width
# ASCII (a Chinese writer's "（3，0）") becomes ASCII; NFKC would do that too, but also turn
# "x²" into "x2".
_UNICODE_MATH = {
    **{c: chr(c - 0xFEE0) for c in range(0xFF01, 0xFF5F)},
    0x3000: " ", 0x00A0: " ", 0x2007: " ", 0x2009: " ", 0x202F: " ",  # spaces (thousands too)
    0x2212: "-", 0x00B0: "^\\circ", 0x221E: "\\infty", 0x00B7: "\\cdot ",
    0x00BD: "\\frac{1}{2}", 0x2153: "\\frac{1}{3}", 0x2154: "\\frac{2}{3}", 0x00BC: "\\frac{1}{4}",
    0x00BE: "\\frac{3}{4}", 0x00B2: "^2", 0x00B3: "^3",
}


# the imaginary unit and Euler's number set upright ("3+2\mathrm{i}"): math-verify drops the
# wrapped letter and would read 3+2, so they are written bare, as it reads them (after a
# space: "\cdot\mathrm{i}" must not become "\cdoti")
_UPRIGHT_CONSTANT = re.compile(r"\\(?:mathrm|text|mbox|operatorname)\{\s*([ie])\s*\}")
# "√12", "√(x+1)", "√{2}": the radicand whole (a number, a letter, a group)
_UNICODE_ROOT = re.compile(r"√\s*(?:(\d+(?:\.\d+)?|[A-Za-z])|\(([^()]*)\)|\{([^{}]*)\})")


def prepare_answer(s: str) -> str:
    """The answer as meant: Unicode math as LaTeX (`√2`, `½`, `x²`, `45°`, full-width forms), a
    trailing period dropped, MATH's `,\\!` thousands joined, the
    items of a list written with "and" or "or" (or as extraction leaves them, a space apart)
    separated by commas, brace-less `\\frac12`/`\\sqrt2` braced, an upright i or e bare, units after a number dropped
    (with their power), an unclosed brace closed at the end (golds the data cut short)."""
    s = _UNICODE_ROOT.sub(lambda m: f"\\sqrt{{{m.group(1) or m.group(2) or m.group(3)}}}", s)
    s = _unwrapped(s.translate(_UNICODE_MATH).strip())
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    s = _THOUSANDS_BANG.sub("", s)
    s = _AND_TEXT.sub(", ", s)
    if _SPACED_NUMBERS.fullmatch(s) and not _SPACED_THOUSANDS.fullmatch(s):
        s = re.sub(r"\s+", ", ", s)
    if "\\begin" not in s:  # (a matrix's spacing is no list)
        s = _spaced_items(s)
    if "=" in s:
        s = _OR_EQUATIONS.sub(", ", s)
    s = _BARE_FRAC.sub(lambda m: f"\\{m.group(1)}{{{m.group(2)}}}{{{m.group(3)}}}", s)
    s = _BARE_SQRT.sub(lambda m: f"\\sqrt{{{m.group(1)}}}", s)
    s = _UPRIGHT_CONSTANT.sub(r" \1", s)
    s = _WRAPPED_UNIT.sub(lambda m: "" if _is_unit(m.group(1)) else m.group(), s)
    m = _NUMBER_WORDS.fullmatch(s)
    if m and _is_unit(m.group(3)):
        s = (m.group(1) or "") + m.group(2)
    opened = s.count("{") - s.count("}")
    if opened > 0:
        s += "}" * opened
    return s


def normalize_answer(s: Any) -> str:
    """A canonical string for cheap equality: wrappers, spacing and decorations removed."""
    s = str(s).strip()
    if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s.strip("$")
    for cmd in ("boxed", "text", "textbf", "mathrm", "mbox"):
        s = _strip_wrapper(s, cmd)
    for a, b in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
                 ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""), ("\\%", "%"), ("\\$", ""),
                 ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", "")):
        s = s.replace(a, b)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    return s.lower()


_INT_RE = re.compile(r"^[-+]?\d+$")
_WHOLE_DECIMAL_RE = re.compile(r"^([-+]?\d+)\.0*$")
_NUM_RE = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")
_THOUSANDS_RE = re.compile(r"^[-+]?[1-9]\d{0,2}(,\d{3})+(\.\d+)?$")  # "0,245" is a list
_FRAC_RE = re.compile(r"^(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}$")
# a numeral with its base, normalised ("2516_8", "4210_{5}"): math-verify reads only its digits
_BASE_NUMERAL_RE = re.compile(r"^([-+]?[0-9a-z.]+)_\{?(\d+)\}?$")


def parse_number(s: str) -> Fraction | float | None:
    """A plain number in a normalised answer ("1,000", "16.0", "50%", "\\frac{3}{4}"), or None.
    Integers and fractions come back exact (a Fraction: 2^64 and 2^64 - 1 are two numbers), a
    decimal or e-notation as a float."""
    s = s.rstrip("%")
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    if _NUM_RE.match(s):
        try:
            if _INT_RE.match(s):
                return Fraction(int(s))
            whole = _WHOLE_DECIMAL_RE.match(s)
            if whole:  # "70000.0" is 70000 exactly: no tolerance lets it be 70001
                return Fraction(int(whole.group(1)))
            return float(s)
        except (ValueError, OverflowError):  # digits past int()'s limit: not a plain number
            return None
    m = _FRAC_RE.match(s)
    if m:
        try:
            num, den = int(m.group(2)), int(m.group(3))
        except ValueError:
            return None
        if den:
            return -Fraction(num, den) if m.group(1) else Fraction(num, den)
    return None


def numbers_equal(a: Fraction | float, b: Fraction | float) -> bool:
    """Equal numbers: two exact ones (integers, fractions) exactly; otherwise within 1e-4
    relative (the reference's tolerance), or, at 1e-3 and above, equal after rounding to 4
    decimals (how the executor prints floats; below that 4 decimals say nothing: 0.0000 is
    no answer to 2.887e-6)."""
    if a == b:
        return True
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return False
    try:
        a, b = float(a), float(b)
    except OverflowError:  # an exact number past float's range, against a decimal
        return False
    if math.isclose(a, b, rel_tol=1e-4):
        return True
    if max(abs(a), abs(b)) < 1e-3:
        return False
    return round(a, 4) == round(b, 4) or abs(a - b) <= 5e-5 + 1e-12


def _choice_letter(s: str) -> str | None:
    """The letter of a multiple-choice answer ("C", "(C)", "C.", "\\text{(C)} 12"), or None;
    None for a hedge that names more than one ("A or B", "A B C D")."""
    t = str(s).replace("\\ ", " ").strip()
    for cmd in ("text", "textbf", "mathrm"):
        t = _strip_wrapper(t, cmd).strip()
    m = re.match(r"^\(?([A-Fa-f])\)?(?:[.:]|\s|$)", t)
    if m and (len(t) == 1 or t[0] == "(" or t[1:2] in (".", ":", ")", " ")):
        if len(set(re.findall(r"(?<![A-Za-z\\])([A-F])(?![A-Za-z])", t))) > 1:
            return None
        return m.group(1).upper()
    return None


def quick_verdict(gold: Any, pred: Any) -> bool | None:
    """True/False when cheap checks settle it, None when math-verify must decide."""
    g_raw, p_raw = str(gold), str(pred)
    if not p_raw.strip():
        return False
    g, p = normalize_answer(g_raw), normalize_answer(p_raw)
    if g == p:
        return True
    g_base, p_base = _BASE_NUMERAL_RE.match(g), _BASE_NUMERAL_RE.match(p)
    if g_base and p_base:  # "52_8" is not "52_9"
        return g_base.groups() == p_base.groups()
    g_letter = g_raw.strip().strip("()") if re.fullmatch(r"\s*\(?[A-Fa-f]\)?\s*", g_raw) else None
    if g_letter:
        if _choice_letter(p_raw) == g_letter.upper():
            return True
        # a lowercase letter may be a constant (e: Euler's number) or a variable: math-verify
        return False if g_letter.isupper() else None
    if re.search(r",\s", g_raw) or re.search(r",\s", p_raw):
        return None  # a list ("153, 370"), not a number with thousands separators
    gn, pn = parse_number(g), parse_number(p)
    if gn is not None and pn is not None:
        if numbers_equal(gn, pn):
            return True
        # a percentage as its fraction: the side written with % (one side only) is divided by 100
        if ("%" in g_raw) == ("%" in p_raw):
            return False
        return numbers_equal(gn / 100, pn) if "%" in g_raw else numbers_equal(gn, pn / 100)
    return None


# ----------------------------------------------------------------------------- worker side


def _plain_decimal(s: str) -> str:
    """A number in e-notation as plain digits ("6e+23" -> "600000000000000000000000"), which
    math-verify would read as 6 * e * 23; anything else as it is."""
    t = s.strip()
    if _NUM_RE.match(t) and "e" in t.lower():
        try:
            return format(Decimal(t), "f")
        except (InvalidOperation, ValueError):
            pass
    return s


def math_verify_equal(gold: str, pred: str) -> bool:
    """math-verify in both directions, after the checks it gets wrong: lists item by item (each
    item counted: "1, 1, 2" is not "1, 2"), exact numbers exactly, a column vector against a
    tuple element by element; then, when either side is a decimal, a numeric comparison of
    the parsed values."""
    import sympy
    from math_verify import parse, verify

    g_items, p_items = _list_items(gold), _list_items(pred)
    # (a ± stands for two items; "n \in \mathbb{N}" is a condition on the answer, not an item)
    listed = (len(g_items) > 1 or len(p_items) > 1) and not _NOT_LISTS.search(gold + pred)
    if listed and len(g_items) > 1 and len(p_items) > 1:
        return _same_items(g_items, p_items)

    def parsed(s: str) -> list[Any]:
        s = _plain_decimal(s)
        out = parse("\\boxed{" + s + "}", parsing_timeout=None)  # type: ignore[arg-type]
        return out or parse("$" + s + "$", parsing_timeout=None)  # type: ignore[arg-type]

    g, p = parsed(gold), parsed(pred)
    if not g or not p:
        return False
    if listed and not _is_collection((p if len(g_items) > 1 else g)[0]):
        return False  # a list of several items against one value ("-2, -2" against "-2")
    if _read_in_part(gold, g[0]) or _read_in_part(pred, p[0]):
        return False
    if _zero_against_equation(g[0], p[0]) or _zero_against_equation(p[0], g[0]):
        return False
    same = _same_equation(g[0], p[0])
    if same is not None:
        return same
    exact = _exact_numbers_equal(g[0], p[0])
    if exact is not None:
        return exact
    g[0], p[0] = _vector_as_tuple(g[0], p[0]), _vector_as_tuple(p[0], g[0])
    if verify(g, p, timeout_seconds=None) or verify(p, g, timeout_seconds=None):
        return True
    try:  # a decimal answer against a symbolic gold (4\sqrt{5} vs 8.9443); two exact values
        # are never close enough (2^{1009} - 1 is not 2^{1009})
        if not (g[0].has(sympy.Float) or p[0].has(sympy.Float)):
            return False
        return _close_values(g[0], p[0])
    except Exception:
        pass
    return False


_NOT_LISTS = re.compile(r"\\pm|\\mp|±|∓|\\in(?![A-Za-z])")


def _list_items(s: str) -> list[str]:
    """The items of a list written with top-level commas ("1, 2, (3, 4)"); [s] for anything
    else: one number with thousands ("1,000"), a tuple, a set, an interval or a vector."""
    if _THOUSANDS_RE.fullmatch(s.strip()):
        return [s]
    items, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            if s.startswith(("\\langle", "\\rangle"), i):
                depth += 1 if s[i + 1] == "l" else -1
            i += 2 if s[i + 1 : i + 2] == "," else 1  # "\," is a space; "\{" counts as "{"
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            items.append(s[start:i])
            start = i + 1
        i += 1
    items = [t.strip() for t in [*items, s[start:]] if t.strip()]
    return items if len(items) > 1 else [s]


def _same_items(golds: list[str], preds: list[str]) -> bool:
    """Two lists with the same items, each as often, in any order (a list of solutions; an
    ordered answer like "m, n" is read the same way, as the question is not known here)."""
    if len(golds) != len(preds):
        return False
    left, unmatched = list(preds), []
    for g in golds:  # items the cheap checks match first: a reordered list costs no math-verify call
        k = next((k for k, p in enumerate(left) if quick_verdict(g, p)), None)
        if k is None:
            unmatched.append(g)
        else:
            del left[k]
    for g in unmatched:
        # in written order: a list in the same order matches item by item at once
        k = next((k for k, p in enumerate(left) if _item_equal(g, p)), None)
        if k is None:
            return False
        del left[k]
    return True


def _item_equal(gold: str, pred: str) -> bool:
    verdict = quick_verdict(gold, pred)
    return math_verify_equal(gold, pred) if verdict is None else verdict


def _is_collection(value: Any) -> bool:
    import sympy

    return isinstance(value, (sympy.Set, sympy.Tuple, sympy.MatrixBase))


def _exact_numbers_equal(a: Any, b: Any) -> bool | None:
    """Two exact numbers (no decimal, no variable) equal, as far as 100 digits past their integer
    part tell; None when either is something else, or too large to evaluate. math-verify's
    numeric check rounds values below its precision to zero: it takes 1/2^{60} for 1/2^{61}, a
    tiny value for its negative, 3^{100} + 1 for 3^{100} and 1 - 1/2^{200} for 1."""
    import sympy

    if not all(isinstance(x, sympy.Expr) and not x.free_symbols and not x.has(sympy.Float) for x in (a, b)):
        return None
    if a == b:
        return True
    try:
        scale = sympy.N(abs(a) + abs(b), 15)
        if not (scale.is_Float and scale.is_finite):
            return None  # infinities, complex values: math-verify's own rules
        if scale == 0:
            return True
        digits = max(0, int(sympy.floor(sympy.log(scale, 10))))  # of the integer part
        if digits > 10_000:
            return None
        # evalf raises its working precision (to maxn digits) until the difference has 30
        # correct digits: a difference of 1 between two 100-digit numbers, or of 1/2^{200}
        # between two numbers near 1, comes out exact. Of a difference that is zero it gets no
        # correct digit by then ("0.e-263", with a precision of 1 bit).
        diff = sympy.N(abs(a - b), 30, maxn=digits + 100)
        return bool(diff == 0 or (diff.is_Float and diff._prec < 53))
    except Exception:
        return None


def _vector_as_tuple(value: Any, other: Any) -> Any:
    """A column or row vector as a tuple, when it is compared with a tuple ("(1, 2, -3)"; math-verify
    reads "(1, 2)" as an open interval)."""
    import sympy

    if isinstance(value, sympy.MatrixBase) and 1 in value.shape:
        if isinstance(other, sympy.Tuple) or (len(value) == 2 and _open_interval(other)):
            return sympy.Tuple(*value)
    if _open_interval(value) and isinstance(other, sympy.MatrixBase) and sorted(other.shape) == [1, 2]:
        return sympy.Tuple(value.start, value.end)
    return value


def _open_interval(value: Any) -> bool:
    import sympy

    return isinstance(value, sympy.Interval) and bool(value.left_open and value.right_open)


# a number times a one-letter variable ("4t", "6m", "-9.8 t"), which math-verify reads as the
# number alone, taking the letter for a unit
_NUMBER_VARIABLE_RE = re.compile(r"\s*[-+]?(\d+(\.\d*)?|\.\d+)\s*[A-Za-z]\s*")


def _read_in_part(text: str, value: Any) -> bool:
    """math-verify read only part of the text as a number: the first item of a list it could not
    read whole (a list of equations or expressions: "x=0, \\frac{5\\pm\\sqrt{61}}{18}" as 0), or
    the number of a number times a variable ("4t" as 4). Either would match an answer that gives
    that number alone."""
    import sympy

    if not isinstance(value, sympy.Number):
        return False
    if _NUMBER_VARIABLE_RE.fullmatch(text):
        return True
    if len(_list_items(text)) == 1:
        return False
    return re.search(r"[A-Za-z=]", re.sub(r"\\[$!,;: ]", "", text)) is not None


def _defines(eq: Any) -> bool:
    """An equation that gives a variable's value ("y = 2x + 3", "f(x) = ..."): math-verify
    compares its right side with a bare value, as a right answer may give just that."""
    import sympy
    from sympy.core.function import AppliedUndef

    return isinstance(eq.lhs, (sympy.Symbol, AppliedUndef)) and not eq.rhs.has(eq.lhs)


def _zero_against_equation(a: Any, b: Any) -> bool:
    """An equation like "x^2+4x+20=0" is no value 0: math-verify compares an
    equation's right side with a bare value, so 0 would match every such gold."""
    import sympy

    return (isinstance(a, sympy.Equality) and a.rhs == 0 and not _defines(a)
            and isinstance(b, sympy.Expr) and b == 0)


def _same_equation(a: Any, b: Any) -> bool | None:
    """Two equations that define no variable ("x^2-2x+10=0", "2x+3y=6") are the same answer
    when one is a nonzero multiple of the other; None when that does not apply or cannot be
    told. math-verify takes any two without a real solution for equal ("x^2+1=0" and
    "x^2+2=0"), and "\\ln(e^5)=5" for "\\ln(e^6)=5"."""
    import sympy

    if not (isinstance(a, sympy.Equality) and isinstance(b, sympy.Equality)) or _defines(a) or _defines(b):
        return None
    try:
        da, db = sympy.simplify(a.lhs - a.rhs), sympy.simplify(b.lhs - b.rhs)
        if da == 0 or db == 0:
            return da == db
        ratio = sympy.simplify(da / db)
        return not ratio.free_symbols and ratio != 0 and ratio.is_finite is not False
    except Exception:
        return None


def _close_values(g: Any, p: Any) -> bool:
    """Two parsed values equal up to the numeric tolerance: numbers, or tuples and intervals
    of them element by element ((3, pi/2) against (3, 1.5708))."""
    import sympy

    if isinstance(g, sympy.Tuple) and isinstance(p, sympy.Tuple):
        return len(g) == len(p) and all(_close_values(a, b) for a, b in zip(g, p))
    if isinstance(g, sympy.Interval) and isinstance(p, sympy.Interval):
        return (g.left_open, g.right_open) == (p.left_open, p.right_open) and \
            _close_values(g.start, p.start) and _close_values(g.end, p.end)
    gv, pv = complex(g.evalf()), complex(p.evalf())
    return gv.imag == 0 and pv.imag == 0 and numbers_equal(gv.real, pv.real)


def _sleep_compare_for_tests(gold: str, pred: str) -> bool:
    """A compare function that hangs for `float(gold)` seconds (tests the kill path)."""
    time.sleep(float(gold))
    return True


def _resolve(spec: str) -> Any:
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


_CALLER_PATH = "RSTAR_FAST_GRADER_PATH"  # the starting process's sys.path, for the worker


def _serve(compare_spec: str) -> None:
    """Worker loop: one JSON [gold, pred] per stdin line, one verdict per line on what was
    stdout when it started."""
    import json
    import sys

    from rstar_fast.executor._worker import die_with_parent

    # SIGKILLed (the OOM killer), the parent never closes our stdin, and a comparison has no
    # time limit of its own here (the parent's kill is its limit): it could run on for ever,
    # inside C code that no Python thread of ours could interrupt
    die_with_parent(os.getppid())
    # The verdicts go out on a descriptor of their own: whatever a library prints lands on
    # stderr, not between two verdicts (which would shift every later one by one).
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    # the caller's import path and folder after our own (rstar_fast is imported already, from
    # where it is installed): a compare module there is found, a checkout there is not used
    sys.path += [p for p in os.environ.get(_CALLER_PATH, "").split(os.pathsep) if p and p not in sys.path]
    compare = _resolve(compare_spec)
    try:  # warm up (math-verify's imports take seconds) before the first timed comparison
        compare("0", "0")
    except Exception:
        pass
    out.write("ready\n")
    out.flush()
    # From here on stderr (and stdout) is only noise (library warnings) that would grow the
    # parent's file.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    for line in sys.stdin:
        try:
            gold, pred = json.loads(line)
            ok = bool(compare(gold, pred))
        except Exception:
            ok = False
        out.write("1\n" if ok else "0\n")
        out.flush()


class _Spawner:
    """Starts the workers from one thread that lives as long as the process: a worker dies with
    the thread that started it (PR_SET_PDEATHSIG), not with whichever caller's thread that was.
    A daemon thread of its own, not a ThreadPoolExecutor's, which exit joins before the atexit
    handler that closes the workers has run."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, *args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # (a forked child has none)
                self._thread = threading.Thread(target=self._run, name="grading-spawner", daemon=True)
                self._thread.start()
        started: Future[subprocess.Popen[bytes]] = Future()
        self._jobs.put((started, args, kwargs))
        return started.result()

    def _run(self) -> None:
        while True:
            started, args, kwargs = self._jobs.get()
            try:
                started.set_result(subprocess.Popen(*args, **kwargs))
            except BaseException as e:
                started.set_exception(e)


_SPAWNER = _Spawner()


def _readable(f: IO[bytes], timeout: float) -> bool:
    """Whether `f` has input within `timeout` s. poll(), not select(): a process with more
    than 1024 descriptors open (engine sockets, executor pipes) gets numbers select() refuses."""
    waiter = select.poll()
    waiter.register(f, select.POLLIN)
    return bool(waiter.poll(max(0, int(timeout * 1000))))


class _Worker:
    """One grading subprocess (`python -m rstar_fast.search._grading_worker`): a fresh interpreter, so
    nothing of the caller (threads, CUDA, an unguarded __main__) is inherited or re-run.

    The worker says `ready` once its imports are done; only then does a comparison's time limit
    start, so a slow start (a cold disk, a loaded machine) never grades an answer False."""

    def __init__(self, compare: str, start_timeout: float) -> None:
        self._compare = compare
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        env[_CALLER_PATH] = os.pathsep.join([*(os.path.abspath(p or os.curdir) for p in sys.path), os.getcwd()])
        stderr = tempfile.TemporaryFile()  # read back only to explain a worker that died
        self._proc = proc = _SPAWNER.popen(
            # -P: not the current folder first on the path, where a checkout's (or anyone's)
            # rstar_fast would stand in for the installed one
            [sys.executable, "-P", "-m", "rstar_fast.search._grading_worker", self._compare],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env,
            start_new_session=True,  # a terminal's Ctrl-C goes to the caller, which may go on grading
        )
        self._stderr = stderr
        assert proc.stdout is not None
        ready = _readable(proc.stdout, self._start_timeout)
        line = proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            if not ready:
                why = f"was not ready within {self._start_timeout:.0f} s"
            elif line:
                why = f"answered {line[:200]!r} instead of b'ready'"
            else:
                why = f"exited with code {proc.wait()} before it was ready"
            raise GradingError(f"grading worker {why} (compare={self._compare}){self._stderr_tail()}")
        return proc

    def _stderr_tail(self) -> str:
        """Kill the worker; what it wrote to stderr before it became ready (a failed import, say)."""
        stderr, self._stderr = self._stderr, None  # kept open past kill() to be read
        self.kill()
        if stderr is None:
            return ""
        with stderr:
            stderr.seek(0)
            tail = stderr.read()[-2000:].decode(errors="replace").strip()
        return f":\n{tail}" if tail else ""

    def call(self, gold: str, pred: str, timeout: float) -> bool | None:
        """The verdict, or None when the comparison overran `timeout` (worker killed)."""
        try:
            proc = self._proc if self._proc is not None and self._proc.poll() is None else self._start()
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write((json.dumps([gold, pred]) + "\n").encode())
            proc.stdin.flush()
            if _readable(proc.stdout, timeout):
                line = proc.stdout.readline()
                if line:
                    return line.strip() == b"1"
                code = proc.wait()
                raise _WorkerDied(
                    f"grading worker exited with code {code} (compare={self._compare}){self._stderr_tail()}"
                )
        except (BrokenPipeError, OSError) as e:
            self.kill()
            raise _WorkerDied(f"grading worker died: {e}") from e
        except BaseException:
            # interrupted (Ctrl-C) between a request and its answer, or before "ready": that
            # line would be read as the next comparison's verdict
            self.kill()
            raise
        self.kill()
        return None

    def kill(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            for f in (self._proc.stdin, self._proc.stdout):
                if f is not None:
                    f.close()
        if self._stderr is not None:
            self._stderr.close()
        self._proc = self._stderr = None

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None and self._proc.stdin is not None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()


def _key(gold: Any, pred: Any) -> tuple[str, str]:
    """What a comparison is made, and remembered, on: both answers as meant."""
    return prepare_answer(str(gold)), prepare_answer(str(pred))


class Grader:
    """A pool of grading processes. Thread-safe; `agrade` for asyncio code.

    workers: processes running math-verify (started lazily, restarted after a kill); a
        comparison whose worker dies under it (killed from outside, out of memory) is tried
        once more on a new one, and one that ends that one too is graded False (`crashes`);
    timeout_s: wall-clock limit of one comparison (a worker's start is not counted);
    start_timeout_s: how long a new worker may take to import and warm up;
    cache_size: verdicts remembered.
    """

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, cache_size: int = 100_000,
                 compare: str = "rstar_fast.search.grading:math_verify_equal",
                 start_timeout_s: float = 120.0) -> None:
        if workers < 1:
            raise ValueError(f"Grader workers must be >= 1, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"Grader timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._workers = [_Worker(compare, start_timeout_s) for _ in range(workers)]
        for w in self._workers:
            self._idle.put(w)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grader")
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()  # a fork's copy has neither the workers' pipes nor the threads
        # a Grader dropped without close() (a notebook cell run again) stops its workers
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers, self._executor, self._pid)
        self.timeouts = 0  # comparisons that overran and were graded False
        self.crashes = 0  # comparisons that ended two workers and were graded False

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise GradingError("this Grader belongs to the process that made it, not to a fork of it: "
                               "make one in the child (or use rstar_fast.grade)")

    def _cached(self, key: tuple[str, str]) -> bool | None:
        with self._lock:
            v = self._cache.get(key)
            if v is not None:
                self._cache.move_to_end(key)
            return v

    def _remember(self, key: tuple[str, str], v: bool) -> None:
        with self._lock:
            self._cache[key] = v
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _slow_verdict(self, key: tuple[str, str]) -> bool:
        """math-verify's verdict, remembered; one that overran is False this time, not for good
        (a loaded machine may have slowed it)."""
        gold, pred = key
        self._check_process()
        if self._closed:
            raise GradingError("Grader is closed")
        worker = self._idle.get()
        try:
            for attempt in (1, 2):
                if self._closed:  # closed while this call waited: no worker may start again
                    raise GradingError("Grader is closed")
                try:
                    verdict = worker.call(gold, pred, self.timeout_s)
                    break
                except _WorkerDied as e:
                    if self._closed:
                        raise GradingError(f"Grader is closed ({e})") from e
                    if attempt == 2:  # the comparison itself ends its worker
                        with self._lock:
                            self.crashes += 1
                        log.warning("grading %r against %r ended the grading worker twice (%s); graded False",
                                    pred[:80], gold[:80], str(e).splitlines()[0])
                        return False
                    log.warning("grading worker ended during a comparison (%s); trying it on a new one",
                                str(e).splitlines()[0])
        except (OSError, ValueError) as e:  # its pipes closed under it by close()
            raise GradingError(f"Grader is closed ({e})" if self._closed else f"grading failed: {e}") from e
        finally:
            self._idle.put(worker)
        if verdict is None:
            with self._lock:
                self.timeouts += 1
            log.warning("grading %r against %r overran %.1f s; graded False", pred[:80], gold[:80],
                        self.timeout_s)
            return False
        self._remember(key, verdict)
        return verdict

    def grade(self, gold: Any, pred: Any) -> bool:
        """True when `pred` is equivalent to `gold` (a list of golds: to any of them)."""
        if isinstance(gold, (list, tuple)):
            return any(self.grade(g, pred) for g in gold)
        if pred is None or gold is None:
            return False
        key = _key(gold, pred)
        v = self._cached(key)
        if v is not None:
            return v
        v = quick_verdict(*key)
        if v is None:
            return self._slow_verdict(key)
        self._remember(key, v)
        return v

    async def agrade(self, gold: Any, pred: Any) -> bool:
        """`grade` without blocking the event loop."""
        if isinstance(gold, (list, tuple)):
            for g in gold:
                if await self.agrade(g, pred):
                    return True
            return False
        if pred is None or gold is None:
            return False
        key = _key(gold, pred)
        v = self._cached(key)
        if v is None:
            v = quick_verdict(*key)
        if v is None:
            self._check_process()  # the copied executor has no threads: the call would wait for ever
            with self._open_executor():
                future = asyncio.get_running_loop().run_in_executor(self._executor, self._slow_verdict, key)
            return await future
        self._remember(key, v)
        return v

    def grade_many(self, pairs: Iterable[tuple[Any, Any]]) -> list[bool]:
        """Grade many (gold, pred) pairs, using every worker at once."""
        self._check_process()
        with self._open_executor():
            verdicts = self._executor.map(lambda gp: self.grade(*gp), pairs)
        return list(verdicts)

    @contextmanager
    def _open_executor(self) -> Iterator[None]:
        """Submitting to the threads: after close(), a GradingError like grade's."""
        if self._closed:
            raise GradingError("Grader is closed")
        try:
            yield
        except RuntimeError as e:  # "cannot schedule new futures after shutdown": closed meanwhile
            if not self._closed:
                raise
            raise GradingError("Grader is closed") from e

    def close(self) -> None:
        """Stop the workers (a later grade is an error); closing twice does nothing."""
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid:  # a fork's copy: the workers are the parent's to stop
            self._finalizer.detach()
            return
        self._executor.shutdown(wait=True)
        self._finalizer()

    def close_at_exit(self) -> None:
        """close(), where a Ctrl-C while the workers stop kills them instead of printing a
        traceback from the exiting interpreter."""
        try:
            self.close()
        except KeyboardInterrupt:
            for w in self._workers:
                w.kill()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stop_workers(workers: list[_Worker], executor: ThreadPoolExecutor, pid: int) -> None:
    if os.getpid() != pid:
        return
    executor.shutdown(wait=False)
    for w in workers:
        w.stop()


_default: Grader | None = None
_default_pid = 0
_default_lock = threading.Lock()


def default_grader() -> Grader:
    """The shared Grader behind `grade` (one per process; closed at exit)."""
    global _default, _default_pid
    with _default_lock:
        if _default is None or _default_pid != os.getpid():
            _default = Grader(workers=min(4, os.cpu_count() or 1))
            _default_pid = os.getpid()
            atexit.register(_default.close_at_exit)
        return _default


def grade(gold: Any, pred: Any) -> bool:
    """True when the predicted answer `pred` is equivalent to the gold answer `gold`."""
    return default_grader().grade(gold, pred)


async def agrade(gold: Any, pred: Any) -> bool:
    return await default_grader().agrade(gold, pred)


def answers_equivalent(a: Any, b: Any, grader: Grader | None = None) -> bool:
    """Two predicted answers that count as the same (voting): grade in both directions."""
    g = grader or default_grader()
    return g.grade(a, b) or g.grade(b, a)


__all__ = [
    "GradingError", "Grader", "grade", "agrade", "default_grader", "prepare_answer", "normalize_answer",
    "parse_number", "numbers_equal", "quick_verdict", "math_verify_equal", "answers_equivalent",
]

