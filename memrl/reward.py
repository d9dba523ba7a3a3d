"""Rule-based rewards: a boxed math answer, a GSM8K number, or a QA answer's token F1.

`score(response, answer, kind)` is the one entry point, a float in [0, 1]; `episode_score(text, episode, kind)` is
it against an episode's references (what training and evaluation call).

- "math":  the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`) of the response, checked for mathematical
           equivalence with math-verify (HuggingFace), not a home-made normaliser. A response with no boxed
           answer (or a truncated one) scores 0: the paper presets' final and single-turn prompts ask for
           `\\boxed{}` (memrl.templates.REASONED_FINAL_TEMPLATE), and the built-in synthetic task's policy is
           trained to box its answer.
- "gsm8k": the last boxed answer (else the text after the last `####`) read as an exact rational number, and
           compared with the number after `####` in the reference (commas, `$`, units, a trailing `.` ignored).
- "qa":    LongBench's qa_f1_score (THUDM/LongBench metrics.py: normalize_answer, then token-level F1 with a
           Counter), max over the reference answers when several are given. The prediction is the last boxed
           answer if the response has one, else the whole response.

The response is the final turn's reply as memrl.rollout decodes it: for a thinking model, the text after its
`</think>` (a `\\boxed{}` inside the reasoning is never read).

Invariant: never raises on model output, whatever it is; a malformed response is simply wrong (0.0).

math-verify times parsing and comparison out with signal.alarm, which works only in the main thread (elsewhere
it raises ValueError). `_timeout_seconds()` passes a timeout only when called from the main thread, and None
(no timeout) elsewhere, so the reward can run in worker threads; there, a pathological expression can only be
stopped by the caller.
"""
from __future__ import annotations

import re
import string
import threading
from collections import Counter
from fractions import Fraction

from math_verify import parse, verify

from memrl.episodes import REWARD_KINDS, Episode

MATH_TIMEOUT_S = 5  # per parse / per comparison; math-verify's own default

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (nested braces balanced), or of `\\boxed 5`.

    None when there is none, or when the last one is never closed (a response cut by the token budget).
    """
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    i = start + len(cmd)
    if i < len(text) and text[i].isalpha():  # e.g. `\boxedfoo`: another command, not a box
        return None
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":  # `\boxed 5`, `\boxed -3.5$`: up to the next space or `$`
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{" and text[j - 1] != "\\":
            depth += 1
        elif text[j] == "}" and text[j - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None  # unbalanced: truncated


# ----------------------------------------------------------------------------- math (math-verify)

def _timeout_seconds() -> int | None:
    # signal.alarm-based timeouts only work in the main thread; elsewhere math-verify would raise ValueError.
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _parse_boxed(content: str) -> list:
    # Wrapped back into \boxed{} so math-verify's boxed extractor (highest priority) reads it as one expression.
    try:
        return parse(f"\\boxed{{{content}}}", parsing_timeout=_timeout_seconds())
    except Exception:  # math-verify swallows its own errors; this is belt and braces for model output
        return []


def math_equal(pred: str, gold: str) -> bool:
    """Is the boxed content `pred` mathematically equivalent to the reference answer `gold` (no `\\boxed`)?"""
    pred, gold = pred.strip(), gold.strip()
    if not pred or not gold:
        return False
    if pred == gold:  # identical text is equal even when sympy cannot parse it (e.g. "\text{Monday}")
        return True
    gold_parsed, pred_parsed = _parse_boxed(gold), _parse_boxed(pred)
    if not gold_parsed or not pred_parsed:
        return False
    try:  # gold first: verify() is asymmetric (assignments and equations are read from the gold side)
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=_timeout_seconds()))
    except Exception:
        return False


def math_score(response: str, answer: str) -> float:
    pred = last_boxed(response)
    gold = last_boxed(answer) or answer  # a reference given as a full solution: use its boxed answer
    return float(pred is not None and math_equal(pred, gold))


# ----------------------------------------------------------------------------- GSM8K numbers

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def parse_number(text: str) -> Fraction | None:
    """The last number in `text` as an exact Fraction: `$1,000.` -> 1000, `\\frac{3}{4}` -> 3/4, `18 dollars` -> 18."""
    s = re.sub(r"\\text\{([^{}]*)\}", r" \1 ", text)  # \text{ dollars} -> dollars
    s = re.sub(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", s)
    s = s.replace("\\$", " ").replace("$", " ").replace("\\%", " ").replace("\\!", "").replace("{,}", ",")
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # thousands separators: 1,234,567 -> 1234567
    numbers = _NUMBER.findall(s)
    if not numbers:
        return None
    try:
        return Fraction(numbers[-1])
    except (ValueError, ZeroDivisionError):  # 3/0
        return None


def gsm8k_reference(answer: str) -> str:
    """The final answer of a GSM8K reference: the text after the last `####` (or the whole string)."""
    return answer.rsplit("####", 1)[-1].strip()


def gsm8k_score(response: str, answer: str) -> float:
    pred = last_boxed(response)
    if pred is None and "####" in response:
        pred = gsm8k_reference(response)
    if pred is None:
        return 0.0
    gold = parse_number(gsm8k_reference(answer))
    assert gold is not None, f"GSM8K reference has no number: {answer[-80:]!r}"
    return float(parse_number(pred) == gold)


# ----------------------------------------------------------------------------- QA F1 (LongBench)

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation, drop articles, collapse whitespace (LongBench metrics.py, from SQuAD)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def qa_f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 of the normalised answers (LongBench metrics.py qa_f1_score / f1_score)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_score(response: str, answer: str | list[str]) -> float:
    pred = last_boxed(response)
    if pred is None:
        pred = response
    answers = [answer] if isinstance(answer, str) else list(answer)
    # LongBench scores a prediction against every reference and keeps the best (eval.py scorer()).
    return max((qa_f1_score(pred, a) for a in answers), default=0.0)


# ----------------------------------------------------------------------------- entry point

def episode_score(text: str, episode: Episode, default_kind: str) -> float:
    """The reward of an episode's final answer `text`: against every reference (QA: the max F1, as LongBench
    scores), graded as the episode's metadata.reward_kind says, else as `default_kind` (data.reward_kind)."""
    return score(text, episode.references, episode.metadata.get("reward_kind", default_kind))


def score(response: str, answer: str | list[str], kind: str) -> float:
    """Reward in [0, 1] of one final-turn response against the reference answer."""
    if kind in ("math", "gsm8k") and not isinstance(answer, str):  # several references: any one may match
        return max((score(response, a, kind) for a in answer), default=0.0)
    if kind == "math":
        return math_score(response, answer)
    if kind == "gsm8k":
        return gsm8k_score(response, answer)
    if kind == "qa":
        return qa_score(response, answer)
    raise ValueError(f"unknown reward kind {kind!r}; expected one of {REWARD_KINDS}")
