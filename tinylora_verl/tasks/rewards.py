"""Exact-match rewards for GSM8K and MATH-style answers, usable as verl's custom reward function.

Contract (what verl 0.9.1 relies on, see ``verl/experimental/reward_loop/reward_manager/naive.py``)::

    compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float | dict

verl calls it with keyword arguments, merges ``reward.custom_reward_function.reward_kwargs`` into the call and may
add keys of its own (``reward_router_address``, ``reward_model_tokenizer``), which are ignored here. With
``return_dict=True`` the result is ``{"score", "acc", "pred"}`` with the same types on every call, because verl
stacks each key across the batch into ``reward_extra_info``.

Scoring, with ``score`` (default 1.0) and ``format_score`` (default 0.0):

* ``strict`` (GSM8K and ``tinylora/arithmetic`` default): the last ``#### <number>`` in the tail of the response.
* ``lenient`` (alias ``flexible``, verl's name): the last number in the tail.
* ``boxed`` (MATH default): the last ``\\boxed{...}`` in the tail, judged against the ground truth by math-verify.

An exact answer gets ``score``; a well-formed but wrong one (a number after ``####``, any number, or a ``\\boxed{}``
respectively) gets ``format_score``; anything else 0.0. ``None``, non-strings, empty and huge inputs score 0.0 and
never raise; only a bad *configuration* (unknown method or data source) raises ``ValueError``, so a typo fails on
the first batch instead of silently training on zero rewards.

Only the last ``tail_chars`` characters are read (300 for GSM8K, as verl's own ``gsm8k`` rule does; 1000 for
``\\boxed{}``, whose contents can be long matrices), so a 10 MB response costs the same as a short one.

Deliberate differences from ``verl.utils.reward_score.gsm8k`` (which compares strings): numbers are compared as
decimals, so ``18.0``/``18.``/``$18``/``18%``/``1,234``/``.5`` equal ``18``/``18``/``18``/``18``/``1234``/``0.5``;
``####18`` and ``####  18`` (no or several spaces) and ``#### $18`` are accepted; a Unicode minus equals ``-``;
and a hyphen glued to a preceding word or digit (``5-3``) is not a sign. ``-3`` never equals ``3``.

math-verify guards parsing and comparison with ``signal.alarm``, which raises ``ValueError`` outside the main
thread -- and verl runs reward functions in an executor thread. So math-verify runs in-process only on the main
thread with no alarm already pending (an outer alarm, e.g. verl's legacy ``_score_timeout``, would be cancelled by
math-verify's); otherwise it runs in a small spawn process pool whose worker *is* a main thread, with a wall-clock
limit on the future as a second guard. This mirrors ``verl.utils.reward_score.math_verify``.
"""

# No ``from __future__ import annotations``: verl loads custom reward files by path without registering them in
# sys.modules, and dataclasses then cannot resolve string annotations.
import inspect
import logging
import math
import numbers
import re
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeoutError
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

logger = logging.getLogger(__name__)

METHODS = ("auto", "strict", "lenient", "flexible", "boxed")
# verl's GSM8K instruction: it asks for what the strict grader reads (re-exported by tinylora_verl.tasks.data).
GSM8K_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
GSM8K_DATA_SOURCES = ("openai/gsm8k", "gsm8k")
# Synthetic integer arithmetic (tinylora_verl.tasks.arithmetic): worked solutions end in "#### <n>" like GSM8K.
ARITHMETIC_DATA_SOURCE = "tinylora/arithmetic"
MATH_DATA_SOURCES = (
    "DigitalLearningGmbH/MATH-lighteval", "lighteval/MATH", "HuggingFaceH4/MATH-500", "math", "math_dapo",
)
DEFAULT_TAIL_CHARS = {"strict": 300, "lenient": 300, "boxed": 1000}
# Ground truths are short; anything longer is a broken row, not an answer worth parsing.
_MAX_GROUND_TRUTH_CHARS = 1000

