"""Checkpoints: a save -> load round trip restores every piece of state bitwise; a crash mid-save is never resumed; a
corrupt checkpoint is named and skipped for the newest intact one; non-finite weights are never saved."""
import copy
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from memrl import hf_io
from memrl.checkpoint import (STATE_FILE, checkpoint_dir, latest_checkpoint, list_checkpoints, load_checkpoint,
                              load_first_intact, resolve_resume, save_checkpoint)
from memrl.config import preset
from memrl.errors import CheckpointError
from tests.test_algo import tiny_model

REPO = Path(__file__).resolve().parents[1]


def _setup(ckpt_dir):
    model = hf_io.load_model(ckpt_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    return model, opt, sched


def _train_step(model, opt, sched, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 12), generator=g)
    loss = model(ids).float().logsumexp(-1).mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def _draws():
    """One draw from every RNG stream a run uses."""
    return (torch.rand(3).tolist(), random.random(), np.random.rand(3).tolist(), torch.randn(2).tolist())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tied-embedding checkpoint written by hf_io (transformers-free; test_hf_io checks the format against it)."""
    return hf_io.save_model(tiny_model(seed=1, tied=True), tmp_path_factory.mktemp("tiny") / "ckpt")


def test_round_trip_is_bitwise(tmp_path, tiny):
    model, opt, sched = _setup(tiny)
    for s in range(3):
        _train_step(model, opt, sched, s)
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    cfg = preset("default")
    data_state = {"epoch": 2, "position": 48, "permutation_seed": 99}
    path = save_checkpoint(tmp_path, 3, model, opt, sched, data_state=data_state, config=cfg, keep_last=2,
                           extra={"best_eval": 0.5})
    assert path == checkpoint_dir(tmp_path, 3) and latest_checkpoint(tmp_path) == path
    expected_draws = _draws()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = copy.deepcopy(opt.state_dict())  # state_dict() aliases the live tensors
    sched_state = copy.deepcopy(sched.state_dict())
    _train_step(model, opt, sched, 10)  # what the uninterrupted run does next
    after_one_more = {k: v.clone() for k, v in model.state_dict().items()}

    # a fresh process's view: new model/optimizer, scrambled RNG, then resume
    model2, opt2, sched2 = _setup(tiny)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    state = load_checkpoint(resolve_resume(tmp_path, "latest"), model2, opt2, sched2)
    assert state["step"] == 3 and state["data"] == data_state and state["extra"] == {"best_eval": 0.5}
    assert state["config"] == cfg
    for k, v in model2.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for k, v in opt2.state_dict()["state"].items():
        for name, t in v.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(opt_state["state"][k][name])), (k, name)
    assert sched2.state_dict() == sched_state and sched2.last_epoch == 3
    assert _draws() == expected_draws  # every RNG stream continues where it was saved
    _train_step(model2, opt2, sched2, 10)
    for k, v in model2.state_dict().items():  # and training continues bitwise
        assert torch.equal(v, after_one_more[k]), k


def test_checkpoint_is_a_loadable_hf_model(tmp_path, tiny):
    model, opt, sched = _setup(tiny)
    path = save_checkpoint(tmp_path, 1, model, opt, sched)
    again = hf_io.load_model(path, dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 8))
    assert torch.equal(again(ids), model(ids))


def test_keep_last_and_listing(tmp_path, tiny):
    model, opt, sched = _setup(tiny)
    for step in (5, 10, 15, 20):
        save_checkpoint(tmp_path, step, model, opt, sched, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000015", "step_00000020"]
    assert resolve_resume(tmp_path, "") is None
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "nope"))


def test_incomplete_checkpoints_are_never_picked_up(tmp_path, tiny):
    model, opt, sched = _setup(tiny)
    good = save_checkpoint(tmp_path, 10, model, opt, sched)
    root = good.parent
    # a temp dir with everything in it (the crash came just before the rename), and a step dir without state
    tmp = root / ".tmp-step_00000020-12345"
    tmp.mkdir()
    (tmp / STATE_FILE).write_bytes(b"")
    (root / "step_00000030").mkdir()
    assert latest_checkpoint(tmp_path) == good
    assert resolve_resume(tmp_path, "latest") == good
    save_checkpoint(tmp_path, 11, model, opt, sched)
    assert not tmp.exists()  # the next save cleans the crash's leftovers


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path, tiny):
    # A real crash: the process dies (os._exit, no cleanup handlers) after writing everything, before os.replace.
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from memrl import checkpoint
        from tests.test_algo import tiny_model
        model = tiny_model(seed=1, tied=True)   # built directly: hf_io.load_model's first call imports torch._dynamo
        opt = torch.optim.AdamW(model.parameters())
        checkpoint.save_checkpoint({str(tmp_path)!r}, 1, model, opt)
        checkpoint._fsync_tree = lambda root: os._exit(3)   # die just before the rename
        checkpoint.save_checkpoint({str(tmp_path)!r}, 2, model, opt)
    """)
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    root = tmp_path / "checkpoints"
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".")]
    assert leftovers and all(STATE_FILE in os.listdir(root / n) for n in leftovers)  # fully written, not renamed
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    model, opt, _ = _setup(tiny)
    assert load_checkpoint(resolve_resume(tmp_path, "latest"), model, opt)["step"] == 1


