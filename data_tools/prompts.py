"""Prompts for the three-step LLM sharding (paper section 3.1, appendix A.2), kept as data.

Step 1 SEGMENT: the problem -> its minimal logical units, in order, question included.
Step 2 VERIFY:  problem + units -> a verdict on completeness / non-redundancy and the repaired units.
Step 3 EXTRACT: problem + units -> the core question (withheld from the shards, shown every turn)
                and the shards.
Each step is one system prompt with the rules, three worked examples as user/assistant turns (simple
arithmetic, symbolic expressions, multi-constraint geometry; written for memrl), then the problem.
Every reply is a bare JSON object so it can be parsed and validated (llm_shard.py). The examples
follow the rules they teach: numbers, symbols and LaTeX are copied verbatim, nothing is computed.
"""

from __future__ import annotations

import json

_COMMON_RULES = """\
- Copy the problem's wording. The only edits allowed are the minimal ones a piece needs to read on \
its own (for example repeating the subject of a sentence that was split); never paraphrase.
- Keep every number, unit of measure, variable, symbol and LaTeX expression exactly as written: do \
not compute, round, convert, reformat or re-typeset anything ("$2.50" stays "$2.50", "three" stays \
"three", "\\frac{m}{n}" stays "\\frac{m}{n}").
- Do not add reasoning, hints, interpretations, intermediate results or answers. Do not drop \
anything, not even information that looks irrelevant.
- Reply with only the JSON object described below: no prose, no code fences."""

SEGMENT_SYSTEM = f"""\
You split a math problem into its minimal logical units. The units will be revealed to a solver \
one at a time, so each must be a self-contained piece of the original problem.
Rules:
- A unit states exactly one fact, condition, definition or request. Split a sentence that states \
several; never merge two sentences into one unit.
- Keep the units in the order of the problem. The question (the request to the solver) is a unit too.
{_COMMON_RULES}
Reply format: {{"units": ["<unit 1>", "<unit 2>", ...]}}"""

VERIFY_SYSTEM = f"""\
You check a segmentation of a math problem into minimal logical units.
Check that the units are:
- complete: every fact, condition, number, symbol and the question of the problem is in some unit;
- non-redundant: no unit repeats another, and no unit adds anything the problem does not say \
(reasoning, hints, computed values);
- minimal: each unit states one fact, condition, definition or request;
- verbatim: numbers, symbols and LaTeX are exactly as in the problem.
If a check fails, repair the units with the fewest changes. Otherwise return them unchanged.
{_COMMON_RULES}
Reply format: {{"complete": true or false, "non_redundant": true or false, \
"issues": ["<one line per problem found>"], "units": ["<final unit 1>", ...]}}"""

EXTRACT_SYSTEM = f"""\
You separate the core question of a math problem from its context units.
- The question is the request the solver must answer ("How much change does she get?", "Find \
$abc$."), plus any instruction about the form of the answer ("Express your answer as a common \
fraction."). It is shown to the solver at every turn, so it must not appear in any shard.
- The shards are all the other units: every fact, condition and definition, one per shard, in order.
- If the question unit also states a condition ("If $x = 2$, what is $y$?"), the condition becomes \
its own shard and the question keeps only the request.
{_COMMON_RULES}
Reply format: {{"question": "<the core question>", "shards": ["<shard 1>", "<shard 2>", ...]}}"""

