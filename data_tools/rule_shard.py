"""Rule-based sharder: no LLM, so the whole pipeline runs offline and in seconds.

rule_shard(text) -> (question, shards), every piece a verbatim slice of the problem:
1. split into sentences (memrl.sentences: numbers, abbreviations and math stay intact);
2. the question is the LAST question-like sentence: one ending in "?", one opening with an
   imperative ("Find", "Compute", "Calculate", ...) or a wh-word ("What", "How", "In how many", ...),
   or one with a question clause after a comma or "then" ("If x = 3, then find y."); answer-format
   sentences after it ("Express your answer as a common fraction.", "Enter all solutions ...") are
   appended to the question; when no sentence is question-like, the last answer-format sentence
   ("Enter the ordered triple $(p,q,r).$") is the request;
3. the part of the question sentence before its question clause ("If she sells each for $2, how
   much ...") becomes the last shard when it has >= 3 words, so the withheld question is the core
   question;
4. every other sentence is one shard, in order (sentences after the question that are not
   answer-format instructions keep their place at the end).
A problem with no question-like sentence, or with nothing left to shard ("How many divisors does 196
have?"), raises ShardingError(reason, detail, question); callers record it as a failure or, when
asked, keep the whole problem as a single shard (data_tools.shard --unshardable whole).
"""

from __future__ import annotations

import re

from memrl.sentences import math_body_end, protected_spans, split_sentences

_IMPERATIVE = (
    r"find|compute|calculate|determine|evaluate|simplify|solve|express|estimate|convert|factor|expand|"
    r"rationalize|list|name|identify|prove|show|give|write|work out|figure out"
)
_WH = r"(?:(?:in|at|for|to|by|on|of|from|with)\s+)?(?:what|how|which|who|whom|whose)"
_QUESTION_START = re.compile(
    rf"^[\"'(\s]*(?:(?:then|now|also|so|hence|thus|next|finally),?\s+)?(?:{_IMPERATIVE}|{_WH})\b",
    re.IGNORECASE,
)
# A question clause inside a sentence: ", how many ...", ", then find ...", "... then compute ...".
_CLAUSE_QUESTION = re.compile(
    rf"(?:,\s*(?:(?:and\s+)?then\s+)?|\s(?:and\s+)?then\s+)(?:{_IMPERATIVE}|{_WH})\b", re.IGNORECASE
)
_WONDER = re.compile(  # "He is wondering what the number of legs ... is."
    r"\b(?:wonders?|wondering|wants? to know|wants? to find out|asks?)\s+(?:what|how|which|whether)\b", re.I
)
_FORMAT = re.compile(
    r"^[\"'(\s]*(?:express|enter|give|write|leave|state|round|simplify|list)\s+(?:your|the|all|each|it|an?)?\s*"
    r"(?:final\s+)?(?:answer|answers|result|solutions?|values?)\b"
    r"|^[\"'(\s]*(?:enter|round)\b|^[\"'(\s]*(?:your answer|note:|\(note|please)",
    re.IGNORECASE,
)
MIN_CONDITION_WORDS = 3  # "Now, what ..." keeps "Now" in the question; "If x = 2, what ..." splits


class ShardingError(ValueError):
    def __init__(self, reason: str, detail: str, question: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.question = reason, detail, question


def _mask_math(sentence: str) -> str:
    """The sentence with every math span blanked to "X"s (same length), so the clause regexes cannot
    match inside math; a span ending in a comma ("$f(1) = 1,$ then") ends in "," in the mask."""
    chars = list(sentence)
    for s, e in protected_spans(sentence):
        body_comma = math_body_end(sentence[s:e]) == ","
        chars[s:e] = ["X"] * (e - s)
        if body_comma:
            chars[e - 1] = ","
    return "".join(chars)


def _clause_splits(sentence: str) -> list[tuple[int, int]]:
    """(condition_end, question_start) for every question clause after a comma or 'then'."""
    masked = _mask_math(sentence)
    out = []
    for m in _CLAUSE_QUESTION.finditer(masked):
        p = m.start()
        cond_end = p if sentence[p] == "," else (p + 1 if masked[p] == "," else p)
        out.append((cond_end, p + 1))
    return out


def is_format_instruction(sentence: str) -> bool:
    return bool(_FORMAT.match(sentence))


def is_question_like(sentence: str) -> bool:
    if is_format_instruction(sentence):
        return False
    if sentence.rstrip("\"')]\u201d\u2019 $.").endswith("?") or _QUESTION_START.match(sentence):
        return True
    return bool(_clause_splits(sentence)) or bool(_WONDER.search(_mask_math(sentence)))


def split_condition(sentence: str) -> tuple[str, str] | None:
    """'If a, b, what is c?' -> ('If a, b', 'what is c?'): the first question clause that follows at
    least MIN_CONDITION_WORDS words; None when the sentence opens with its question."""
    if _QUESTION_START.match(sentence):
        return None
    for cond_end, q_start in _clause_splits(sentence):
        condition, question = sentence[:cond_end].strip(), sentence[q_start:].strip()
        if len(condition.split()) >= MIN_CONDITION_WORDS and question:
            return condition, question
    return None


def rule_shard(text: str) -> tuple[str, list[str]]:
    """(question, shards) of a single-turn problem; raises ShardingError(reason, detail)."""
    spans = split_sentences(text)
    sents = [text[s:e] for s, e in spans]
    if not sents:
        raise ShardingError("empty_problem", "the problem text is empty")
    candidates = [i for i, s in enumerate(sents) if is_question_like(s)]
    if not candidates:  # "Enter the ordered triple $(p,q,r).$" is the request when nothing else is
        candidates = [i for i, s in enumerate(sents) if is_format_instruction(s)]
    if not candidates:
        raise ShardingError("no_question", "no interrogative or imperative sentence: " + sents[-1][:80])
    q = candidates[-1]
    after = list(range(q + 1, len(sents)))
    fmt = [i for i in after if is_format_instruction(sents[i])]
    fmt_set = set(fmt)  # a set: a problem of many sentences must not cost their square
    rest = [i for i in after if i not in fmt_set]
    shards = [sents[i] for i in range(q)]
    qtext = sents[q]
    parts = split_condition(qtext)
    if parts is not None:
        shards.append(parts[0])
        qtext = parts[1]
    shards += [sents[i] for i in rest]
    question = " ".join([qtext] + [sents[i] for i in fmt])
    if not shards:
        raise ShardingError("single_sentence", "nothing to shard besides the question: " + text[:80], question)
    return question, shards
