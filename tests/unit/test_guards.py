"""Non-finite guard: findings on unmasked tokens only, per-step skip counting, the stopping error."""

from __future__ import annotations

import math

import pytest
import torch

from igpo.algorithm.guards import NonFinite, NonFiniteError, NonFiniteGuard, find_non_finite, total_grad_norm

MASK = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 1, 1]])


def clean() -> dict[str, torch.Tensor]:
    return {name: torch.zeros(3, 4) for name in ("advantages", "old_logprobs", "ref_logprobs", "logprobs")}


def test_finite_inputs_give_no_findings() -> None:
    assert find_non_finite({**clean(), "loss": torch.tensor(1.5), "grad_norm": 3.0}, MASK) == []


def test_non_finite_on_masked_tokens_is_ignored() -> None:
    t = clean()
    t["old_logprobs"][0, 0] = -math.inf  # prompt token
    t["ref_logprobs"][1, 3] = math.nan   # padding
    assert find_non_finite(t, MASK) == []


def test_golden_findings_name_tensor_rows_and_count() -> None:
    t = clean()
    t["advantages"][2, 3] = math.nan
    t["advantages"][0, 1] = math.inf
    t["logprobs"][1, 1] = -math.inf
    t["logprobs"][1, 2] = math.nan  # masked: not counted
    found = find_non_finite({**t, "loss": torch.tensor(math.nan), "grad_norm": None}, MASK)
    assert found == [NonFinite("advantages", (0, 2), 2), NonFinite("logprobs", (1,), 1), NonFinite("loss", (), 1)]
    ids = ["q7#0", "q7#1", "q9#0"]
    assert find_non_finite({"advantages": t["advantages"]}, MASK, ids) == [NonFinite("advantages", ("q7#0", "q9#0"), 2)]


def test_per_row_and_other_shapes() -> None:
    per_row = torch.tensor([0.0, math.nan, 1.0])
    assert find_non_finite({"seq_loss": per_row}, MASK) == [NonFinite("seq_loss", (1,), 1)]
    other = torch.full((2, 2), math.inf)
    assert find_non_finite({"x": other}, MASK) == [NonFinite("x", (), 4)]
    assert find_non_finite({"ids": torch.tensor([[1, 2]])}, None) == []  # integer tensors are always finite
    assert find_non_finite({"g": float("inf")}) == [NonFinite("g", (), 1)]


def test_total_grad_norm() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    assert float(total_grad_norm([a, b])) == 0.0
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert float(total_grad_norm([a, b])) == pytest.approx(5.0)
    b.grad = torch.tensor([math.nan])
    assert not math.isfinite(float(total_grad_norm([a, b])))


def bad(row: int = 1) -> dict[str, torch.Tensor]:
    """NaN advantage on the first trained token of `row`."""
    t = clean()
    t["advantages"][row, int(MASK[row].nonzero()[0])] = math.nan
    return t


def test_guard_skips_counts_and_resets_on_a_good_step() -> None:
    g = NonFiniteGuard(max_consecutive_skips=2)
    assert not g.check(0, clean(), MASK).skip
    v = g.check(1, bad(), MASK)
    assert v.skip and v.findings[0].tensor == "advantages"
    assert g.check(2, bad(), MASK).skip
    assert g.skipped_steps == 2 and g.consecutive == [1, 2]
    assert not g.check(3, clean(), MASK).skip
    assert g.consecutive == [] and g.skipped_steps == 2
    assert g.check(4, bad(), MASK).skip and g.skipped_steps == 3


def test_several_checks_in_one_step_count_it_once() -> None:
    g = NonFiniteGuard(max_consecutive_skips=1)
    assert not g.check(5, clean(), MASK).skip          # inputs fine
    assert g.check(5, {"loss": math.nan}).skip          # first mini-batch update bad
    assert not g.check(5, {"loss": 0.3}).skip           # second one fine: the step stays bad
    assert g.skipped_steps == 1 and g.consecutive == [5]
    with pytest.raises(NonFiniteError, match="step 6"):
        g.check(6, {"grad_norm": math.inf})  # a second bad step in a row is one more than K=1


def test_guard_raises_after_k_consecutive_skips_naming_step_episodes_and_tensor() -> None:
    g = NonFiniteGuard(max_consecutive_skips=2)
    ids = ["q1#0", "q1#1", "q2#0"]
    g.check(10, bad(0), MASK, ids)
    g.check(11, bad(0), MASK, ids)
    with pytest.raises(NonFiniteError) as err:
        g.check(12, bad(2), MASK, ids)
    msg = str(err.value)
    assert "step 12" in msg and "advantages" in msg and "q2#0" in msg and "[10, 11, 12]" in msg
    assert err.value.step == 12 and err.value.episode_ids == ["q2#0"] and err.value.tensors == ["advantages"]


def test_zero_skips_allowed_raises_at_once_and_state_round_trips() -> None:
    with pytest.raises(NonFiniteError, match="step 3"):
        NonFiniteGuard(0).check(3, {"loss": torch.tensor(math.inf)})
    g = NonFiniteGuard(3)
    g.check(1, {"loss": math.nan})
    g2 = NonFiniteGuard(3)
    g2.load_state_dict(g.state_dict())
    assert g2.skipped_steps == 1 and g2.consecutive == [1]
    assert g2.check(1, {"loss": math.nan}).skip and g2.skipped_steps == 1  # same step: not counted again
    with pytest.raises(ValueError):
        NonFiniteGuard(-1)


def test_a_clean_input_check_does_not_end_a_run_of_bad_steps() -> None:
    """As in training_step: every step checks its inputs (clean) first, then a mini-batch finds NaN
    log-probs. K+1 such steps in a row stop the run; a fully clean step in between resets the run."""
    g = NonFiniteGuard(max_consecutive_skips=2)
    for step in (0, 1):
        assert not g.check(step, clean(), MASK).skip
        assert g.check(step, {"logprobs": torch.full((3, 4), math.nan)}, MASK).skip
    assert g.consecutive == [0, 1]
    assert not g.check(2, clean(), MASK).skip and not g.check(2, {"loss": 0.1}).skip  # step 2 is good
    for step in (3, 4):
        g.check(step, clean(), MASK)
        g.check(step, {"loss": math.nan})
    assert g.consecutive == [3, 4] and g.skipped_steps == 4
    state = g.state_dict()
    g.check(5, clean(), MASK)
    with pytest.raises(NonFiniteError, match=r"step 5 .*\[3, 4, 5\]"):
        g.check(5, {"logprobs": torch.full((3, 4), math.nan)}, MASK, ["a", "b", "c"])
    resumed = NonFiniteGuard(max_consecutive_skips=2)  # the same after a resume from the state after step 4
    resumed.load_state_dict(state)
    resumed.check(5, clean(), MASK)
    with pytest.raises(NonFiniteError, match="step 5"):
        resumed.check(5, {"loss": math.inf})


def test_first_state_format_still_loads() -> None:
    g = NonFiniteGuard(2)
    g.load_state_dict({"skipped_steps": 2, "consecutive": [6, 7], "bad_step": 7})
    assert g.consecutive == [6, 7] and g.skipped_steps == 2
    with pytest.raises(NonFiniteError, match=r"\[6, 7, 8\]"):
        g.check(8, {"loss": math.nan})