EXAMPLES = [
    {  # simple arithmetic
        "problem": "Lena buys 3 notebooks for $2.50 each and a pen that costs half as much as one notebook. "
        "She pays with a $20 bill. How much change does she get, in dollars?",
        "units": [
            "Lena buys 3 notebooks for $2.50 each.",
            "Lena buys a pen that costs half as much as one notebook.",
            "She pays with a $20 bill.",
            "How much change does she get, in dollars?",
        ],
        "draft_units": [  # what VERIFY receives: a missing fact and a unit holding two facts
            "Lena buys 3 notebooks for $2.50 each and a pen that costs half as much as one notebook.",
            "How much change does she get, in dollars?",
        ],
        "verdict": {
            "complete": False,
            "non_redundant": True,
            "issues": ["'She pays with a $20 bill.' is missing", "unit 1 states two facts"],
        },
        "question": "How much change does she get, in dollars?",
        "shards": [
            "Lena buys 3 notebooks for $2.50 each.",
            "Lena buys a pen that costs half as much as one notebook.",
            "She pays with a $20 bill.",
        ],
    },
    {  # symbolic expressions
        "problem": "Let $f(x) = ax^2 + bx + c$, where $a$, $b$, and $c$ are constants. The graph of $y = f(x)$ "
        "passes through $(0, 3)$ and $(1, 6)$, and $f(-1) = 2$. Find $abc$.",
        "units": [
            "Let $f(x) = ax^2 + bx + c$, where $a$, $b$, and $c$ are constants.",
            "The graph of $y = f(x)$ passes through $(0, 3)$.",
            "The graph of $y = f(x)$ passes through $(1, 6)$.",
            "$f(-1) = 2$.",
            "Find $abc$.",
        ],
        "draft_units": [  # added reasoning and a repeated unit
            "Let $f(x) = ax^2 + bx + c$, where $a$, $b$, and $c$ are constants.",
            "The graph of $y = f(x)$ passes through $(0, 3)$, so $c = 3$.",
            "The graph of $y = f(x)$ passes through $(1, 6)$.",
            "$f(-1) = 2$.",
            "$f(-1) = 2$.",
            "Find $abc$.",
        ],
        "verdict": {
            "complete": True,
            "non_redundant": False,
            "issues": ["unit 2 adds reasoning ('so $c = 3$')", "unit 5 repeats unit 4"],
        },
        "question": "Find $abc$.",
        "shards": [
            "Let $f(x) = ax^2 + bx + c$, where $a$, $b$, and $c$ are constants.",
            "The graph of $y = f(x)$ passes through $(0, 3)$.",
            "The graph of $y = f(x)$ passes through $(1, 6)$.",
            "$f(-1) = 2$.",
        ],
    },
    {  # multi-constraint geometry
        "problem": "In right triangle $ABC$, $\\angle C = 90^\\circ$, $AC = 6$, and $BC = 8$. Point $D$ lies on "
        "$\\overline{AB}$ so that $\\overline{CD} \\perp \\overline{AB}$, and $E$ is the midpoint of "
        "$\\overline{AB}$. If $DE = \\frac{m}{n}$, where $m$ and $n$ are relatively prime positive integers, "
        "what is $m + n$?",
        "units": [
            "In right triangle $ABC$, $\\angle C = 90^\\circ$.",
            "$AC = 6$.",
            "$BC = 8$.",
            "Point $D$ lies on $\\overline{AB}$ so that $\\overline{CD} \\perp \\overline{AB}$.",
            "$E$ is the midpoint of $\\overline{AB}$.",
            "$DE = \\frac{m}{n}$, where $m$ and $n$ are relatively prime positive integers.",
            "What is $m + n$?",
        ],
        "draft_units": None,  # VERIFY sees the correct units and returns them unchanged
        "verdict": {"complete": True, "non_redundant": True, "issues": []},
        "question": "What is $m + n$?",
        "shards": [
            "In right triangle $ABC$, $\\angle C = 90^\\circ$.",
            "$AC = 6$.",
            "$BC = 8$.",
            "Point $D$ lies on $\\overline{AB}$ so that $\\overline{CD} \\perp \\overline{AB}$.",
            "$E$ is the midpoint of $\\overline{AB}$.",
            "$DE = \\frac{m}{n}$, where $m$ and $n$ are relatively prime positive integers.",
        ],
    },
]

RETRY_MESSAGE = (
    "Your reply could not be used: {error}\n"
    "Reply again with only the corrected JSON object, following every rule."
)


def _dump(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False)


def segment_user(problem: str) -> str:
    return f"<problem>\n{problem}\n</problem>"


def units_user(problem: str, units: list[str]) -> str:
    return f"<problem>\n{problem}\n</problem>\n<units>\n{_dump(units)}\n</units>"


def _conversation(system: str, shots: list[tuple[str, str]], user: str) -> list[dict]:
    messages = [{"role": "system", "content": system}]
    for shot_user, shot_reply in shots:
        messages += [{"role": "user", "content": shot_user}, {"role": "assistant", "content": shot_reply}]
    return messages + [{"role": "user", "content": user}]


def segment_messages(problem: str) -> list[dict]:
    shots = [(segment_user(ex["problem"]), _dump({"units": ex["units"]})) for ex in EXAMPLES]
    return _conversation(SEGMENT_SYSTEM, shots, segment_user(problem))


def verify_messages(problem: str, units: list[str]) -> list[dict]:
    shots = [
        (units_user(ex["problem"], ex["draft_units"] or ex["units"]), _dump({**ex["verdict"], "units": ex["units"]}))
        for ex in EXAMPLES
    ]
    return _conversation(VERIFY_SYSTEM, shots, units_user(problem, units))


def extract_messages(problem: str, units: list[str]) -> list[dict]:
    shots = [
        (units_user(ex["problem"], ex["units"]), _dump({"question": ex["question"], "shards": ex["shards"]}))
        for ex in EXAMPLES
    ]
    return _conversation(EXTRACT_SYSTEM, shots, units_user(problem, units))
