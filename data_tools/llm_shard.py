"""The paper's three-step LLM sharding (section 3.1): segment -> verify -> extract the question.

For a batch of problems the stages run in lockstep, one backend call per stage per round, so a local
generator batches every pending request and an HTTP backend sends them concurrently:

    SEGMENT  problem             -> {"units": [...]}                        (prompts.segment_messages)
    VERIFY   problem + units     -> {"complete", "non_redundant", "issues", "units"}
    EXTRACT  problem + units     -> {"question", "shards"}

Every reply is parsed as JSON and validated (types, no empty strings, at most max_units pieces) and
checked against the problem (checks.py: no number lost or invented, math verbatim, the question
withheld). A reply that fails is retried with the error fed back to the model, up to max_attempts per
stage; a transport failure (BackendError) is retried as is. When the attempts run out the problem
becomes a failure with a reason code ("api_error", "malformed_json", "invalid_output",
"check:missing_number", ...), the stage, and an excerpt of the last reply: recorded, never dropped,
and never replaced by invented content.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from data_tools import prompts
from data_tools.checks import check_sharding
from data_tools.datasets import Problem
from data_tools.llm_backends import BackendError, ChatBackend
from data_tools.runner import Outcome

STAGES = ("segment", "verify", "extract")


class OutputError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def parse_json_object(text: str) -> dict:
    """The JSON object in a reply; tolerates a <think> block, code fences and text around the object."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL).strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, flags=re.DOTALL)
    if fenced:
        text = fenced.group(1).strip()
    start, end = text.find("{"), text.rfind("}")
    if start == -1 or end < start:
        raise OutputError("malformed_json", "no JSON object in the reply")
    try:
        obj = json.loads(text[start : end + 1])
    except json.JSONDecodeError as e:
        raise OutputError("malformed_json", f"{e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise OutputError("malformed_json", "the reply is not a JSON object")
    return obj


def _string_list(obj: dict, key: str, max_items: int, allow_empty: bool = False) -> list[str]:
    value = obj.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise OutputError("invalid_output", f"'{key}' must be a list of strings")
    value = [v.strip() for v in value]
    if any(not v for v in value):
        raise OutputError("invalid_output", f"'{key}' contains an empty string")
    if not value and not allow_empty:
        raise OutputError("invalid_output", f"'{key}' is empty")
    if len(value) > max_items:
        raise OutputError("invalid_output", f"'{key}' has {len(value)} items; at most {max_items}")
    return value


@dataclass
class LLMShardConfig:
    max_attempts: int = 3  # per stage; a retry shows the model its error
    max_units: int = 36  # 35 shards (the paper's cap) + the question unit
    max_shards: int = 35
    unshardable: str = "fail"  # "fail" | "whole": no shard besides the question -> one shard = the problem

    def __post_init__(self):
        assert self.max_attempts >= 1 and self.unshardable in ("fail", "whole")


@dataclass
class _Job:
    problem: Problem
    stage: str = "segment"
    attempts: int = 0
    messages: list[dict] = field(default_factory=list)
    units: list[str] = field(default_factory=list)
    verdict: dict = field(default_factory=dict)
    outcome: Outcome | None = None
    error: OutputError | BackendError | None = None
    last_reply: str = ""


class LLMSharder:
    def __init__(self, backend: ChatBackend, config: LLMShardConfig | None = None):
        self.backend = backend
        self.config = config or LLMShardConfig()

    # --- one reply -> the next stage, or an OutputError -------------------------------------------
    def _numbers_kept(self, job: _Job, question: str, pieces: list[str]) -> None:
        issues = [i for i in check_sharding(job.problem.text, question, pieces, max_shards=None)
                  if i.code in ("missing_number", "invented_number", "missing_math")]
        if issues:
            raise OutputError(f"check:{issues[0].code}", "; ".join(map(str, issues)))

    def _advance(self, job: _Job, reply: str) -> None:
        obj = parse_json_object(reply)
        text, cfg = job.problem.text, self.config
        if job.stage == "segment":
            job.units = _string_list(obj, "units", cfg.max_units)
            self._numbers_kept(job, " ", job.units)
            job.stage, job.messages = "verify", prompts.verify_messages(text, job.units)
        elif job.stage == "verify":
            for key in ("complete", "non_redundant"):
                if not isinstance(obj.get(key), bool):
                    raise OutputError("invalid_output", f"'{key}' must be true or false")
            issues = obj.get("issues", [])
            if not isinstance(issues, list):
                raise OutputError("invalid_output", "'issues' must be a list")
            job.units = _string_list(obj, "units", cfg.max_units)
            self._numbers_kept(job, " ", job.units)
            job.verdict = {"complete": obj["complete"], "non_redundant": obj["non_redundant"],
                           "issues": [str(i) for i in issues][:10]}
            job.stage, job.messages = "extract", prompts.extract_messages(text, job.units)
        else:
            question = obj.get("question")
            if not isinstance(question, str) or not question.strip():
                raise OutputError("invalid_output", "'question' must be a non-empty string")
            shards = _string_list(obj, "shards", cfg.max_shards, allow_empty=True)
            unsharded = not shards and cfg.unshardable == "whole"
            if unsharded:
                shards = [text.strip()]
            else:
                issues = check_sharding(text, question.strip(), shards, cfg.max_shards)
                if issues:
                    raise OutputError(f"check:{issues[0].code}", "; ".join(map(str, issues)))
            meta = {**job.problem.metadata, "method": "llm", "model": self.backend.name, "verify": job.verdict}
            if unsharded:
                meta["unsharded"] = True
            episode = {"id": job.problem.id, "question": question.strip(), "shards": shards,
                       "answer": job.problem.answer, "metadata": meta}
            job.stage, job.outcome = "done", Outcome(job.problem.id, episode=episode)
            return
        job.attempts = 0

    def _fail(self, job: _Job) -> None:
        err = job.error
        job.outcome = Outcome(
            job.problem.id,
            reason=err.reason if err else "unknown",
            detail=err.detail if err else "",
            extra={"stage": job.stage, "attempts": job.attempts, "last_reply": job.last_reply[:2000]},
        )
        job.stage = "failed"

    # --- the batch loop ---------------------------------------------------------------------------
    def shard_many(self, problems: list[Problem]) -> list[Outcome]:
        jobs = [_Job(p, messages=prompts.segment_messages(p.text)) for p in problems]
        while pending := [j for j in jobs if j.stage in STAGES]:
            replies = self.backend.complete_many([j.messages for j in pending])
            for job, reply in zip(pending, replies, strict=True):
                job.attempts += 1
                if isinstance(reply, BackendError):
                    job.error = reply  # transport failure: resend the same conversation
                else:
                    job.last_reply = reply
                    try:
                        self._advance(job, reply)
                        continue
                    except OutputError as e:
                        job.error = e
                        # Show the model its reply and what was wrong with it, then ask again.
                        job.messages = job.messages + [
                            {"role": "assistant", "content": reply},
                            {"role": "user", "content": prompts.RETRY_MESSAGE.format(error=e)},
                        ]
                if job.attempts >= self.config.max_attempts:
                    self._fail(job)
        return [j.outcome for j in jobs]