_NUMBER = r"(?:\d+(?:,\d+)*(?:\.\d+)?|\.\d+)"
# A sign counts only when not glued to a word/digit/closing bracket, so "5-3" yields 3, not -3.
_SIGNED_NUMBER = rf"(?:(?<![\w)\]])(?P<sign>[-\u2212]))?(?:\$\s?(?P<sign2>[-\u2212])?)?(?P<num>{_NUMBER})%?"
_STRICT_RE = re.compile(rf"####\s*{_SIGNED_NUMBER}")
_LENIENT_RE = re.compile(_SIGNED_NUMBER)
_NUMBER_RE = re.compile(_NUMBER)


@dataclass(frozen=True)
class RewardConfig:
    """Reward options; every field can be set through verl's ``custom_reward_function.reward_kwargs``.

    Args:
        method: ``auto`` picks ``strict`` for GSM8K sources and ``boxed`` for MATH sources.
        format_score: reward for a well-formed but wrong answer (e.g. 0.1 in the CPU learning recipe).
        score: reward for the exact answer.
        tail_chars: characters read from the end of the response; ``None`` uses the per-method default.
        math_timeout: seconds math-verify may spend on parsing / each comparison (an int: ``signal.alarm``).
        return_dict: return ``{"score", "acc", "pred"}`` instead of a float.
    """

    method: str = "auto"
    format_score: float = 0.0
    score: float = 1.0
    tail_chars: int | None = None
    math_timeout: int = 5
    return_dict: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not supported; expected one of {METHODS}")
        for name in ("format_score", "score"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a finite number")
        if self.tail_chars is not None and (not isinstance(self.tail_chars, int) or self.tail_chars <= 0):
            raise ValueError(f"tail_chars={self.tail_chars!r} must be a positive int or None")
        if not isinstance(self.math_timeout, int) or self.math_timeout <= 0:
            raise ValueError(f"math_timeout={self.math_timeout!r} must be a positive int (seconds)")


# ---------------------------------------------------------------------------------------------- extraction


def _tail(text: str, n: int) -> str:
    if len(text) <= n:
        return text
    tail = text[-n:]
    # A cut through the middle of a number would otherwise turn "12345" into a bogus "345".
    if text[-n - 1] in "0123456789.,-$\u2212":
        tail = tail.lstrip("0123456789.,")
    return tail


def normalize_number(text: Any) -> Decimal | None:
    """Parse ``18``, ``18.0``, ``18.``, ``$1,234``, ``-$3``, ``$-3``, ``18%``, ``.5`` as a ``Decimal`` (else None)."""
    if not isinstance(text, str) or not text or len(text) > _MAX_GROUND_TRUTH_CHARS:
        return None
    s = text.strip().replace("\u2212", "-")
    negative = s.startswith("-")
    if negative:
        s = s[1:]
    if s.startswith("$"):
        s = s[1:].lstrip()
    if not negative and s.startswith("-"):
        negative, s = True, s[1:]
    s = s.rstrip(".")
    s = s.removesuffix("%")
    if not _NUMBER_RE.fullmatch(s):
        return None
    try:
        value = Decimal(s.replace(",", ""))
    except InvalidOperation:
        return None
    return -value if negative else value


def _number_from_match(m: re.Match) -> Decimal | None:
    negative = bool(m.group("sign") or m.group("sign2"))
    return normalize_number(("-" if negative else "") + m.group("num"))


def extract_gsm8k_answer(solution: Any, method: str = "strict", tail_chars: int = 300) -> str | None:
    """The answer text (``"-1234.5"``) the given method would grade, or ``None`` when there is none."""
    if not isinstance(solution, str) or not solution:
        return None
    pattern = _STRICT_RE if method == "strict" else _LENIENT_RE
    last = None
    for last in pattern.finditer(_tail(solution, tail_chars)):
        pass
    if last is None:
        return None
    value = _number_from_match(last)
    return None if value is None else _format_decimal(value)


def _format_decimal(value: Decimal) -> str:
    # normalize() alone gives "1.8E+2" for 180; "f" keeps plain digits.
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text


def last_boxed_content(text: Any) -> str | None:
    """Contents of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed 5``) in ``text``, brace-balanced.

    Escaped braces (``\\{``) are skipped, so ``\\boxed{\\{1, 2\\}}`` gives ``\\{1, 2\\}``. Unbalanced -> ``None``.
    """
    if not isinstance(text, str):
        return None
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    while start >= 0:
        head = text[start:]
        cmd = "\\boxed" if head.startswith("\\boxed") else "\\fbox"
        i = start + len(cmd)
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            content = _balanced(text, i)
            if content is not None:
                return content
        elif i > start + len(cmd):  # "\boxed 5": the token after the space, up to whitespace or "$"
            m = re.match(r"[^\s$]+", text[i:])
            if m:
                return m.group(0)
        start = max(text.rfind("\\boxed", 0, start), text.rfind("\\fbox", 0, start))
    return None


def _balanced(text: str, open_idx: int) -> str | None:
    depth = 0
    i = open_idx
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1 : i]
        i += 1
    return None


