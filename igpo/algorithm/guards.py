"""Non-finite guard: find NaN/inf on the tokens that train, skip the update, stop after K in a row.

One bad batch (a -inf log-prob on an unmasked token, a NaN advantage from a degenerate group, an
overflowing gradient) would otherwise poison the adapter silently. `find_non_finite` is the pure part
(named tensors in, findings out); `NonFiniteGuard` counts skipped steps and raises `NonFiniteError`
naming the step, the episode ids and the tensor once more than `max_consecutive_skips` steps in a row
were bad. A step is one rollout batch: several checks within one step (inputs, then each mini-batch
update) count it once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

TensorLike = torch.Tensor | float | int | None


@dataclass(frozen=True)
class NonFinite:
    """A tensor with non-finite values: which `tensor`, which `rows` (batch rows, or the ids given in
    `row_ids`; empty for a scalar such as the loss or the gradient norm) and how many values."""

    tensor: str
    rows: tuple
    count: int

    def describe(self) -> str:
        where = f" in rows {list(self.rows)[:8]}{'…' if len(self.rows) > 8 else ''}" if self.rows else ""
        return f"{self.tensor}: {self.count} non-finite value(s){where}"


def find_non_finite(
    tensors: Mapping[str, TensorLike], loss_mask: torch.Tensor | None = None,
    row_ids: Sequence | None = None,
) -> list[NonFinite]:
    """Non-finite values of named tensors, on unmasked tokens only.

    A [B, T] tensor whose shape equals `loss_mask`'s is checked where the mask is nonzero (padding,
    prompt and tool-output positions may hold anything); a [B] tensor per row; anything else (a
    scalar loss, a gradient norm, a tensor of another shape) as a whole. `None` entries are ignored.
    `row_ids[i]` names row i in the findings (episode ids); default: the row index.
    """
    out: list[NonFinite] = []
    for name, value in tensors.items():
        if value is None:
            continue
        t = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        if not (t.is_floating_point() or t.is_complex()):
            continue  # integer tensors are always finite
        bad = ~torch.isfinite(t)
        rows: tuple = ()
        if loss_mask is not None and t.dim() == 2 and t.shape == loss_mask.shape:
            bad = bad & loss_mask.to(bad.device).bool()
            rows = tuple(torch.nonzero(bad.any(1)).flatten().tolist())
        elif loss_mask is not None and t.dim() == 1 and t.shape[0] == loss_mask.shape[0]:
            rows = tuple(torch.nonzero(bad).flatten().tolist())
        count = int(bad.sum())
        if count:
            if row_ids is not None:
                rows = tuple(row_ids[i] for i in rows)
            out.append(NonFinite(name, rows, count))
    return out


def total_grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The 2-norm of all gradients (0 without gradients); non-finite if any gradient is."""
    norms = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(0.0)


class NonFiniteError(RuntimeError):
    """Raised when more than `max_consecutive_skips` steps in a row had non-finite values."""

    def __init__(self, step: int, findings: Sequence[NonFinite], skipped_steps: Sequence[int]) -> None:
        episodes = sorted({str(r) for f in findings for r in f.rows})
        tensors = sorted({f.tensor for f in findings})
        super().__init__(
            f"non-finite values at step {step} in {', '.join(tensors)}; episodes {episodes[:16]}"
            f"{' …' if len(episodes) > 16 else ''}; details: {'; '.join(f.describe() for f in findings)}. "
            f"{len(skipped_steps)} consecutive step(s) {list(skipped_steps)} were bad, stopping. Check the "
            f"learning rate, the advantage normalisation eps, and these episodes' log-probs (a -inf on a "
            f"trained token means the sampler and the trainer disagree)."
        )
        self.step, self.findings, self.skipped_steps = step, list(findings), list(skipped_steps)
        self.episode_ids, self.tensors = episodes, tensors


@dataclass(frozen=True)
class Verdict:
    """What to do with the update just checked: `skip` it (findings say why) or go on."""

    skip: bool
    findings: tuple[NonFinite, ...] = ()


class NonFiniteGuard:
    """Counts steps with non-finite values; raises after more than `max_consecutive_skips` in a row.

    Call `check` before `optimizer.step()` (and before any update, for the step's inputs); on
    `verdict.skip` zero the gradients and do not step, so weights and optimizer state stay untouched.
    A step is bad when any of its checks found something, good when none did: whether it was good is
    known only when the next step's first check comes (a step's clean input check followed by a bad
    mini-batch is a bad step, and does not end a run of bad steps). `max_consecutive_skips=0` raises at
    the first bad step. Log `skipped_steps` as `train/skipped_steps`; `state_dict`/`load_state_dict` keep
    the counters across a resume.
    """

    def __init__(self, max_consecutive_skips: int = 3) -> None:
        if max_consecutive_skips < 0:
            raise ValueError(f"NonFiniteGuard: max_consecutive_skips must be >= 0, got {max_consecutive_skips}")
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps = 0
        self._run: list[int] = []  # bad steps in a row, up to the step before `_step`
        self._step: int | None = None  # the step of the latest check
        self._step_bad = False  # whether any check of `_step` found non-finite values

    @property
    def consecutive(self) -> list[int]:
        """The current run of bad steps, ending at the current step (empty while it is clean so far)."""
        return [*self._run, self._step] if self._step_bad else []

    def check(
        self, step: int, tensors: Mapping[str, TensorLike], loss_mask: torch.Tensor | None = None,
        episode_ids: Sequence | None = None,
    ) -> Verdict:
        if step != self._step:  # a new step: the previous one is over, good or bad
            if self._step is not None:
                self._run = [*self._run, self._step] if self._step_bad else []
            self._step, self._step_bad = step, False
        findings = find_non_finite(tensors, loss_mask, episode_ids)
        if not findings:
            return Verdict(False)
        if not self._step_bad:  # a step counts once, whatever the number of bad checks in it
            self._step_bad = True
            self.skipped_steps += 1
        if len(self.consecutive) > self.max_consecutive_skips:
            raise NonFiniteError(step, findings, self.consecutive)
        return Verdict(True, tuple(findings))

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "run": list(self._run), "step": self._step,
                "step_bad": self._step_bad}

    def load_state_dict(self, state: Mapping) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if "run" in state:
            self._run = [int(s) for s in state["run"]]
            self._step = None if state.get("step") is None else int(state["step"])
            self._step_bad = bool(state.get("step_bad", False))
            return
        # the first format: `consecutive` (the run, including the last bad step) and `bad_step`
        run, bad = [int(s) for s in state.get("consecutive", [])], state.get("bad_step")
        self._run, self._step, self._step_bad = [], None, False
        if run and bad is not None and run[-1] == int(bad):
            self._run, self._step, self._step_bad = run[:-1], int(bad), True
