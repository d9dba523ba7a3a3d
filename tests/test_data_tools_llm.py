"""The LLM sharder against a REAL HTTP server on 127.0.0.1 speaking the chat-completions protocol,
with canned answers (derived from the rule sharder, so they are deterministic and correct), malformed
JSON, a timeout, 5xx errors and lost numbers; a killed run resumed; and the local-checkpoint backend
through memrl's generator interface (a fake that follows the contract, and the real one when present)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data_tools import prompts
from data_tools.datasets import Problem
from data_tools.llm_backends import LocalGeneratorBackend
from data_tools.llm_shard import LLMShardConfig, LLMSharder, parse_json_object
from data_tools.rule_shard import rule_shard
from data_tools.runner import failures_path
from data_tools.schema import read_episodes
from memrl.sentences import sentences
from data_tools.shard import main as shard_main
from memrl.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-test-SECRET-7f3a9c"  # must never appear in any output, log or file

BASE = [
    "Tom has 12 marbles. He gives 5 marbles to Ann. How many marbles does Tom have left?",
    "A shirt costs $15.50. Sam buys 3 shirts. He pays with a $100 bill. How much change does he get?",
    "Let $f(x) = 3x + 2$. If $f(a) = 11$, what is $a$?",
    "A garden is 8 meters long. It is 5 meters wide. What is the area of the garden in square meters?",
]


@dataclass(frozen=True)
class RawBody:
    """A 200 whose body is not a chat completion, as a misbehaving proxy or endpoint sends one."""
    content_type: str
    body: bytes


HTML_PAGE = RawBody("text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>")
BROKEN_JSON = RawBody("application/json", b'{"id": "chatcmpl-x", "choices": [{"index": 0, "mess')


def canned_reply(messages: list[dict], calls: Counter) -> tuple[int, str | RawBody, float]:
    """(HTTP status, reply content, seconds to sleep first) for one chat request."""
    system = messages[0]["content"]
    stages = {prompts.SEGMENT_SYSTEM: "segment", prompts.VERIFY_SYSTEM: "verify", prompts.EXTRACT_SYSTEM: "extract"}
    stage = stages[system]
    user = next(m["content"] for m in reversed(messages) if m["role"] == "user" and "<problem>" in m["content"])
    problem = user.split("<problem>\n", 1)[1].split("\n</problem>", 1)[0]
    calls[(problem, stage)] += 1
    n = calls[(problem, stage)]
    if "[500-always]" in problem or ("[500-once]" in problem and stage == "verify" and n == 1):
        return 500, "server exploded", 0.0
    if ("[slow-always]" in problem or "[slow-once]" in problem and n == 1) and stage == "segment":
        return 200, "", 1.5  # the client's timeout is shorter: it gives up and retries
    if "[html-200]" in problem and stage == "segment":
        return 200, HTML_PAGE, 0.0
    if "[badjson-once]" in problem and stage == "verify" and n == 1:
        return 200, BROKEN_JSON, 0.0
    if "[malformed-always]" in problem or ("[malformed-once]" in problem and stage == "segment" and n == 1):
        return 200, 'Sure! {"units": ["Tom has 12 marbles.", ', 0.0
    if stage == "segment":
        return 200, "```json\n" + json.dumps({"units": sentences(problem)}) + "\n```", 0.0
    units = json.loads(user.split("<units>\n", 1)[1].split("\n</units>", 1)[0])
    if stage == "verify":
        return 200, json.dumps({"complete": True, "non_redundant": True, "issues": [], "units": units}), 0.0
    question, shards = rule_shard(problem)
    if "[lose-number]" in problem:
        shards = shards[1:]
    return 200, json.dumps({"question": question, "shards": shards}), 0.0


@dataclass
class ChatServer:
    delay: float = 0.0  # per request, to make a run slow enough to kill
    calls: Counter = field(default_factory=Counter)
    requests: list = field(default_factory=list)  # (stage-less) last user message of every request

    def __enter__(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "not found"}})
                if self.headers.get("Authorization") != f"Bearer {SECRET}":
                    return self._send(401, {"error": {"message": "bad key"}})
                server.requests.append(body["messages"])
                status, content, sleep = canned_reply(body["messages"], server.calls)
                time.sleep(sleep + server.delay)
                if status != 200:
                    return self._send(status, {"error": {"message": content, "type": "server_error"}})
                if isinstance(content, RawBody):
                    self.send_response(200)
                    self.send_header("Content-Type", content.content_type)
                    self.send_header("Content-Length", str(len(content.body)))
                    self.end_headers()
                    self.wfile.write(content.body)
                    return
                self._send(200, {
                    "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                })

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: a free port
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def write_gsm8k(path: Path, texts: list[str]) -> None:
    rows = [{"question": t, "answer": f"steps\n#### {i}"} for i, t in enumerate(texts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def llm_args(inp: Path, out: Path, url: str, *extra: str) -> list[str]:
    return ["--input", str(inp), "--dataset", "gsm8k", "--method", "llm", "--out", str(out), "--base-url", url,
            "--model", "fake-model", "--api-key-env", "MEMRL_TEST_KEY", *extra]


def assert_secret_nowhere(*texts: str, folder: Path) -> None:
    for t in texts:
        assert SECRET not in t
    for f in folder.rglob("*"):
        if f.is_file():
            assert SECRET not in f.read_text(errors="replace"), f


def test_parse_json_object():
    assert parse_json_object('<think>hm {"a": 0}</think> Here: ```json\n{"units": ["a"]}\n```') == {"units": ["a"]}
    assert parse_json_object('prefix {"question": "q"} suffix') == {"question": "q"}
    for bad in ['{"units": [', "no json", "[1, 2]"]:
        with pytest.raises(ValueError, match="malformed_json"):
            parse_json_object(bad)


def test_http_pipeline_retries_and_records_failures(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEMRL_TEST_KEY", SECRET)
    texts = BASE + [
        BASE[0] + " [malformed-once]",
        BASE[1] + " [malformed-always]",
        BASE[2] + " [500-once]",
        BASE[3] + " [500-always]",
        BASE[0] + " [slow-once]",
        BASE[1] + " [lose-number]",
    ]
    inp, out = tmp_path / "test.jsonl", tmp_path / "out.jsonl"
    write_gsm8k(inp, texts)
    with ChatServer() as server:
        rc = shard_main(llm_args(inp, out, server.url, "--timeout", "0.5", "--max-retries", "1", "--max-attempts", "2",
                                 "--batch-size", "4", "--concurrency", "4"))
    assert rc == 0
    eps = {e["id"]: e for e in read_episodes(out)}
    fails = {f["id"]: f for f in map(json.loads, failures_path(out).read_text().splitlines())}
    assert set(eps) | set(fails) == {f"gsm8k-test-{i}" for i in range(len(texts))} and not set(eps) & set(fails)
    assert sorted(eps) == [f"gsm8k-test-{i}" for i in (0, 1, 2, 3, 4, 6, 8)]
    for i in (0, 1, 2, 3, 4, 6, 8):  # canned answers come from the rule sharder: same episode
        e = eps[f"gsm8k-test-{i}"]
        q, shards = rule_shard(texts[i])
        assert (e["question"], e["shards"], e["answer"]) == (q, shards, str(i))
        assert e["metadata"]["method"] == "llm" and e["metadata"]["model"] == "fake-model"
        assert e["metadata"]["verify"] == {"complete": True, "non_redundant": True, "issues": []}
    assert fails["gsm8k-test-5"]["reason"] == "malformed_json" and fails["gsm8k-test-5"]["stage"] == "segment"
    assert fails["gsm8k-test-5"]["attempts"] == 2 and fails["gsm8k-test-5"]["last_reply"].startswith("Sure!")
    assert fails["gsm8k-test-7"]["reason"] == "api_error" and "500" in fails["gsm8k-test-7"]["detail"]
    assert fails["gsm8k-test-9"]["reason"] == "check:missing_number" and fails["gsm8k-test-9"]["stage"] == "extract"
    # malformed once -> the retry showed the model its reply and the error
    retry = [m for m in server.requests if "[malformed-once]" in json.dumps(m) and len(m) > 8]
    assert retry and retry[0][-1]["content"].startswith("Your reply could not be used: malformed_json")
    # 5xx once: the client retried by itself; slow once: the client timed out and retried
    assert server.calls[(texts[6], "verify")] == 2 and server.calls[(texts[8], "segment")] == 2
    # always 500: 2 attempts x (1 + 1 client retry) requests, then recorded
    assert server.calls[(texts[7], "segment")] == 4
    printed = capsys.readouterr()
    assert "episodes: 7" in printed.out and "malformed_json: 1" in printed.out and "api_error: 1" in printed.out
    assert_secret_nowhere(printed.out, printed.err, folder=tmp_path)

    # Re-running retries only the failed ids and keeps every finished episode untouched.
    before = out.read_text()
    with ChatServer() as server2:
        assert shard_main(llm_args(inp, out, server2.url, "--max-attempts", "1", "--max-retries", "0")) == 0
    assert out.read_text().startswith(before)
    seen = {p for p, _ in server2.calls}
    assert seen == {texts[5], texts[7], texts[9]}
    # --skip-failed: nothing is sent at all
    with ChatServer() as server3:
        assert shard_main(llm_args(inp, out, server3.url, "--skip-failed")) == 0
    assert not server3.calls


def test_a_200_that_is_not_a_chat_completion_is_that_problems_failure(tmp_path, monkeypatch):
    """An HTML page or truncated JSON with status 200: recorded as the problem's failure (bad_response) or retried,
    and the run goes on with the other problems."""
    monkeypatch.setenv("MEMRL_TEST_KEY", SECRET)
    texts = [BASE[0], BASE[1] + " [html-200]", BASE[2] + " [badjson-once]", BASE[3]]
    inp, out = tmp_path / "test.jsonl", tmp_path / "out.jsonl"
    write_gsm8k(inp, texts)
    with ChatServer() as server:
        rc = shard_main(llm_args(inp, out, server.url, "--max-retries", "0", "--max-attempts", "2"))
    assert rc == 0
    assert sorted(e["id"] for e in read_episodes(out)) == ["gsm8k-test-0", "gsm8k-test-2", "gsm8k-test-3"]
    (fail,) = map(json.loads, failures_path(out).read_text().splitlines())
    assert fail["id"] == "gsm8k-test-1" and fail["reason"] == "bad_response" and fail["attempts"] == 2
    assert "not a chat completion" in fail["detail"] and "502 Bad Gateway" in fail["detail"]
    assert server.calls[(texts[2], "verify")] == 2  # the broken JSON was one failed attempt, retried
    assert_secret_nowhere(folder=tmp_path)


def test_slow_server_fails_with_timeout_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMRL_TEST_KEY", SECRET)
    inp, out = tmp_path / "test.jsonl", tmp_path / "out.jsonl"
    write_gsm8k(inp, [BASE[0] + " [slow-always]"])
    with ChatServer() as server:
        assert shard_main(llm_args(inp, out, server.url, "--timeout", "0.3", "--max-retries", "0",
                                   "--max-attempts", "2")) == 0
    (fail,) = map(json.loads, failures_path(out).read_text().splitlines())
    assert fail["reason"] == "api_error" and "Timeout" in fail["detail"] and fail["attempts"] == 2
    assert read_episodes(out) == []


def test_missing_key_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MEMRL_TEST_KEY", raising=False)
    inp = tmp_path / "test.jsonl"
    write_gsm8k(inp, BASE[:1])
    with pytest.raises(ConfigError, match="MEMRL_TEST_KEY is not set"):
        shard_main(llm_args(inp, tmp_path / "o.jsonl", "http://127.0.0.1:9/v1"))


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path, monkeypatch):
    texts = [f"Case {chr(65 + i)} begins. {t}" for i, t in enumerate(BASE * 5)]  # 20 distinct problems
    inp = tmp_path / "test.jsonl"
    write_gsm8k(inp, texts)
    env = {**os.environ, "MEMRL_TEST_KEY": SECRET, "PYTHONPATH": str(REPO)}
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    monkeypatch.setenv("MEMRL_TEST_KEY", SECRET)
    with ChatServer() as server:  # an uninterrupted reference run, in process
        assert shard_main(llm_args(inp, ref, server.url, "--batch-size", "2")) == 0
    reference = read_episodes(ref)
    assert len(reference) == 20

    with ChatServer(delay=0.1) as server:
        cmd = [sys.executable, "-m", "data_tools.shard", *llm_args(inp, out, server.url, "--batch-size", "2",
                                                                   "--concurrency", "2")]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        partial = out.with_name(out.name + ".partial")
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if partial.exists() and partial.read_text().count("\n") >= 6:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed; slow the server down"
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    assert not out.exists()  # the final file appears only by rename at the end
    done_before = [json.loads(line) for line in partial.read_text().splitlines()]
    assert 6 <= len(done_before) < 20
    # a torn line (as a kill inside write() would leave) must be dropped, not trusted or glued onto
    with open(partial, "a") as f:
        f.write('{"id": "gsm8k-test-19", "question": "tor')

    with ChatServer() as server:
        proc = subprocess.run([sys.executable, "-m", "data_tools.shard",
                               *llm_args(inp, out, server.url, "--batch-size", "2")],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    final = read_episodes(out)  # validates every line; ids unique
    assert sorted(final, key=lambda e: e["id"]) == sorted(reference, key=lambda e: e["id"])
    assert final[: len(done_before)] == done_before  # finished work kept as it was
    resent = {p for p, _ in server.calls}
    assert not resent & {e["metadata"]["problem"] for e in done_before}  # finished ids were not re-sent
    assert "dropped incomplete/invalid lines from a killed run: 1" in proc.stdout
    assert not out.with_name(out.name + ".partial").exists()
    assert_secret_nowhere(proc.stdout, proc.stderr, err.decode(), folder=tmp_path)


# --- the local-checkpoint backend ------------------------------------------------------------------------
def fake_memrl(monkeypatch, truncate_marker: str = "[truncate]"):
    """Modules memrl.{tokenizer,hf_io,generate} that follow CONTRACT.md, answering like the server."""
    texts: list[str] = []
    seen = {}

    class Tokenizer:
        stop_ids = {0}
        vocab_size = 10**6
        pad_id = 0

        @classmethod
        def from_pretrained(cls, path):
            seen["tokenizer_path"] = path
            return cls()

        def encode_prompt(self, user_text):
            texts.append(user_text)
            return [len(texts) - 1 + 1000]

        def decode(self, ids):
            return "".join(texts[i - 1000] for i in ids)

    @dataclass
    class SamplingParams:
        max_new_tokens: int = 256
        temperature: float = 1.0
        top_p: float = 1.0
        top_k: int = 0
        greedy: bool = False
        stop_ids: frozenset = frozenset()
        n: int = 1
        seed: int | None = None

    @dataclass
    class Completion:
        prompt_index: int
        sample_index: int
        token_ids: list
        logprobs: list
        finish_reason: str

    class Generator:
        def __init__(self, model, vocab_size, kv_budget_tokens=None):
            seen["model"] = model

        def generate(self, prompts_, params):
            seen["params"] = params
            out = []
            for i, ids in enumerate(prompts_):
                flat = texts[ids[0] - 1000]
                # Recover the conversation's last problem from the flattened prompt, answer as the server.
                user = flat.rsplit("### Input\n", 1)[1].split("\n\n### Output", 1)[0]
                system = next(s for s in (prompts.SEGMENT_SYSTEM, prompts.VERIFY_SYSTEM, prompts.EXTRACT_SYSTEM)
                              if flat.startswith(s))
                _, reply, _ = canned_reply([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                           Counter())
                texts.append(reply)
                finish = "length" if truncate_marker in user else "stop"
                out.append(Completion(i, 0, [len(texts) - 1 + 1000] + ([0] if finish == "stop" else []),
                                      [0.0], finish))
            return out

    def load_model(path, dtype=None, device="cpu"):
        return ("model", path, dtype, device)

    pkg = types.ModuleType("memrl")
    mods = {"memrl": pkg}
    for name, attrs in {"tokenizer": {"Tokenizer": Tokenizer}, "hf_io": {"load_model": load_model},
                        "generate": {"Generator": Generator, "SamplingParams": SamplingParams}}.items():
        mod = types.ModuleType(f"memrl.{name}")
        mod.__dict__.update(attrs)
        setattr(pkg, name, mod)
        mods[f"memrl.{name}"] = mod
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return seen


def test_local_backend_through_generator_contract(monkeypatch, tmp_path):
    seen = fake_memrl(monkeypatch)
    backend = LocalGeneratorBackend(tmp_path / "ckpt", max_new_tokens=64, device="cpu")
    problems = [Problem(f"p{i}", t, str(i), {"problem": t}) for i, t in enumerate(BASE)]
    problems.append(Problem("cut", BASE[0] + " [truncate]", "0", {}))
    outcomes = {o.id: o for o in LLMSharder(backend, LLMShardConfig(max_attempts=2)).shard_many(problems)}
    assert seen["params"].greedy and seen["params"].stop_ids == frozenset({0}) and seen["params"].max_new_tokens == 64
    assert seen["model"][3] == "cpu"
    for i, text in enumerate(BASE):
        q, shards = rule_shard(text)
        ep = outcomes[f"p{i}"].episode
        assert (ep["question"], ep["shards"]) == (q, shards) and ep["metadata"]["model"] == "local:ckpt"
    assert outcomes["cut"].episode is None and outcomes["cut"].reason == "truncated_output"


def test_local_backend_real_generator_on_tiny_model(tmp_path):
    """With memrl's real generator and a random tiny checkpoint the replies are noise: every problem
    must come back as a recorded failure with a reason (never an invented episode, never lost)."""
    pytest.importorskip("memrl.generate")
    try:
        from tests.tiny import make_tiny_checkpoint
    except ImportError:
        try:
            from tiny import make_tiny_checkpoint
        except ImportError:
            pytest.skip("tests/tiny.py not available")
    try:
        ckpt = make_tiny_checkpoint(tmp_path / "tiny", "qwen2", max_position_embeddings=8192)
        backend = LocalGeneratorBackend(ckpt, max_new_tokens=8, device="cpu", dtype="float32")
    except (ImportError, NotImplementedError, AttributeError) as e:
        pytest.skip(f"memrl generator not ready: {e}")
    problems = [Problem(f"p{i}", t, "0", {}) for i, t in enumerate(BASE[:2])]
    outcomes = LLMSharder(backend, LLMShardConfig(max_attempts=1)).shard_many(problems)
    assert [o.id for o in outcomes] == ["p0", "p1"]
    for o in outcomes:
        assert o.episode is None and o.reason in {"malformed_json", "truncated_output", "invalid_output"}