# ---------------------------------------------------------------------------------------------- graders


def _as_ground_truth(gt: Any) -> str | None:
    # numpy scalars from a parquet column are numbers.Real too; bool is not a ground truth.
    if isinstance(gt, bool):
        return None
    if isinstance(gt, numbers.Real) and math.isfinite(gt):
        return str(gt)
    if isinstance(gt, str) and gt.strip() and len(gt) <= _MAX_GROUND_TRUTH_CHARS:
        return gt.strip()
    return None


@dataclass(frozen=True)
class _Graded:
    reward: float
    correct: bool
    pred: str | None


def _grade_number(pred: str | None, gt: str | None, cfg: RewardConfig) -> _Graded:
    if pred is None or gt is None:
        return _Graded(0.0, False, pred)
    gt_value = normalize_number(gt)
    # A non-numeric GSM8K ground truth is a data problem; fall back to exact text rather than scoring 0.
    correct = (Decimal(pred) == gt_value) if gt_value is not None else pred == gt
    return _Graded(float(cfg.score) if correct else float(cfg.format_score), correct, pred)


def _grade_gsm8k(solution: Any, gt: Any, cfg: RewardConfig, method: str) -> _Graded:
    pred = extract_gsm8k_answer(solution, method, cfg.tail_chars or DEFAULT_TAIL_CHARS[method])
    return _grade_number(pred, _as_ground_truth(gt), cfg)


def gsm8k_strict(solution: Any, gt: Any, format_score: float = 0.0, score: float = 1.0,
                 tail_chars: int = 300) -> float:
    """``score`` if the last ``#### <number>`` equals ``gt`` numerically, ``format_score`` if wrong, else 0."""
    cfg = RewardConfig(method="strict", format_score=format_score, score=score, tail_chars=tail_chars)
    return _grade_gsm8k(solution, gt, cfg, "strict").reward


def gsm8k_lenient(solution: Any, gt: Any, format_score: float = 0.0, score: float = 1.0,
                  tail_chars: int = 300) -> float:
    """``score`` if the last number in the text equals ``gt`` numerically, ``format_score`` if wrong, else 0."""
    cfg = RewardConfig(method="lenient", format_score=format_score, score=score, tail_chars=tail_chars)
    return _grade_gsm8k(solution, gt, cfg, "lenient").reward


def math_boxed(solution: Any, gt: Any, format_score: float = 0.0, score: float = 1.0, tail_chars: int = 1000,
               timeout: int = 5) -> float:
    """``score`` if the last ``\\boxed{}`` is equivalent to ``gt`` per math-verify, ``format_score`` if not."""
    cfg = RewardConfig(method="boxed", format_score=format_score, score=score, tail_chars=tail_chars,
                       math_timeout=timeout)
    return _grade_boxed(solution, gt, cfg).reward


def _grade_boxed(solution: Any, gt: Any, cfg: RewardConfig) -> _Graded:
    gt_text = _as_ground_truth(gt)
    if not isinstance(solution, str) or gt_text is None:
        return _Graded(0.0, False, None)
    pred = last_boxed_content(_tail(solution, cfg.tail_chars or DEFAULT_TAIL_CHARS["boxed"]))
    if pred is None or not pred.strip():
        return _Graded(0.0, False, pred)
    # A ground truth stored with its own \boxed{} (some MATH dumps) must not be boxed twice.
    gold = last_boxed_content(gt_text) or gt_text
    correct = _math_verify_equal(gold, pred, cfg.math_timeout)
    return _Graded(float(cfg.score) if correct else float(cfg.format_score), correct, pred)


