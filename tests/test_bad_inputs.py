"""Bad inputs to the three entry points, each run as a real subprocess: a non-zero exit, exactly one `error: ` line
on stderr naming the place (file:line, field or key), and no traceback.

Most cases fail before torch is imported (train.py checks its config, paths and episode files first), so a case
costs a Python start-up; the rest load a tiny model. The cases run concurrently (a worker per CPU core) the first
time any of them is asked for, then each test reads its result.

    python tests/test_bad_inputs.py                   # tally good / traceback / silent / vague / hang (issue 15)
    python tests/test_bad_inputs.py --repo OTHER_TREE # the same cases against another checkout (e.g. before a fix)
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "assets" / "synthetic-policy"
TIMEOUT_S = 300  # a case still running after this is a hang (generous: CI machines are slow and shared)
# a small real run of the default task: what the run-directory fixtures were saved with
SMALL = ["--train.batch_size=2", "--rollout.group_size=2", "--rollout.memory_cap_tokens=8",
         "--rollout.response_max_tokens=8", "--data.eval_limit=2", "--train.micro_batch_tokens=512",
         "--train.eval_at_start=false"]


# ----------------------------------------------------------------------------- input files

def episode(i: int) -> dict:
    return {"id": f"e{i}", "question": "How many coins?", "shards": [f"Ann has {i} coins."], "answer": str(i)}


def jsonl(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


GSM8K_ROW = {"question": "Tom has 3 pens. He buys 2 more. How many pens does he have?", "answer": "3 + 2\n#### 5"}


def files(**named: bytes | str) -> Callable[[Path, Path], None]:
    """A setup writing each keyword's bytes to the case's work dir (`__` in a name stands for `/`)."""
    def setup(work: Path, fx: Path) -> None:
        for name, data in named.items():
            path = work / name.replace("__", "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data.encode() if isinstance(data, str) else data)
    return setup


def copy_fixture(name: str, dest: str, edit: Callable[[Path], None] | None = None) -> Callable[[Path, Path], None]:
    def setup(work: Path, fx: Path) -> None:
        shutil.copytree(fx / name, work / dest)
        if edit is not None:
            edit(work / dest)
    return setup


def truncate(rel: str, keep: int) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / rel
        path.write_bytes(path.read_bytes()[:keep])
    return edit


def write(rel: str, data: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        (root / rel).write_text(data)
    return edit


def remove(*rels: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        for rel in rels:
            (root / rel).unlink()
    return edit


# ----------------------------------------------------------------------------- the cases

@dataclass
class Case:
    name: str
    entry: str  # train | evaluate | shard
    args: list[str]  # "{w}" = the case's own work dir (also its cwd), "{fx}" = the shared fixtures
    place: str  # the error line must contain this
    setup: Callable[[Path, Path], None] | None = None
    env: dict = field(default_factory=dict)
    succeeds_with: str = ""  # not an error: the run must succeed (exit 0) and print this
    too_late_if: str = ""  # output that shows the error came after work it should have preceded


GOOD_EPISODES = files(**{"eval.jsonl": jsonl(episode(1), episode(2))})
RUN = "--train.run_dir={w}/run"

CASES = [
    # --- train.py: config values
    Case("train-unknown-key", "train", ["--rollout.no_such_key=3"], "rollout.no_such_key"),
    Case("train-lr-inf", "train", ["--optim.lr=inf"], "optim.lr"),
    Case("train-lr-nan", "train", ["--optim.lr=nan"], "optim.lr"),
    Case("train-lr-huge", "train", ["--optim.lr=1e30"], "optim.lr"),
    Case("train-lr-text", "train", ["--optim.lr=fast"], "optim.lr"),
    Case("train-temperature-inf", "train", ["--rollout.temperature=inf"], "rollout.temperature"),
    Case("train-temperature-tiny", "train", ["--rollout.temperature=1e-30"], "rollout.temperature"),
    Case("train-kl-nan", "train", ["--algo.kl_coef=nan"], "algo.kl_coef"),
    Case("train-eps-high-inf", "train", ["--algo.eps_high=inf"], "algo.eps_high"),
    Case("train-grad-clip-inf", "train", ["--optim.grad_clip=inf"], "optim.grad_clip"),
    Case("train-top-p-nan", "train", ["--rollout.top_p=nan"], "rollout.top_p"),
    Case("train-clip-c-inf", "train", ["--algo.clip_c=inf"], "algo.clip_c"),
    Case("train-allow-unknown-key", "train", ["--train.allow_config_change=optim.nope"], "optim.nope"),
    Case("train-config-missing", "train", ["--config={w}/missing.json"], "missing.json"),
    Case("train-config-list", "train", ["--config={w}/list.json"], "list.json", files(**{"list.json": "[1, 2]\n"})),
    Case("train-config-bad-json", "train", ["--config={w}/bad.json"], "bad.json:2",
         files(**{"bad.json": '{"preset": "default",\n "model": }\n'})),
    # --- train.py: data
    Case("train-data-missing", "train", ["--data.train_path={w}/nope.jsonl", "--data.eval_path={w}/eval.jsonl"],
         "nope.jsonl", GOOD_EPISODES),
    Case("train-data-bad-json", "train", ["--data.train_path={w}/bad.jsonl", "--data.eval_path={w}/eval.jsonl"],
         "bad.jsonl:3", files(**{"bad.jsonl": jsonl(episode(1), episode(2), b'{"id": "e3", "question": ',
                                                    episode(4)), "eval.jsonl": jsonl(episode(1))})),
    Case("train-data-not-utf8", "train", ["--data.train_path={w}/latin.jsonl", "--data.eval_path={w}/eval.jsonl"],
         "latin.jsonl:2", files(**{"latin.jsonl": jsonl(episode(1), json.dumps(episode(2)).replace(
             "Ann", "Ren\u00e9e").encode("latin-1")), "eval.jsonl": jsonl(episode(1))})),
    Case("train-data-empty", "train", ["--data.train_path={w}/empty.jsonl", "--data.eval_path={w}/eval.jsonl"],
         "empty.jsonl", files(**{"empty.jsonl": b"", "eval.jsonl": jsonl(episode(1))})),
    Case("train-data-missing-field", "train", ["--data.train_path={w}/x.jsonl", "--data.eval_path={w}/eval.jsonl"],
         "x.jsonl:1", files(**{"x.jsonl": jsonl({"id": "a", "question": "q?", "answer": "1"}),
                               "eval.jsonl": jsonl(episode(1))})),
    Case("train-eval-bad-line", "train", ["--data.eval_path={w}/eval.jsonl"], "eval.jsonl:2",
         files(**{"eval.jsonl": jsonl(episode(1), {"id": "b", "question": "", "shards": ["x"], "answer": "1"})})),
    Case("train-eval-set-missing", "train", ["--data.train_path={w}/eval.jsonl"], "data.eval_path", GOOD_EPISODES),
    Case("train-noise-missing", "train", ["--data.noise_variant=mixed", "--data.noise_path={w}/wiki.txt"],
         "wiki.txt"),
    # --- train.py: model
    Case("train-model-not-there", "train", ["--model.path=runs/nothere"], "runs/nothere"),
    Case("train-model-no-config", "train", ["--model.path={w}/ckpt"], "config.json",
         copy_fixture("tiny", "ckpt", remove("config.json"))),
    Case("train-model-config-list", "train", ["--model.path={w}/ckpt"], "config.json",
         copy_fixture("tiny", "ckpt", write("config.json", "[]\n"))),
    Case("train-model-truncated", "train", ["--model.path={w}/ckpt"], "model.safetensors",
         copy_fixture("tiny", "ckpt", truncate("model.safetensors", 4000))),
    Case("train-model-no-weights", "train", ["--model.path={w}/ckpt"], "model.safetensors",
         copy_fixture("tiny", "ckpt", remove("model.safetensors"))),
    Case("train-tokenizer-no-vocab", "train", ["--model.path={w}/ckpt"], "tokenizer",
         copy_fixture("tiny", "ckpt", remove("tokenizer.json"))),
    Case("train-ref-not-there", "train", ["--model.ref_path={w}/nothere", "--algo.kl_coef=0.01"], "nothere"),
    # --- train.py: run directory and --resume
    Case("train-resume-nothing", "train", [*SMALL, RUN, "--train.max_steps=1", "--resume"], "run",
         files(**{"run__metrics.jsonl": '{"step": 1, "kind": "train"}\n'})),
    Case("train-resume-changed-config", "train", [*SMALL, RUN, "--train.max_steps=1", "--resume", "--optim.lr=1e-3"],
         "optim.lr", copy_fixture("run", "run")),
    Case("train-resume-not-a-checkpoint", "train", [*SMALL, RUN, "--resume={w}/elsewhere"], "elsewhere",
         files(**{"elsewhere__config.json": "{}"})),
    Case("train-fresh-over-a-run", "train", [*SMALL, RUN, "--train.max_steps=1"], "run", copy_fixture("run", "run")),
    # --- evaluate.py
    Case("eval-checkpoint-not-there", "evaluate", ["--checkpoint=runs/nothere"], "runs/nothere"),
    Case("eval-checkpoint-empty-dir", "evaluate", ["--checkpoint={w}/empty"], "empty",
         files(**{"empty__notes.txt": "x"})),
    Case("eval-second-checkpoint-missing", "evaluate", [f"--checkpoint=a={POLICY}", "--checkpoint=b={w}/missing"],
         "missing", too_late_if="a on "),  # checked before checkpoint a is evaluated
    Case("eval-checkpoint-config-list", "evaluate", ["--checkpoint={w}/ckpt"], "config.json",
         copy_fixture("tiny", "ckpt", write("config.json", "[]\n"))),
    Case("eval-run-config-list", "evaluate", ["--checkpoint={w}/run"], "run_config.json",
         copy_fixture("run", "run", write("checkpoints/step_00000001/run_config.json", "[]\n"))),
    Case("eval-dataset-missing", "evaluate", ["--dataset=x={w}/nope.jsonl"], "nope.jsonl"),
    Case("eval-dataset-syntax", "evaluate", ["--dataset=nope.jsonl"], "--dataset"),
    Case("eval-dataset-bad-json", "evaluate", ["--dataset=x={w}/x.jsonl"], "x.jsonl:2",
         files(**{"x.jsonl": jsonl(episode(1), b"{oops}")})),
    Case("eval-dataset-not-utf8", "evaluate", ["--dataset=x={w}/x.jsonl"], "x.jsonl:1",
         files(**{"x.jsonl": b'{"id": "\xff"}\n'})),
    Case("eval-dataset-empty", "evaluate", ["--dataset=x={w}/x.jsonl"], "x.jsonl", files(**{"x.jsonl": b"\n"})),
    Case("eval-conditions", "evaluate", ["--conditions=memory,recall"], "--conditions"),
    Case("eval-batch-size-text", "evaluate", ["--batch_size=many"], "--batch_size"),
    Case("eval-batch-size-zero", "evaluate", ["--batch_size=0"], "--batch_size"),
    Case("eval-temperature-inf", "evaluate", ["--rollout.temperature=inf"], "rollout.temperature"),
    Case("eval-unknown-key", "evaluate", ["--no_such=1"], "no_such"),
    Case("eval-out-is-a-dir", "evaluate", ["--out={w}/outdir"], "outdir", files(**{"outdir__keep": "x"})),
    Case("eval-plot-missing", "evaluate", ["--plot", "{w}/metrics.jsonl"], "metrics.jsonl"),
    Case("eval-plot-bad-line", "evaluate", ["--plot", "{w}/metrics.jsonl"], "metrics.jsonl:2",
         files(**{"metrics.jsonl": '{"step": 1, "kind": "train", "reward": 0.5}\nnot json\n'
                                   '{"step": 2, "kind": "train", "reward": 0.5}\n'})),
    # --- python -m data_tools.shard
    Case("shard-input-missing", "shard", ["--input", "{w}/nope.jsonl"], "nope.jsonl"),
    Case("shard-input-empty", "shard", ["--input", "{w}/in.jsonl"], "in.jsonl", files(**{"in.jsonl": b""})),
    Case("shard-input-not-utf8", "shard", ["--input", "{w}/in.jsonl"], "in.jsonl:2",
         files(**{"in.jsonl": jsonl(GSM8K_ROW, b'{"question": "Ren\xe9e has 3 pens?", "answer": "#### 3"}')})),
    Case("shard-input-bad-json", "shard", ["--input", "{w}/in.jsonl"], "in.jsonl:2",
         files(**{"in.jsonl": jsonl(GSM8K_ROW, b"{")})),
    Case("shard-input-missing-field", "shard", ["--input", "{w}/in.jsonl"], "question",
         files(**{"in.jsonl": jsonl({"answer": "#### 3"})})),
    Case("shard-input-no-answer-marker", "shard", ["--input", "{w}/in.jsonl"], "answer",
         files(**{"in.jsonl": jsonl({"question": "How many?", "answer": "3"})})),
    Case("shard-wrong-dataset", "shard", ["--input", "{w}/in.jsonl", "--dataset", "math500"], "problem",
         files(**{"in.jsonl": jsonl(GSM8K_ROW)})),
    Case("shard-out-is-a-dir", "shard", ["--input", "{w}/in.jsonl", "--out", "{w}/outdir"], "outdir",
         files(**{"in.jsonl": jsonl(GSM8K_ROW), "outdir__keep": "x"})),
    Case("shard-out-corrupt", "shard", ["--input", "{w}/in.jsonl", "--out", "{w}/out.jsonl"], "out.jsonl:1",
         files(**{"in.jsonl": jsonl(GSM8K_ROW), "out.jsonl": "garbage\n"})),
    Case("shard-llm-no-url", "shard", ["--input", "{w}/in.jsonl", "--method", "llm", "--model", "m"], "--base-url",
         files(**{"in.jsonl": jsonl(GSM8K_ROW)})),
    Case("shard-limit-negative", "shard", ["--input", "{w}/in.jsonl", "--limit", "-1"], "--limit",
         files(**{"in.jsonl": jsonl(GSM8K_ROW)})),
    Case("shard-batch-size-zero", "shard", ["--input", "{w}/in.jsonl", "--batch-size", "0"], "--batch-size",
         files(**{"in.jsonl": jsonl(GSM8K_ROW)})),
    Case("shard-max-shards-zero", "shard", ["--input", "{w}/in.jsonl", "--max-shards", "0"], "--max-shards",
         files(**{"in.jsonl": jsonl(GSM8K_ROW)})),
    Case("shard-concurrency-zero", "shard", ["--input", "{w}/in.jsonl", "--method", "llm", "--base-url",
                                             "http://127.0.0.1:9/v1", "--model", "m", "--api-key-env", "",
                                             "--concurrency", "0"], "--concurrency",
         files(**{"in.jsonl": jsonl(GSM8K_ROW)})),
    Case("shard-timeout-nan", "shard", ["--input", "{w}/in.jsonl", "--method", "llm", "--base-url",
                                        "http://127.0.0.1:9/v1", "--model", "m", "--api-key-env", "",
                                        "--timeout", "nan"], "--timeout", files(**{"in.jsonl": jsonl(GSM8K_ROW)})),
    Case("shard-local-model-not-there", "shard", ["--input", "{w}/in.jsonl", "--method", "llm", "--local-model",
                                                  "runs/nothere"], "runs/nothere",
         files(**{"in.jsonl": jsonl(GSM8K_ROW)})),
    Case("shard-missing-input-flag", "shard", ["--dataset", "gsm8k"], "--input"),
]


def corrupt_newest(root: Path) -> None:
    """A second checkpoint whose trainer_state.pt is empty, as a disk that filled up mid-save can leave it."""
    good = root / "checkpoints" / "step_00000001"
    bad = shutil.copytree(good, root / "checkpoints" / "step_00000002")
    (bad / "trainer_state.pt").write_bytes(b"")


def tear_metrics(root: Path) -> None:
    with open(root / "metrics.jsonl", "a") as f:
        f.write('{"step": 1, "kind": "ev')  # a kill in the middle of a write


def huge_problem(work: Path, fx: Path) -> None:
    """One 5.4 MB GSM8K-style problem: a sharder must refuse or bound it in linear time, never hang."""
    unit = "Natalia sold 48 clips in April.\n\nShe sold half as many in May. Let \\[ x = 2. "
    text = unit * (5_400_000 // len(unit)) + "How many clips did she sell?"
    (work / "in.jsonl").write_text(json.dumps({"question": text, "answer": "#### 72"}) + "\n")


# Not errors: what must work (exit 0) where the code used to fail or hang
BEHAVIOUR = [
    Case("train-resume-corrupt-latest", "train", [*SMALL, RUN, "--train.max_steps=2", "--resume"], "",
         copy_fixture("run", "run", corrupt_newest), succeeds_with="skipping checkpoint"),
    Case("train-resume-torn-metrics", "train", [*SMALL, RUN, "--train.max_steps=2", "--resume"], "",
         copy_fixture("run", "run", tear_metrics), succeeds_with="dropped a torn last line"),
    Case("shard-huge-problem", "shard", ["--input", "{w}/in.jsonl"], "", huge_problem, succeeds_with="too_long: 1"),
]
SHARD_DEFAULTS = {"--dataset": "gsm8k", "--method": "rule", "--out": "{w}/out.jsonl", "--input": None}


# ----------------------------------------------------------------------------- running and judging

# Settings that keep a run short should a case NOT be refused (a fix undone, or another checkout under --repo): it
# then ends quickly as "silent" instead of training for minutes. The case's own arguments come last and win.
TRAIN_SHORT = [*SMALL, RUN, "--train.max_steps=1"]
EVAL_SHORT = ["--data.eval_limit=2", "--conditions=memory"]


def command(case: Case, repo: Path, work: Path, fx: Path) -> list[str]:
    args = list(case.args)
    if case.entry == "shard" and case.name != "shard-missing-input-flag":
        args += [x for k, v in SHARD_DEFAULTS.items() if v is not None and k not in args for x in (k, v)]
    elif case.entry == "train" and "--resume" not in " ".join(args) and not case.name.startswith("train-fresh"):
        args = TRAIN_SHORT + args
    elif case.entry == "evaluate" and "--plot" not in args:
        args = EVAL_SHORT + args
    args = [a.replace("{w}", str(work)).replace("{fx}", str(fx)) for a in args]
    if case.entry == "shard":
        return [sys.executable, "-m", "data_tools.shard", *args]
    return [sys.executable, str(repo / f"{case.entry}.py"), *args]


def judge(returncode: int | None, stdout: str, stderr: str, case: Case) -> str:
    """good | traceback | silent | vague | late | hang (| failed, for a behaviour case), as issue 15 counts them."""
    if returncode is None:
        return "hang"
    if "Traceback (most recent call last)" in stderr:
        return "traceback"
    if case.succeeds_with:
        return "good" if returncode == 0 and case.succeeds_with in stdout + stderr else "failed"
    place = case.place
    if returncode == 0:
        return "silent"
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    if case.too_late_if and case.too_late_if in stdout + stderr:
        return "late"
    return "good" if len(lines) == 1 and place in lines[0] else "vague"


def run_case(case: Case, repo: Path, root: Path, fx: Path) -> dict:
    work = root / case.name
    work.mkdir(parents=True)
    (work / "runs").mkdir()  # a local runs/ folder: "runs/nothere" is a local path, not a hub id
    if case.setup is not None:
        case.setup(work, fx)
    env = {**os.environ, "PYTHONPATH": str(repo), "MEMRL_KERNELS": "torch", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **case.env}
    env.pop("MEMRL_DEBUG", None)
    t0 = time.time()
    try:
        proc = subprocess.run(command(case, repo, work, fx), cwd=work, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = None, str(e.stdout or ""), str(e.stderr or "")
    return {"verdict": judge(rc, out, err, case), "rc": rc, "stdout": out, "stderr": err,
            "seconds": round(time.time() - t0, 1)}


def build_fixtures(fx: Path, repo: Path = REPO) -> Path:
    """fx/tiny: a tiny random checkpoint; fx/run: a run directory of the default task (SMALL settings,
    max_steps=1) with one complete checkpoint at step 1, as train.py writes it. For another checkout (--repo), its
    own code writes them, in a subprocess (its config files must be the ones it reads)."""
    if repo != REPO:
        subprocess.run([sys.executable, __file__, "--build-fixtures", str(fx), "--repo", str(repo)], check=True,
                       env={**os.environ, "PYTHONPATH": str(repo)}, cwd=repo, capture_output=True)
        return fx
    import torch

    from memrl import hf_io
    from memrl.checkpoint import save_checkpoint
    from memrl.config import parse_cli, save_config
    from tests.tiny import make_tiny_checkpoint

    make_tiny_checkpoint(fx / "tiny", "qwen2")
    run = fx / "run"
    cfg = parse_cli([*SMALL, f"--train.run_dir={run}", "--train.max_steps=1"])
    model = hf_io.load_model(POLICY, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    save_checkpoint(run, 1, model, optimizer, scheduler, data_state={"cursor": 2}, config=cfg,
                    tokenizer_dir=POLICY)
    save_config(cfg, run / "run_config.json")
    (run / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "reward": 0.5}\n')
    return fx


def run_all(cases: list[Case], repo: Path, root: Path, fx: Path) -> dict[str, dict]:
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda c: run_case(c, repo, root, fx), cases)
        return {c.name: r for c, r in zip(cases, results)}


# ----------------------------------------------------------------------------- pytest

@pytest.fixture(scope="module")
def results(request, tmp_path_factory) -> dict[str, dict]:
    """Every selected case, run concurrently once."""
    wanted = {item.callspec.params["case"].name for item in request.session.items
              if hasattr(item, "callspec") and "case" in item.callspec.params}
    fx = build_fixtures(tmp_path_factory.mktemp("fixtures"))
    return run_all([c for c in CASES + BEHAVIOUR if c.name in wanted], REPO, tmp_path_factory.mktemp("cases"), fx)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, results: dict[str, dict]):
    r = results[case.name]
    assert r["verdict"] == "good", (f"{case.entry} {case.args}: {r['verdict']} (exit {r['rc']}, expected one "
                                    f"'error: ' line naming {case.place!r})\n--- stderr:\n{r['stderr'][-3000:]}")


@pytest.mark.parametrize("case", BEHAVIOUR, ids=[c.name for c in BEHAVIOUR])
def test_what_used_to_fail_now_works(case: Case, results: dict[str, dict]):
    r = results[case.name]
    assert r["verdict"] == "good", (f"{case.entry} {case.args}: {r['verdict']} (exit {r['rc']}, expected exit 0 "
                                    f"and {case.succeeds_with!r})\n--- stdout:\n{r['stdout'][-2000:]}\n"
                                    f"--- stderr:\n{r['stderr'][-3000:]}")


def test_debug_shows_the_traceback(tmp_path):
    """--debug (or MEMRL_DEBUG=1) keeps Python's traceback for a known error, for a bug report."""
    for extra, env in ((["--debug"], {}), ([], {"MEMRL_DEBUG": "1"})):
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--optim.lr=inf", *extra], cwd=tmp_path,
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=TIMEOUT_S)
        assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr
        assert "ConfigError: --optim.lr: must be in (0, 1], got inf" in proc.stderr


