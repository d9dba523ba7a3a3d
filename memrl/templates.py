"""Turn prompts as data (DESIGN §4): the paper's Figure 4 templates, and how a turn's text is filled in.

    memory turn   <question> {question} </question>\\n<memory> {memory} </memory>\\n<segment> {segment} </segment>\\n
                  Updated memory:
    final turn    <question> {question} </question>\\n<memory> {memory} </memory>\\nYour final answer:
    single turn   <question> {question} </question>\\n<problem> {problem} </problem>\\nYour final answer:

Two sets of final / single-turn templates:
- Figure 4 as printed (FINAL_TEMPLATE, SINGLE_TURN_TEMPLATE), the dataclass defaults. The built-in synthetic task
  and its shipped starting policy use them: that policy was trained to answer `\\boxed{n}` after "Your final answer:".
- REASONED_FINAL_TEMPLATE / REASONED_SINGLE_TURN_TEMPLATE, the paper presets' (memrl/config.py): Figure 4's slots
  ending "Reason step by step, then give your final answer within \\boxed{}." Appendix A.3 says the final turn
  requires \\boxed{}, which Figure 4's wording never asks for; a real instruct model given "Your final answer:" answers
  a bare number without reasoning. Measured (2026-11-30, Qwen2.5-Coder-0.5B-Instruct, GSM8K test, first 256,
  greedy): single-turn 0.051 -> 0.258, full-history 0.035 -> 0.219 with this ending. The memory template stays
  Figure 4's in both sets.

The `conversation` condition (memrl/conversation.py) sends each shard, then the final instruction, as user messages
of one chat; its two templates are the memory and final templates without the memory line (derived below), so the
memory and conversation conditions ask the same thing each turn and differ only in what the model sees: its own
memory, or the whole chat.

The templates are plain strings (config fields, overridable with --rollout.memory_template=...). The filled text is
one user message: memrl.tokenizer.Tokenizer.encode_prompt wraps it in the model's chat template (instruct models) or
uses it raw (base models).

Invariants:
- Filling is one regex pass over the TEMPLATE only: a question that itself contains "{memory}" or LaTeX braces
  ("\\frac{1}{2}") is inserted verbatim and never re-substituted (str.format / chained str.replace would break).
- Full-history turns reuse the memory/final templates with {memory} := the shards seen so far, one per line, so
  the memory and full-history conditions differ only in what fills that slot.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# The paper's Figure 4 (appendix A.3), with ASCII angle brackets. memrl.config holds the same strings as the
# defaults of rollout.memory_template / final_template / single_turn_template (tests/test_rollout.py checks it).
MEMORY_TEMPLATE = (
    "<question> {question} </question>\n<memory> {memory} </memory>\n<segment> {segment} </segment>\nUpdated memory:"
)
FINAL_TEMPLATE = "<question> {question} </question>\n<memory> {memory} </memory>\nYour final answer:"
SINGLE_TURN_TEMPLATE = "<question> {question} </question>\n<problem> {problem} </problem>\nYour final answer:"
# The paper presets' final and single-turn prompts: ask for reasoning and for the \boxed{} the reward reads.
REASON_AND_BOX = "Reason step by step, then give your final answer within \\boxed{}."
REASONED_FINAL_TEMPLATE = "<question> {question} </question>\n<memory> {memory} </memory>\n" + REASON_AND_BOX
REASONED_SINGLE_TURN_TEMPLATE = "<question> {question} </question>\n<problem> {problem} </problem>\n" + REASON_AND_BOX
INITIAL_MEMORY = "No previous memory."  # m_0: the fixed memory shown at the first turn
HISTORY_SEPARATOR = "\n"  # full-history: the shards seen so far, one per line, in the {memory} slot
PROBLEM_SEPARATOR = " "  # single-turn without metadata.problem: the shards joined back into one text

_PLACEHOLDER = re.compile(r"\{(question|memory|segment|problem)\}")
# the placeholders each template must hold (checked here and by memrl.config for rollout.<kind>_template)
PLACEHOLDERS = {"memory": ("question", "memory", "segment"), "final": ("question", "memory"),
                "single_turn": ("question", "problem"), "conversation_shard": ("question", "segment"),
                "conversation_final": ("question",)}
_MEMORY_LINE = "<memory> {memory} </memory>\n"


def without_memory_line(template: str) -> str:
    """A memory / final template minus its memory line: the conversation condition's user messages."""
    assert template.count(_MEMORY_LINE) == 1, f"template has no single {_MEMORY_LINE!r} line: {template!r}"
    return template.replace(_MEMORY_LINE, "")


# conversation condition: the same instructions as the memory and final turns, the chat holds what memory held
CONVERSATION_SHARD_TEMPLATE = without_memory_line(MEMORY_TEMPLATE)
CONVERSATION_FINAL_TEMPLATE = without_memory_line(FINAL_TEMPLATE)


def fill(template: str, **values: str) -> str:
    """Substitute {question} / {memory} / {segment} / {problem} in one pass; every placeholder used must be given."""
    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in values:
            raise KeyError(f"template needs {{{key}}} but no value was given: {template!r}")
        return values[key]

    return _PLACEHOLDER.sub(sub, template)


@dataclass(frozen=True)
class Templates:
    memory: str = MEMORY_TEMPLATE
    final: str = FINAL_TEMPLATE
    single_turn: str = SINGLE_TURN_TEMPLATE
    initial_memory: str = INITIAL_MEMORY
    conversation_shard: str = CONVERSATION_SHARD_TEMPLATE
    conversation_final: str = CONVERSATION_FINAL_TEMPLATE

    def __post_init__(self):
        for name, keys in PLACEHOLDERS.items():
            missing = [k for k in keys if "{" + k + "}" not in getattr(self, name)]
            assert not missing, f"{name} template lacks the placeholder(s) {missing}: {getattr(self, name)!r}"
        for name in ("conversation_shard", "conversation_final"):
            assert "{memory}" not in getattr(self, name), f"{name} template has no memory to fill: the chat holds it"

    @classmethod
    def from_config(cls, rollout_cfg) -> "Templates":
        """From memrl.config.RolloutCfg (memory_template, final_template, single_turn_template, initial_memory,
        conversation_shard_template, conversation_final_template)."""
        return cls(memory=rollout_cfg.memory_template, final=rollout_cfg.final_template,
                   single_turn=rollout_cfg.single_turn_template, initial_memory=rollout_cfg.initial_memory,
                   conversation_shard=rollout_cfg.conversation_shard_template,
                   conversation_final=rollout_cfg.conversation_final_template)

    def memory_turn(self, question: str, memory: str, segment: str) -> str:
        return fill(self.memory, question=question, memory=memory, segment=segment)

    def final_turn(self, question: str, memory: str) -> str:
        return fill(self.final, question=question, memory=memory)

    def single_turn_prompt(self, question: str, problem: str) -> str:
        return fill(self.single_turn, question=question, problem=problem)

    def conversation_shard_turn(self, question: str, segment: str) -> str:
        return fill(self.conversation_shard, question=question, segment=segment)

    def conversation_final_turn(self, question: str) -> str:
        return fill(self.conversation_final, question=question)

    def history(self, shards: list[str]) -> str:
        """What fills {memory} in a full-history turn: the shards so far, or m_0 before the first one."""
        return HISTORY_SEPARATOR.join(shards) if shards else self.initial_memory