def _math_verify_equal(gold: str, pred: str, timeout: int) -> bool:
    if threading.current_thread() is threading.main_thread() and signal.getitimer(signal.ITIMER_REAL)[0] == 0:
        return _math_verify_in_process(gold, pred, timeout)
    return _math_verify_in_pool(gold, pred, timeout)


def _math_verify_in_process(gold: str, pred: str, timeout: int) -> bool:
    # Self-contained (imports inside, no module globals): the worker pool runs this function from its source.
    from math_verify import LatexExtractionConfig, parse, verify

    # Both sides are wrapped identically so "0.5" vs "\frac12" goes through the same LaTeX parser.
    config = [LatexExtractionConfig()]
    gold_parsed = parse(f"\\boxed{{{gold}}}", extraction_config=config, parsing_timeout=timeout)
    pred_parsed = parse(f"\\boxed{{{pred}}}", extraction_config=config, parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()
# The worker gets _math_verify_in_process as source, not as a pickled reference: a reference would make it import
# tinylora_verl, whose __init__ pulls in torch (3 s and ~250 MB per worker), and cannot be resolved at all when verl
# loaded this file by path (custom_reward_function.path) under a synthetic module name.
_WORKER_CALL = "exec(source, namespace) or namespace['_math_verify_in_process'](gold, pred, timeout)"


def _get_pool() -> ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            import multiprocessing

            # spawn, not fork: forking a process that runs Ray/vLLM threads can deadlock the child.
            _pool = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))
        return _pool


def _reset_pool() -> None:
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None


def _math_verify_in_pool(gold: str, pred: str, timeout: int) -> bool:
    # Parse + up to a few comparisons, each alarm-bounded in the worker, plus worker start-up (imports sympy).
    wall_limit = 4 * timeout + 30
    call_globals = {"source": inspect.getsource(_math_verify_in_process), "namespace": {}, "gold": gold,
                    "pred": pred, "timeout": timeout}
    try:
        future = _get_pool().submit(eval, _WORKER_CALL, call_globals)
        return bool(future.result(timeout=wall_limit))
    except FuturesTimeoutError:
        logger.warning("math-verify exceeded %ss in the worker pool; scoring as wrong", wall_limit)
        return False
    except Exception as e:  # noqa: BLE001 -- BrokenProcessPool, or a daemonic parent that may not spawn children
        logger.warning("math-verify worker pool failed (%s: %s); scoring as wrong", type(e).__name__, e)
        _reset_pool()
        return False


# ---------------------------------------------------------------------------------------------- verl entry


def resolve_method(data_source: Any, method: str = "auto") -> str:
    """The concrete method (``strict``/``lenient``/``boxed``) for a data source; raises on an unknown source."""
    if method == "flexible":
        return "lenient"
    if method != "auto":
        return method
    if isinstance(data_source, str):
        if data_source == ARITHMETIC_DATA_SOURCE:
            return "strict"
        if data_source in GSM8K_DATA_SOURCES or "gsm8k" in data_source.lower():
            return "strict"
        if data_source in MATH_DATA_SOURCES or data_source.startswith("aime"):
            return "boxed"
    raise ValueError(
        f"data_source={data_source!r} has no default reward; expected a GSM8K source {GSM8K_DATA_SOURCES}, "
        f"{ARITHMETIC_DATA_SOURCE!r}, a MATH source {MATH_DATA_SOURCES} or 'aime*', or pass method= one of "
        f"{METHODS[1:]}"
    )


def compute_score(data_source: Any, solution_str: Any, ground_truth: Any, extra_info: dict | None = None,
                  **kwargs: Any) -> float | dict:
    """verl custom reward function; see the module docstring. ``kwargs`` are :class:`RewardConfig` fields."""
    known = {k: kwargs[k] for k in RewardConfig.__dataclass_fields__ if k in kwargs}
    cfg = RewardConfig(**known)
    method = resolve_method(data_source, cfg.method)
    graded = _grade_boxed(solution_str, ground_truth, cfg) if method == "boxed" else _grade_gsm8k(
        solution_str, ground_truth, cfg, method)
    if not cfg.return_dict:
        return graded.reward
    return {"score": graded.reward, "acc": 1.0 if graded.correct else 0.0, "pred": graded.pred or ""}
