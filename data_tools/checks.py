"""Checks run on every sharded episode before it is written; a failed check is a recorded failure.

check_sharding(problem, question, shards) -> list[Issue]; empty means the episode passes:
  empty_question         the question is missing or blank
  no_shards              nothing left to reveal turn by turn
  empty_shard            a blank shard
  missing_number         a number of the problem is in neither the shards nor the question
  invented_number        the shards/question hold a number the problem does not (LLM hallucination)
  missing_math           a $...$ / \\(...\\) / \\[...\\] span of the problem is not kept verbatim
  duplicate_shard        two identical shards (the segmentation is redundant)
  question_not_withheld  a shard is the question itself (the question must be withheld)
  too_many_shards        more than max_shards (the paper caps episodes at 35)

Numbers are compared by value, as a set: "1,000" == "1000", "2.50" == "2.5", and the number words
zero..twenty, the tens, hundred, thousand, million and billion count as their values (so "three" may
become "3", but a number may not disappear or appear). check_chunks() is the analogue for long
documents: the chunks, joined, are the document (up to whitespace). Linear in the text for verbatim shards (a math
span is first looked up among the shards' own spans; only one not found there is searched for as a substring).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from memrl.sentences import protected_spans

_NUMERAL = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+")
_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
NUMBER_WORDS = {w: i for i, w in enumerate(_WORDS)} | {
    "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
    "hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9,
}
_WORD_RE = re.compile(r"\b(" + "|".join(NUMBER_WORDS) + r")\b")  # run on the lower-cased text


@dataclass(frozen=True)
class Issue:
    code: str
    detail: str

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


def _value(token: str) -> str:
    """Canonical value: "1,000" -> "1000", "2.50" -> "2.5", ".5" -> "0.5", "007" -> "7"."""
    try:
        d = Decimal(token.replace(",", ""))
    except InvalidOperation:
        return token
    return str(int(d)) if d == d.to_integral_value() else format(d.normalize(), "f")


def numbers(text: str) -> dict[str, str]:
    """{value: first spelling} of every numeral and number word in text."""
    found: dict[str, str] = {}
    for m in _NUMERAL.finditer(text):
        found.setdefault(_value(m.group(0)), m.group(0))
    for m in _WORD_RE.finditer(text.lower()):
        found.setdefault(str(NUMBER_WORDS[m.group(1)]), text[m.start() : m.end()])
    return found


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def math_spans(text: str) -> list[str]:
    return [text[s:e] for s, e in protected_spans(text) if not text.startswith("[asy]", s)]


def check_sharding(problem: str, question: str, shards: list[str], max_shards: int | None = 35) -> list[Issue]:
    issues = []
    if not isinstance(question, str) or not question.strip():
        issues.append(Issue("empty_question", "the question is empty"))
        question = ""
    if not shards:
        issues.append(Issue("no_shards", "no shards"))
    for i, shard in enumerate(shards):
        if not shard.strip():
            issues.append(Issue("empty_shard", f"shard {i} is empty"))
    if max_shards is not None and len(shards) > max_shards:
        issues.append(Issue("too_many_shards", f"{len(shards)} shards > {max_shards}"))

    produced = "\n".join(shards + [question])
    want, have = numbers(problem), numbers(produced)
    missing = [spelling for value, spelling in want.items() if value not in have]
    if missing:
        issues.append(Issue("missing_number", "not in shards or question: " + ", ".join(missing[:10])))
    invented = [spelling for value, spelling in have.items() if value not in want]
    if invented:
        issues.append(Issue("invented_number", "not in the problem: " + ", ".join(invented[:10])))

    squashed = _squash(produced)
    kept = {_squash(span) for span in math_spans(produced)}  # verbatim shards keep their spans: a set look-up
    lost = [span for span in math_spans(problem) if _squash(span) not in kept and _squash(span) not in squashed]
    if lost:
        issues.append(Issue("missing_math", "not verbatim: " + ", ".join(s[:60] for s in lost[:5])))

    normed = [" ".join(s.split()) for s in shards]
    dups = sorted(s for s, n in Counter(normed).items() if n > 1)
    if dups:
        issues.append(Issue("duplicate_shard", "repeated: " + " | ".join(d[:60] for d in dups[:3])))
    if question.strip() and " ".join(question.split()) in normed:
        issues.append(Issue("question_not_withheld", "a shard equals the question"))
    return issues


def check_chunks(document: str, chunks: list[str]) -> list[Issue]:
    """Chunks of a long document: none empty, and together exactly the document up to whitespace."""
    issues = [Issue("empty_shard", f"chunk {i} is empty") for i, c in enumerate(chunks) if not c.strip()]
    if not chunks:
        issues.append(Issue("no_shards", "no chunks"))
    if _squash("".join(chunks)) != _squash(document):
        issues.append(Issue("lossy_chunking", "the chunks do not reproduce the document"))
    return issues
