"""Chat backends for the LLM sharder: anything with complete_many(conversations) -> replies.

- OpenAIChatBackend: any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, SGLang, llama.cpp
  server, ...) through the `openai` client, which owns the HTTP timeout and the retries of transient
  errors (timeouts, connection errors, 429, 5xx) with backoff. The API key is read from an
  environment variable only; it is never logged, written, or kept anywhere but the client, and it is
  scrubbed from error messages. Requests of a batch run concurrently in a thread pool.
- LocalGeneratorBackend: a local Hugging Face checkpoint run by memrl's own generator
  (memrl.hf_io.load_model + memrl.tokenizer.Tokenizer + memrl.generate.Generator), greedy. Those
  modules are imported inside __init__, so data_tools imports without them.

A reply is a str, or a BackendError (reason code + detail) when the request failed after the client's
own retries, or when the endpoint answered 200 with something that is not a chat completion (an HTML error page
from a proxy, truncated JSON): "bad_response". llm_shard.py counts that as a failed attempt of that problem and
records the reason; the run goes on with the other problems.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol


class BackendError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class ChatBackend(Protocol):
    name: str

    def complete_many(self, conversations: list[list[dict]]) -> list[str | BackendError]: ...


class OpenAIChatBackend:
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 3,
        concurrency: int = 8,
        temperature: float = 0.0,
        max_tokens: int = 2048,
    ):
        import openai  # imported here so `--method rule` needs no client library

        key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not key:
            raise ValueError(f"environment variable {api_key_env} is not set (the API key is read only from there)")
        self._secret = key
        # Local servers often need no key; the client insists on one, so a placeholder is sent.
        self.client = openai.OpenAI(base_url=base_url, api_key=key or "EMPTY", timeout=timeout, max_retries=max_retries)
        self._api_error = openai.APIError
        self.name, self.model = model, model
        self.temperature, self.max_tokens = temperature, max_tokens
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="chat")

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def complete(self, messages: list[dict]) -> str | BackendError:
        try:
            resp = self.client.chat.completions.create(
                model=self.model, messages=messages, temperature=self.temperature, max_tokens=self.max_tokens
            )
        except self._api_error as e:
            status = getattr(e, "status_code", None)
            detail = f"{type(e).__name__}" + (f" (HTTP {status})" if status else "") + f": {str(e)[:300]}"
            return BackendError("api_error", self._scrub(detail))
        except ValueError as e:  # the client could not parse the 200's body as JSON (json.JSONDecodeError)
            return BackendError("bad_response", self._scrub(f"HTTP 200 with a body that is not JSON: {str(e)[:300]}"))
        try:  # a 200 that is not a chat completion: the client hands back the raw text (an HTML page) or a stub
            empty = not resp.choices or resp.choices[0].message.content is None
            choice = None if empty else resp.choices[0]
        except (AttributeError, TypeError, IndexError):
            return BackendError("bad_response", self._scrub(f"HTTP 200 but not a chat completion: {str(resp)[:300]!r}"))
        if choice is None:
            return BackendError("empty_response", "the reply has no message content")
        if choice.finish_reason == "length":
            tail = choice.message.content[-200:]
            return BackendError("truncated_output", f"hit max_tokens={self.max_tokens}: {tail}")
        return choice.message.content

    def complete_many(self, conversations: list[list[dict]]) -> list[str | BackendError]:
        return list(self.pool.map(self.complete, conversations))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()


def flatten_messages(messages: list[dict]) -> str:
    """A chat (system, few-shot turns, question) as one user message, for Tokenizer.encode_prompt,
    which wraps a single user turn in the model's chat template (or uses it raw for base models)."""
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"])
        elif m["role"] == "user":
            parts.append("### Input\n" + m["content"])
        else:
            parts.append("### Output\n" + m["content"])
    parts.append("### Output (the JSON object for the last input only)")
    return "\n\n".join(parts)


class LocalGeneratorBackend:
    def __init__(
        self,
        model_path: str | Path,
        max_new_tokens: int = 1024,
        device: str | None = None,
        dtype: str = "bfloat16",
        kv_budget_tokens: int | None = None,
    ):
        import torch
        from memrl.generate import Generator, SamplingParams
        from memrl.hf_io import load_model
        from memrl.tokenizer import Tokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = Tokenizer.from_pretrained(str(model_path))
        model = load_model(str(model_path), dtype=getattr(torch, dtype), device=device)
        self.generator = Generator(model, vocab_size=self.tokenizer.vocab_size, kv_budget_tokens=kv_budget_tokens)
        self.stop_ids = frozenset(self.tokenizer.stop_ids)
        # Greedy: sharding is a deterministic transformation, reruns must give the same episodes.
        self.params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True, stop_ids=self.stop_ids)
        self.max_new_tokens = max_new_tokens
        self.name = f"local:{Path(model_path).name}"

    def complete_many(self, conversations: list[list[dict]]) -> list[str | BackendError]:
        prompts = [self.tokenizer.encode_prompt(flatten_messages(c)) for c in conversations]
        try:
            completions = self.generator.generate(prompts, self.params)
        except Exception as e:  # e.g. out of memory: every request of the batch failed, none is lost
            return [BackendError("generator_error", f"{type(e).__name__}: {str(e)[:300]}")] * len(prompts)
        replies: list[str | BackendError] = [BackendError("generator_error", "no completion")] * len(prompts)
        for c in completions:
            ids = [t for t in c.token_ids if t not in self.stop_ids]
            text = self.tokenizer.decode(ids)
            if c.finish_reason == "length":
                replies[c.prompt_index] = BackendError(
                    "truncated_output", f"hit max_new_tokens={self.max_new_tokens}: {text[-200:]}"
                )
            else:
                replies[c.prompt_index] = text
        return replies

    def close(self) -> None:
        pass
