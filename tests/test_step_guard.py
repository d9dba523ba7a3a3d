"""The guarded optimizer step: an ordinary step is torch's AdamW step exactly; a non-finite loss or gradient leaves
weights and AdamW state bitwise as they were; a step that turns weights non-finite is undone from its copy (a fault
injected into optimizer.step, since AdamW with finite bounded inputs cannot produce one); k skipped steps in a row
stop the run."""
import copy

import pytest
import torch

from memrl.config import OptimCfg
from memrl.errors import TrainingError
from memrl.step_guard import SAFE_MAGNITUDE, StepGuard
from tests.test_algo import tiny_model


def setup(lr=1e-3, max_skipped=3):
    model = tiny_model(seed=3)
    cfg = OptimCfg(lr=lr, weight_decay=0.01)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    return model, opt, StepGuard(model, opt, cfg, max_skipped)


def backward(model, seed=0):
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(seed))
    loss = model(ids).float().logsumexp(-1).mean()
    loss.backward()
    return loss.item(), torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()


def snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def assert_same(a, b):
    (wa, sa), (wb, sb) = a, b
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert all(torch.equal(torch.as_tensor(sa["state"][i][k]), torch.as_tensor(sb["state"][i][k]))
                   for k in sa["state"][i])


def test_an_ordinary_step_is_adamw_exactly():
    model, opt, guard = setup()
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=0.01, eps=1e-8)
    for seed in range(3):
        loss, norm = backward(model, seed)
        backward(twin, seed)
        assert guard.step(loss, norm) is None
        twin_opt.step()
        opt.zero_grad(set_to_none=True)
        twin_opt.zero_grad(set_to_none=True)
        guard.end_of_step(seed + 1)
    assert_same(snapshot(model, opt), snapshot(twin, twin_opt))
    expected = max(p.detach().abs().max().item() for p in model.parameters())
    assert guard.max_abs == expected


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_a_non_finite_loss_or_gradient_changes_nothing(bad):
    model, opt, guard = setup()
    loss, norm = backward(model)
    guard.step(loss, norm)  # a first step, so that the AdamW state is not empty
    opt.zero_grad(set_to_none=True)
    before = snapshot(model, opt)
    loss, norm = backward(model, seed=1)
    why = guard.step(float("nan"), norm) if bad == "loss" else guard.step(loss, float("inf"))
    assert why is not None and ("loss" if bad == "loss" else "gradient") in why
    assert_same(snapshot(model, opt), before)
    assert all(p.grad is None for p in model.parameters())


def test_a_step_that_turns_weights_non_finite_is_undone():
    model, opt, guard = setup()
    loss, norm = backward(model)
    guard.step(loss, norm)
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():  # a weight near fp32's limit: the bound can no longer rule out an overflow
        model.lm_head.weight[0, 0] = SAFE_MAGNITUDE * 2
    guard.max_abs = guard.weights_max_abs()
    before = snapshot(model, opt)
    real_step = opt.step

    def faulty_step():  # the update goes through, then a fault corrupts a weight
        real_step()
        with torch.no_grad():
            model.model.norm.weight[0] = float("nan")

    opt.step = faulty_step
    for p in model.parameters():  # a forward through that weight would overflow: gradients set directly
        p.grad = torch.full_like(p, 1e-3)
    why = guard.step(1.0, 1.0)
    assert why is not None and "undone" in why
    assert_same(snapshot(model, opt), before)

    guard.max_abs = 1.0  # a small bound: no copy is taken, so the same fault is a TrainingError, not a silent NaN
    with torch.no_grad():
        model.lm_head.weight[0, 0] = 0.0
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    with pytest.raises(TrainingError, match="bug or a hardware fault"):
        guard.step(1.0, 1.0)


def test_k_skipped_steps_in_a_row_stop_the_run():
    model, opt, guard = setup(max_skipped=2)
    loss, norm = backward(model)
    guard.step(float("nan"), norm)
    guard.end_of_step(1)
    guard.step(loss, norm)  # an applied update resets the count
    opt.zero_grad(set_to_none=True)
    guard.end_of_step(2)
    guard.step(float("nan"), 1.0)
    guard.end_of_step(3)
    guard.step(1.0, float("nan"))
    with pytest.raises(TrainingError, match=r"max_skipped_steps=2: steps 3\.\.4 applied no update"):
        guard.end_of_step(4)


def test_non_finite_starting_weights_are_refused():
    model = tiny_model(seed=3)
    with torch.no_grad():
        model.lm_head.weight[1, 1] = float("inf")
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(TrainingError, match="starting weights"):
        StepGuard(model, opt, OptimCfg(), 3)
