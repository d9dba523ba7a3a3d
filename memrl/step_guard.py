"""The optimizer step that never leaves non-finite weights, and the stop after too many skipped steps in a row.

    guard = StepGuard(policy, optimizer, cfg.optim, cfg.train.max_skipped_steps)
    problem = guard.step(loss_sum, grad_norm)   # None: stepped; else why the update was skipped (weights untouched)
    guard.end_of_step(step)                     # TrainingError after max_skipped_steps steps in a row with no update

What is checked, and why it is cheap:
1. Before the step: the loss and the global gradient norm (already computed for clipping) must be finite. A NaN
   anywhere in the gradient makes the norm NaN, so this one number covers every element. Else: skip.
2. The step itself cannot overflow when its inputs are finite. AdamW moves a weight by
       Δw = -lr·(wd·w + m̂ / (√v̂ + ε))          (Loshchilov & Hutter, Algorithm 2)
   where m̂ is a weighted average of past gradients (Kingma & Ba, Algorithm 1 and §3), so |m̂| <= max |g| <= the
   clip norm, and √v̂ + ε >= ε. Hence |w_new| <= |w| + lr·grad_clip/ε (lr·wd <= 1: the decay only shrinks w).
   With the config's ranges (memrl/config.py: lr <= 1, grad_clip <= 1e6, ε >= 1e-20) that is |w| + 1e26: the step is
   finite unless a weight is already near fp32's limit (3.4e38). So no copy is needed for an ordinary step.
3. After the step: one fused max-|w| reduction over the local shards (torch._foreach_norm, ord=inf: one
   memory-bound read of this rank's weights, small next to the step's own reads of weights, moments and grads),
   NaN counted as inf, max-reduced over ranks so that every rank takes the same decision. It verifies the step and gives the |w| the next step's bound (2) starts from.
4. Only when (2) cannot rule out an overflow (|w| + lr·grad_clip/ε > 1e37) is a copy of the weights and the AdamW
   state taken before the step; if (3) then finds a non-finite weight, the copy is put back: the step is undone
   and reported as skipped. A failure of (3) without a copy means the arithmetic above was broken (a bug or a
   hardware fault): a TrainingError, never a checkpoint of NaNs.
A step of train.py counts as skipped when none of its updates was applied; after `max_skipped_steps` such steps
in a row the run stops with a TrainingError instead of training on.
"""
from __future__ import annotations

import math

import torch

from memrl.distributed import all_reduce_max
from memrl.errors import TrainingError

SAFE_MAGNITUDE = 1e37  # below fp32's largest value (3.4e38) with room for one more bounded step


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor; the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


class StepGuard:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, optim_cfg, max_skipped: int):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.cfg, self.max_skipped = optimizer, optim_cfg, max_skipped
        self.device = self.params[0].device
        self.max_abs = self.weights_max_abs()  # |w| of the weights the next step starts from
        if not math.isfinite(self.max_abs):
            raise TrainingError("the starting weights hold non-finite values (inf or nan): nothing to train from")
        self.skipped_in_a_row, self.applied_this_step, self.last_problem = 0, False, ""

    @torch.no_grad()
    def weights_max_abs(self) -> float:
        """max |w| over every weight of every rank; inf when any weight is inf or nan."""
        local = [t for t in (_local(p) for p in self.params) if t.numel()]  # an FSDP rank may hold no part of one
        m = torch.zeros((), device=self.device)  # a rank holding nothing still takes part in the all-reduce
        if local:
            m = torch.stack(torch._foreach_norm(local, ord=math.inf)).max()
        m = torch.nan_to_num(m.float(), nan=math.inf, posinf=math.inf)  # NaN loses every comparison; inf wins max
        return float(all_reduce_max(m.to(self.device)).item())

    def step_bound(self) -> float:
        """The largest |w| the next AdamW step can produce (module docstring, point 2)."""
        lr = max(group["lr"] for group in self.optimizer.param_groups)
        return self.max_abs + lr * self.cfg.grad_clip / self.cfg.adam_eps

    def step(self, loss: float, grad_norm: float) -> str | None:
        """optimizer.step() unless it would be (or turned out) non-finite. None when applied, else the reason (the
        gradients are cleared, the weights and AdamW state are those before the call)."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            what = "loss" if not math.isfinite(loss) else "gradient"
            return self._skipped(f"non-finite {what} (loss {loss}, grad norm {grad_norm})")
        copy = self._snapshot() if self.step_bound() > SAFE_MAGNITUDE else None
        self.optimizer.step()
        max_abs = self.weights_max_abs()
        if math.isfinite(max_abs):
            self.max_abs, self.applied_this_step = max_abs, True
            return None
        if copy is None:
            raise TrainingError("non-finite weights after an optimizer step whose inputs were finite and bounded "
                                "(memrl/step_guard.py): a bug or a hardware fault; nothing was saved. Resume from "
                                "the last checkpoint")
        self._restore(copy)
        self.optimizer.zero_grad(set_to_none=True)
        return self._skipped(f"the update made weights non-finite (|w| was {self.max_abs:.3g}); undone")

    def _skipped(self, why: str) -> str:
        self.last_problem = why
        return why

    def end_of_step(self, step: int) -> None:
        """Count a step with no applied update; stop the run after max_skipped such steps in a row."""
        self.skipped_in_a_row = 0 if self.applied_this_step else self.skipped_in_a_row + 1
        self.applied_this_step = False
        if self.skipped_in_a_row >= self.max_skipped:
            raise TrainingError(
                f"train.max_skipped_steps={self.max_skipped}: steps {step - self.max_skipped + 1}..{step} applied no "
                f"update ({self.last_problem}); stopping instead of training on. The weights are those before "
                f"them, all finite. Lower optim.lr, check the data or the reference model, then resume from the "
                f"last checkpoint (--resume, with --train.allow_config_change for what you change)")

    @torch.no_grad()
    def _snapshot(self) -> tuple[list[torch.Tensor], dict]:
        weights = [_local(p).clone() for p in self.params]
        state = {p: {k: (_local(v).clone() if torch.is_tensor(v) else v) for k, v in self.optimizer.state[p].items()}
                 for p in self.params if p in self.optimizer.state}
        return weights, state

    @torch.no_grad()
    def _restore(self, copy: tuple[list[torch.Tensor], dict]) -> None:
        weights, state = copy
        for p, saved in zip(self.params, weights):
            _local(p).copy_(saved)
        for p in self.params:
            if p not in state:
                self.optimizer.state.pop(p, None)
                continue
            for k, v in state[p].items():
                current = self.optimizer.state[p][k]
                if torch.is_tensor(current):
                    _local(current).copy_(v)
                else:
                    self.optimizer.state[p][k] = v