def test_resume_at_another_world_size_is_refused(tmp_path, tiny):
    model, opt, sched = _setup(tiny)
    path = save_checkpoint(tmp_path, 1, model, opt, sched)
    state = torch.load(path / STATE_FILE, weights_only=True)
    assert state["world_size"] == 1  # recorded by every save
    state["world_size"] = 2  # as a 2-process (torchrun) run writes it
    torch.save(state, path / STATE_FILE)
    with pytest.raises(ValueError, match="resume at the same world size"):
        load_checkpoint(path, model, opt, sched)


@pytest.mark.parametrize("damage", ["empty state", "truncated state", "truncated weights", "weights gone"])
def test_a_corrupt_latest_checkpoint_is_skipped_for_the_newest_intact_one(tmp_path, tiny, damage):
    model, opt, sched = _setup(tiny)
    _train_step(model, opt, sched, 0)
    good = save_checkpoint(tmp_path, 1, model, opt, sched, data_state={"cursor": 1}, keep_last=3)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    _train_step(model, opt, sched, 1)
    bad = save_checkpoint(tmp_path, 2, model, opt, sched, data_state={"cursor": 2}, keep_last=3)
    victim = bad / (STATE_FILE if "state" in damage else "model.safetensors")
    if damage == "weights gone":
        victim.unlink()
    else:
        victim.write_bytes(b"" if damage == "empty state" else victim.read_bytes()[: victim.stat().st_size // 2])
    fresh, opt2, sched2 = _setup(tiny)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match=victim.name):  # a bad file is named, and changes nothing
        load_checkpoint(bad, fresh, opt2, sched2)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    skipped = []
    path, state = load_first_intact(list_checkpoints(tmp_path)[::-1], fresh, opt2, sched2, report=skipped.append)
    assert path == good and state["data"] == {"cursor": 1} and len(skipped) == 1 and victim.name in skipped[0]
    assert all(torch.equal(v, expected[k]) for k, v in fresh.state_dict().items())
    victim = good / STATE_FILE
    victim.write_bytes(b"")
    with pytest.raises(CheckpointError, match="none of the 2 checkpoint"):
        load_first_intact(list_checkpoints(tmp_path)[::-1], fresh, opt2, sched2, report=skipped.append)


def test_non_finite_weights_are_never_saved(tmp_path, tiny):
    model, opt, sched = _setup(tiny)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite weights"):
        save_checkpoint(tmp_path, 1, model, opt, sched)
    assert list_checkpoints(tmp_path) == [] and not any((tmp_path / "checkpoints").glob("*"))