def test_there_are_enough_kinds():
    assert len({c.name for c in CASES}) == len(CASES) >= 30
    assert {c.entry for c in CASES} == {"train", "evaluate", "shard"}


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose entry points are run")
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument("--build-fixtures", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_fixtures:  # in a subprocess, with --repo's code first on the path
        sys.path.insert(0, str(args.repo.resolve()))
        sys.path.insert(1, str(REPO))
        build_fixtures(args.build_fixtures)
        sys.exit(0)
    sys.path.insert(0, str(REPO))
    picked = [c for c in CASES + BEHAVIOUR if not args.only or c.name in args.only.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        fx = build_fixtures(Path(tmp) / "fixtures", args.repo.resolve())
        t0 = time.time()
        res = run_all(picked, args.repo.resolve(), Path(tmp) / "cases", fx)
        wall = time.time() - t0
    for c in picked:
        r = res[c.name]
        last = next((ln for ln in reversed(r["stderr"].splitlines()) if ln.strip()), "")
        print(f"{r['verdict']:9s} {r['seconds']:6.1f}s {c.name:34s} {last[:150]}")
    tally = Counter(res[c.name]["verdict"] for c in picked)
    print(f"\n{len(picked)} cases in {wall:.0f} s: " + ", ".join(f"{k} {v}" for k, v in tally.most_common()))
