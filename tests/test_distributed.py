"""train.py under torchrun on CPU (gloo, FSDP2): 2 processes x half the batch == 1 process x the whole batch, and a
2-process resume continues exactly.

Why the comparison holds: rollout seeds derive from global episode ids (not the rank or the slice position), the
loss divides by the global response-token count and FSDP sums (not averages) the ranks' gradients, so the update
of N ranks equals the single-process one up to fp32 summation order (micro-batch packing and the reduce-scatter
add the same terms in another order).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "assets" / "synthetic-policy"  # a real starting policy: mixed rewards, so a non-zero update
TIMING = ("_s", "_per_s")  # wall-clock fields differ between runs; everything else is compared
# 4 problems (2 per rank) x 4 samples, KL on (the reference is sharded too); the data file puts long problems on
# rank 0 and short ones on rank 1, so the ranks pack different numbers of micro-batches (the dummy-pass path).
# adam_eps 1e-5: Adam's first update is lr·g/(|g| + eps), which for entries with |g| near 1e-9 (sums that nearly
# cancel) turns the fp32 rounding of g into a visible fraction of lr; a larger eps keeps the update's sensitivity to
# g bounded (1/eps), so comparing weights compares the summed gradients, which is what this file tests.
ARGS = ["--train.batch_size=4", "--rollout.group_size=8", "--data.eval_limit=4", "--train.eval_every=1", "--train.save_every=1",
        "--algo.kl_coef=0.01", "--train.micro_batch_tokens=1024", "--train.keep_last=3", "--data.shuffle=false",
        "--optim.adam_eps=1e-5", "--algo.mini_batches=2"]  # per mini-batch, a rank may hold 0, 1 or 2 problems

pytestmark = pytest.mark.skipif(not (POLICY / "config.json").is_file(), reason="assets/synthetic-policy not built")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def episodes_file(out: Path) -> Path:
    """8 coin-sum problems; each step's first two (rank 0's slice) have 4 shards, the last two (rank 1's) 1."""
    from memrl import synthetic

    pool = synthetic.make_episodes(64, "train", seed=5, task=synthetic.CoinSum(num_asked=(1, 3), num_distractors=(0, 1)))
    long, short = [e for e in pool if len(e.shards) == 4], [e for e in pool if len(e.shards) == 1]
    eps = long[:2] + short[:2] + long[2:4] + short[2:4]
    out.write_text("".join(json.dumps(e.to_json()) + "\n" for e in eps))
    return out


def train(nproc: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, MEMRL_KERNELS="torch", OMP_NUM_THREADS="1")
    launcher = [sys.executable, "train.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "train.py"]
    proc = subprocess.run([*launcher, *ARGS, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{nproc} process(es), {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def rows(run_dir: Path) -> list[dict]:
    out = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(TIMING)} for r in out]


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    """Training data, and its first data.eval_limit episodes as the held-out set (train.py wants an eval set of the
    same task)."""
    path = episodes_file(tmp_path_factory.mktemp('data') / 'train.jsonl')
    return [f"--data.train_path={path}", f"--data.eval_path={path}"]


@pytest.fixture(scope="module")
def one_step_on_two(tmp_path_factory, data) -> Path:
    run_dir = tmp_path_factory.mktemp("two") / "run"
    train(2, *data, f"--train.run_dir={run_dir}", "--train.max_steps=1")
    return run_dir


def test_two_processes_equal_one_process(one_step_on_two, data, tmp_path):
    single = tmp_path / "one"
    train(1, *data, f"--train.run_dir={single}", "--train.max_steps=1")
    a, b = rows(single), rows(one_step_on_two)
    step_a, step_b = a[1], b[1]
    assert step_a["kind"] == step_b["kind"] == "train"
    assert step_a["world_size"] == 1 and step_b["world_size"] == 2
    # the rollouts are the same trajectories: same seeds per (step, episode, turn, sample), same weights
    for k in ("accuracy", "reward", "response_tokens", "trajectories", "rollout_new_tokens", "train_tokens",
              "score_tokens", "memory_tokens", "answer_tokens"):
        assert step_a[k] == step_b[k], k
    assert step_b["dummy_micro_batches"] > 0  # the ranks packed different counts: the padding path ran
    for k in ("loss", "kl", "entropy", "pg_clipfrac", "grad_norm"):
        assert step_a[k] == pytest.approx(step_b[k], rel=1e-5, abs=1e-9), k
    assert a[0]["accuracy/memory"] == b[0]["accuracy/memory"]  # eval: 2 slices of 2 == 4 episodes on one rank

    start = load_file(str(POLICY / "model.safetensors"))
    wa, wb = weights(single, 1), weights(one_step_on_two, 1)
    assert wa.keys() == wb.keys() == start.keys()  # one full HF checkpoint, not shards
    moved = max((wa[k] - start[k]).abs().max().item() for k in wa)
    assert moved > 1e-5  # the step did update the weights (else the comparison below would be vacuous)
    for k in wa:  # fp32 rounding of a different summation order: ~1e-7 relative to the weights' scale
        assert (wa[k] - wb[k]).abs().max().item() <= 1e-6 * max(1.0, start[k].abs().max().item()), k
    update_a = torch.cat([(wa[k] - start[k]).flatten() for k in wa])
    update_b = torch.cat([(wb[k] - start[k]).flatten() for k in wa])
    assert (update_a - update_b).norm() <= 1e-3 * update_a.norm()  # the same update, not merely small weights'


def test_resume_on_two_processes_is_exact(one_step_on_two, data, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    shutil.copytree(one_step_on_two, parts)  # 1 step, checkpointed at step 1
    train(2, *data, f"--train.run_dir={whole}", "--train.max_steps=2")
    out = train(2, *data, f"--train.run_dir={parts}", "--train.max_steps=2", "--resume")
    assert "resumed from" in out.stdout
    state = torch.load(parts / "checkpoints" / "step_00000002" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng_per_rank"]) == 2
    assert rows(whole) == rows(parts)  # every logged number, bit for bit
    wa, wb = weights(whole, 2), weights(parts, 2)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # CPU fp32: bitwise

    # another world size is refused with a clear message (rank 0 would slice the data differently)
    bad = train(1, *data, f"--train.run_dir={parts}", "--train.max_steps=3", "--resume", check=False)
    assert bad.returncode != 0 and "resume at the same world size" in bad.stderr


# ----------------------------------------------------------------------------- bf16 compute over fp32 masters

def test_bf16_compute_keeps_fp32_masters_and_resumes_bitwise(data, tmp_path):
    """--model.dtype=bfloat16 on ONE process: FSDP2 over a single-rank group (the multi-GPU code path). The masters
    are fp32 (in trainer_state.pt), the HF export is them cast to bf16, and a resume continues bit for bit."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    bf16 = ["--model.dtype=bfloat16", "--train.eval_at_start=false"]
    train(1, *data, *bf16, f"--train.run_dir={whole}", "--train.max_steps=2")
    train(1, *data, *bf16, f"--train.run_dir={parts}", "--train.max_steps=1")
    out = train(1, *data, *bf16, f"--train.run_dir={parts}", "--train.max_steps=2", "--resume")
    assert "resumed from" in out.stdout and "fp32 masters" in out.stdout
    assert rows(whole) == rows(parts)  # every logged number, bit for bit
    assert rows(whole)[0]["kind"] == "train"  # eval_at_start=false: no step-0 evaluation
    for step in (1, 2):
        state = torch.load(whole / "checkpoints" / f"step_{step:08d}" / "trainer_state.pt", weights_only=True)
        masters, export = state["master_weights"], weights(whole, step)
        assert all(v.dtype == torch.float32 for v in masters.values())
        assert export.keys() == masters.keys()
        assert all(export[k].dtype == torch.bfloat16 and torch.equal(export[k], masters[k].bfloat16())
                   for k in export)
    ma = torch.load(whole / "checkpoints" / "step_00000002" / "trainer_state.pt", weights_only=True)["master_weights"]
    mb = torch.load(parts / "checkpoints" / "step_00000002" / "trainer_state.pt", weights_only=True)["master_weights"]
    assert all(torch.equal(ma[k], mb[k]) for k in ma)  # the fp32 masters themselves, not only their bf16 rounding
    start = load_file(str(POLICY / "model.safetensors"))
    assert any(not torch.equal(ma[k], start[k].float()) for k in ma)  # the run did train


@pytest.fixture
def single_rank_group():
    """A one-process gloo group (what train.py starts for a bf16 run on one GPU), destroyed afterwards."""
    import torch.distributed as dist

    from memrl.distributed import init_distributed, shutdown

    assert not dist.is_initialized()
    init_distributed("cpu", single_rank_group=True)
    yield
    shutdown()


def _sharded_policy(tmp_path):
    from memrl.distributed import shard_model
    from memrl.hf_io import load_model
    from tests.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "policy", "qwen2", tied=True)
    model = load_model(path, dtype=torch.float32)
    return shard_model(model, torch.bfloat16)


def test_tiny_update_changes_the_fp32_master(single_rank_group, tmp_path):
    """An lr-1e-6 AdamW step (|update| ~ 1e-6, far below bf16's resolution at |w| ~ 0.1: 2^-11 ~ 5e-4) moves the
    fp32 master; the same step on bf16 weights rounds away entirely."""
    model = _sharded_policy(tmp_path)
    params = list(model.parameters())
    assert all(p.dtype == torch.float32 for p in params)  # sharded masters
    before = [p.detach().full_tensor().clone() for p in params]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    logits = model(torch.arange(6).view(1, 6))
    assert logits.dtype == torch.bfloat16  # the compute copy
    logits.float().logsumexp(-1).sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in params)
    opt.step()
    after = [p.detach().full_tensor() for p in params]
    w, new = before[0], after[0]  # the embedding (tied lm_head): every entry gets a gradient
    big = w.abs() > 0.01  # bf16 spacing there >= 2^-14 ~ 6e-5, so a half-spacing rounding eats a 1e-6 step
    assert big.float().mean() > 0.5
    delta = new - w
    assert (delta[big] != 0).float().mean() > 0.9 and delta.abs().max() < 2e-6  # the fp32 masters moved, by ~lr
    bf16_step = w.bfloat16() + delta.bfloat16()  # the same update applied to bf16 weights
    assert torch.equal(bf16_step[big], w.bfloat16()[big])  # ... is rounded away, every entry


def test_rollout_view_keeps_its_tensors_and_holds_the_new_weights(single_rank_group, tmp_path):
    """The generator's view: the same parameter objects at the same addresses across steps (the generator keys its
    CUDA graphs on the weights' data_ptr), holding the freshly updated weights in the compute dtype."""
    from memrl.distributed import gathered_for_rollout, rollout_view
    from memrl.generate import Generator, SamplingParams

    model = _sharded_policy(tmp_path)
    view = rollout_view(model)
    with gathered_for_rollout(model, view) as m:
        assert m is view
        gen = Generator(view, 200)
        ids = [(id(p), p.data_ptr()) for p in view.parameters()]
        assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in view.parameters())
        params = SamplingParams(max_new_tokens=4, greedy=True)
        gen.generate([[1, 2, 3]], params)
    layout, state = gen.runner._layout_key, gen.runner.state
    masters = dict(model.named_parameters())
    first = {name: p.clone() for name, p in view.named_parameters()}
    for name, p in view.named_parameters():
        assert torch.equal(p, masters[name].full_tensor().bfloat16()), name

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # large: the bf16 copies must change visibly
    model(torch.arange(6).view(1, 6)).float().logsumexp(-1).sum().backward()
    opt.step()
    model.reshard()
    with gathered_for_rollout(model, view):
        assert [(id(p), p.data_ptr()) for p in view.parameters()] == ids  # same tensors, same storage
        gen.generate([[1, 2, 3]], params)
    assert gen.runner._layout_key == layout and gen.runner.state is state  # the layout kept (no re-capture on GPU)
    masters = dict(model.named_parameters())
    changed = 0
    for name, p in view.named_parameters():
        new = masters[name].full_tensor().bfloat16()
        assert torch.equal(p, new), name  # the updated weights
        changed += not torch.equal(new, first[name])
    assert changed == len(first)  # every tensor moved, and the view followed
