"""Golden and property tests for igpo.algorithm.advantages (gains, group z-norm, discount, broadcast)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from igpo.algorithm.advantages import (
    broadcast_to_tokens,
    information_gain,
    pack_turn_rewards,
    turn_advantages,
    turn_advantages_tensor,
    zero_std_group_fraction,
)

EPS = 1e-6


def test_information_gain_both_modes():
    ells = [math.log(0.2), math.log(0.5), math.log(0.4)]
    assert information_gain(ells, "prob") == pytest.approx([0.5 - 0.2, 0.4 - 0.5])
    assert information_gain(ells, "logprob") == pytest.approx([math.log(0.5 / 0.2), math.log(0.4 / 0.5)])
    assert information_gain([-1.0], "prob") == []
    assert information_gain([-1.0, -0.25], "logprob") == [0.75]


def test_information_gain_bad_input():
    with pytest.raises(ValueError, match="not one of"):
        information_gain([0.0, 0.0], "ratio")
    with pytest.raises(ValueError, match="empty"):
        information_gain([])
    with pytest.raises(ValueError, match=r"probe_logprobs\[1\]"):
        information_gain([-1.0, float("nan")])


# Two groups × three episodes with 1, 2, 3 turns (group "b" in another order), interleaved.
# Each list = gains..., outcome.
REWARDS = [
    [1.0],  # a0
    [0.3, -0.1, 0.0],  # b0
    [0.4, 0.0],  # a1
    [-2.0],  # b1
    [-0.2, 0.1, 0.5],  # a2
    [0.4, 0.5],  # b2
]
GROUPS = ["a", "b", "a", "b", "a", "b"]


def _discount(z_values, gamma):
    """Ã_k = Σ_{m≥k} γ^{m−k} z_m written as the explicit sum."""
    n = len(z_values)
    return [sum(gamma ** (m - k) * z_values[m] for m in range(k, n)) for k in range(n)]


def _expected_joint():
    # group a pool: 1.0, 0.4, 0.0, -0.2, 0.1, 0.5 → sum 1.8, μ = 0.3
    # deviations 0.7, 0.1, -0.3, -0.5, -0.2, 0.2 → Σd² = 0.49+0.01+0.09+0.25+0.04+0.04 = 0.92
    mu_a = 1.8 / 6
    sig_a = math.sqrt(0.92 / 6 + 1e-8)
    # group b pool: 0.3, -0.1, 0.0, -2.0, 0.4, 0.5 → sum -0.9, μ = -0.15
    # deviations 0.45, 0.05, 0.15, -1.85, 0.55, 0.65
    # Σd² = 0.2025+0.0025+0.0225+3.4225+0.3025+0.4225 = 4.375
    mu_b = -0.9 / 6
    sig_b = math.sqrt(4.375 / 6 + 1e-8)
    za = lambda r: (r - mu_a) / (sig_a + EPS)
    zb = lambda r: (r - mu_b) / (sig_b + EPS)
    return [
        [za(1.0)],
        [zb(0.3), zb(-0.1), zb(0.0)],
        [za(0.4), za(0.0)],
        [zb(-2.0)],
        [za(-0.2), za(0.1), za(0.5)],
        [zb(0.4), zb(0.5)],
    ]


def _expected_separate():
    # a, IG pool: 0.4, -0.2, 0.1 → μ = 0.1, d = 0.3, -0.3, 0 → var = 0.18/3
    # a, outcome pool: 1.0, 0.0, 0.5 → μ = 0.5, d = 0.5, -0.5, 0 → var = 0.5/3
    # b, IG pool: 0.3, -0.1, 0.4 → μ = 0.2, d = 0.1, -0.3, 0.2 → var = 0.14/3
    # b, outcome pool: 0.0, -2.0, 0.5 → μ = -0.5, d = 0.5, -1.5, 1.0 → var = 3.5/3
    def z(mu, var):
        return lambda r: (r - mu) / (math.sqrt(var + 1e-8) + EPS)

    ia, oa = z(0.1, 0.18 / 3), z(0.5, 0.5 / 3)
    ib, ob = z(0.2, 0.14 / 3), z(-0.5, 3.5 / 3)
    return [
        [oa(1.0)],
        [ib(0.3), ib(-0.1), ob(0.0)],
        [ia(0.4), oa(0.0)],
        [ob(-2.0)],
        [ia(-0.2), ia(0.1), oa(0.5)],
        [ib(0.4), ob(0.5)],
    ]


@pytest.mark.parametrize("norm", ["joint", "separate"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_turn_advantages_golden(norm, gamma):
    normalised = {"joint": _expected_joint, "separate": _expected_separate}[norm]()
    got = turn_advantages(REWARDS, GROUPS, gamma=gamma, norm=norm)
    assert [len(row) for row in got] == [1, 3, 2, 1, 3, 2]
    for g, z in zip(got, normalised, strict=True):
        assert g == pytest.approx(_discount(z, gamma), abs=1e-9)


def test_golden_spot_values_gamma_09_joint():
    # episode a2 by hand: μ = 0.3, σ = sqrt(0.92/6 + 1e-8)
    s = math.sqrt(0.92 / 6 + 1e-8) + EPS
    last = (0.5 - 0.3) / s
    mid = (0.1 - 0.3) / s + 0.9 * last
    first = (-0.2 - 0.3) / s + 0.9 * mid
    got = turn_advantages(REWARDS, GROUPS, gamma=0.9, norm="joint")[4]
    assert got == pytest.approx([first, mid, last], abs=1e-9)
    assert got[2] == pytest.approx(0.2 / 0.39158, rel=1e-4)  # 0.92/6 = 0.15333…, sqrt = 0.39158


@pytest.mark.parametrize("norm", ["joint", "separate"])
def test_ig_weight_zero_is_grpo_broadcast(norm):
    # GRPO: only the outcomes count.
    # a: 1.0, 0.0, 0.5 → μ 0.5, var 0.5/3; b: 0.0, -2.0, 0.5 → μ -0.5, var 3.5/3
    sa, sb = math.sqrt(0.5 / 3 + 1e-8) + EPS, math.sqrt(3.5 / 3 + 1e-8) + EPS
    grpo = [(1.0 - 0.5) / sa, (0.0 + 0.5) / sb, (0.0 - 0.5) / sa, (-2.0 + 0.5) / sb, (0.5 - 0.5) / sa,
            (0.5 + 0.5) / sb]
    got = turn_advantages(REWARDS, GROUPS, gamma=1.0, norm=norm, ig_weight=0.0)
    for g, a, row in zip(got, grpo, REWARDS, strict=True):
        assert g == pytest.approx([a] * len(row), abs=1e-9)


@pytest.mark.parametrize("norm", ["joint", "separate"])
def test_outcome_weight_zero_is_ig_only(norm):
    # IG pools only: a: 0.4, -0.2, 0.1 → μ 0.1, var 0.18/3; b: 0.3, -0.1, 0.4 → μ 0.2, var 0.14/3
    sa, sb = math.sqrt(0.18 / 3 + 1e-8) + EPS, math.sqrt(0.14 / 3 + 1e-8) + EPS
    expected = [
        [0.0],
        [(0.3 - 0.2) / sb + (-0.1 - 0.2) / sb, (-0.1 - 0.2) / sb, 0.0],
        [(0.4 - 0.1) / sa, 0.0],
        [0.0],
        [(-0.2 - 0.1) / sa + (0.1 - 0.1) / sa, (0.1 - 0.1) / sa, 0.0],
        [(0.4 - 0.2) / sb, 0.0],
    ]
    got = turn_advantages(REWARDS, GROUPS, gamma=1.0, norm=norm, outcome_weight=0.0)
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, abs=1e-9)


def test_ig_weight_scales_before_joint_statistics():
    # weighted pool: 2·0.1 = 0.2, 1.0, 0.0 → μ = 0.4, d = -0.2, 0.6, -0.4 → var = 0.56/3
    s = math.sqrt(0.56 / 3 + 1e-8) + EPS
    got = turn_advantages([[0.1, 1.0], [0.0]], [0, 0], ig_weight=2.0, gamma=0.5)
    assert got[0] == pytest.approx([(0.2 - 0.4) / s + 0.5 * (1.0 - 0.4) / s, (1.0 - 0.4) / s], abs=1e-9)
    assert got[1] == pytest.approx([(0.0 - 0.4) / s], abs=1e-9)


def test_singleton_groups_use_unit_std():
    # one episode, one turn: pool of 1 → μ = r, σ = 1 → 0
    assert turn_advantages([[0.7]], ["q"]) == [[0.0]]
    # joint pool of 2: μ = 0.5, σ = sqrt(0.04 + 1e-8) → ±0.2/σ
    s = math.sqrt(0.04 + 1e-8) + EPS
    assert turn_advantages([[0.3, 0.7]], ["q"])[0] == pytest.approx([-0.2 / s + 0.2 / s, 0.2 / s])
    # separate: each pool has one entry → all 0
    assert turn_advantages([[0.3, 0.7]], ["q"], norm="separate") == [[0.0, 0.0]]


def test_bad_inputs():
    with pytest.raises(ValueError, match="not one of"):
        turn_advantages([[1.0]], [0], norm="per-turn")
    with pytest.raises(ValueError, match=r"rewards\[1\] is empty"):
        turn_advantages([[1.0], []], [0, 0])
    with pytest.raises(ValueError, match="groups has 1"):
        turn_advantages([[1.0], [0.0]], [0])
    with pytest.raises(ValueError, match=r"rewards\[0, 1\]"):
        turn_advantages([[0.1, float("inf")]], [0])
    r = torch.zeros(1, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="not a prefix"):
        turn_advantages_tensor(r, torch.tensor([[True, False, True]]), torch.zeros(1, 3, dtype=torch.bool),
                               torch.zeros(1, dtype=torch.long))


def test_broadcast_to_tokens():
    turn_adv = torch.tensor([[1.5, -2.0, 0.25], [0.5, 0.0, 0.0]])
    turn_ids = torch.tensor([[-1, -1, 0, 0, 1, 1, 2, 2], [-1, 0, 0, 0, -1, -1, -1, -1]])
    mask = torch.tensor([[0, 0, 1, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.float32)
    expected = torch.tensor([[0, 0, 1.5, 0, -2.0, -2.0, 0.25, 0], [0, 0.5, 0.5, 0, 0, 0, 0, 0]])
    assert torch.equal(broadcast_to_tokens(turn_adv, turn_ids, mask), expected)
    with pytest.raises(ValueError, match="turn id"):
        broadcast_to_tokens(turn_adv[:, :2], turn_ids, mask)


def test_zero_std_group_fraction():
    # group 0 all zero, group 1 has a non-zero, group 2 all zero → 2/3
    adv = torch.tensor([[0.0, 0.0], [0.0, 1e-9], [0.0, 0.3], [0.0, 0.0], [0.0, 0.0]])
    assert zero_std_group_fraction(adv, torch.tensor([0, 0, 1, 1, 2])) == pytest.approx(2 / 3)
    assert zero_std_group_fraction(adv, ["x", "x", "y", "y", "z"]) == pytest.approx(2 / 3)
    # GRPO on a group with equal outcomes collapses; IGPO keeps gains alive
    grpo = turn_advantages([[0.1, 1.0], [0.5, 1.0]], [0, 0], ig_weight=0.0)
    igpo = turn_advantages([[0.1, 1.0], [0.5, 1.0]], [0, 0], norm="separate")
    pad = lambda rows: torch.tensor([r + [0.0] * (2 - len(r)) for r in rows])
    assert zero_std_group_fraction(pad(grpo), [0, 0]) == 1.0
    assert zero_std_group_fraction(pad(igpo), [0, 0]) == 0.0


# ---------------------------------------------------------------- properties
reward = st.floats(-3.0, 3.0, allow_nan=False, width=64)
episode = st.lists(reward, min_size=1, max_size=4)
batch = st.lists(st.tuples(st.integers(0, 2), episode), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(batch, st.floats(-5.0, 5.0), st.floats(-5.0, 5.0), st.sampled_from([1.0, 0.7]))
def test_shift_invariance(data, c_ig, c_out, gamma):
    groups = [g for g, _ in data]
    rewards = [r for _, r in data]
    base = {n: turn_advantages(rewards, groups, gamma=gamma, norm=n) for n in ("joint", "separate")}
    # joint: the same constant on every reward of a group
    shifted = [[v + c_ig * (g + 1) for v in r] for g, r in data]
    joint = turn_advantages(shifted, groups, gamma=gamma, norm="joint")
    # separate: one constant for the IG pool, another for the outcome pool
    shifted = [[v + c_ig * (g + 1) for v in r[:-1]] + [r[-1] + c_out] for g, r in data]
    separate = turn_advantages(shifted, groups, gamma=gamma, norm="separate")
    for got, ref in ((joint, base["joint"]), (separate, base["separate"])):
        for a, b in zip(got, ref, strict=True):
            assert a == pytest.approx(b, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=6), reward, st.sampled_from(["joint", "separate"]))
def test_equal_rewards_give_zero_advantages(lengths, value, norm):
    rewards = [[value] * n for n in lengths]
    got = turn_advantages(rewards, [0] * len(lengths), gamma=0.9, norm=norm)
    for row in got:
        assert row == pytest.approx([0.0] * len(row), abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(batch, st.sampled_from(["joint", "separate"]), st.sampled_from([1.0, 0.9]),
       st.sampled_from([(1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (0.5, 2.0)]))
def test_tensor_and_list_apis_agree(data, norm, gamma, weights):
    groups = [g for g, _ in data]
    rewards = [r for _, r in data]
    ig_w, out_w = weights
    listed = turn_advantages(rewards, groups, gamma=gamma, norm=norm, ig_weight=ig_w, outcome_weight=out_w)
    # tensor API with garbage past each episode's end and renumbered group ids
    r, valid, is_out, gids = pack_turn_rewards(rewards, groups)
    r = torch.where(valid, r, torch.full_like(r, 1e6))
    adv = turn_advantages_tensor(r, valid, is_out, 10 * gids + 7, gamma=gamma, norm=norm,
                                 ig_weight=ig_w, outcome_weight=out_w)
    assert torch.equal(adv[~valid], torch.zeros_like(adv[~valid]))
    for i, row in enumerate(listed):
        assert adv[i, : len(row)].tolist() == pytest.approx(row, abs=1e-12)
    # an independent, loop-based reference of the same maths
    assert listed == _reference(rewards, groups, gamma, norm, ig_w, out_w)


def _reference(rewards, groups, gamma, norm, ig_w, out_w):
    weighted = [[v * ig_w for v in r[:-1]] + [r[-1] * out_w] for r in rewards]
    pools = {}
    for i, (g, row) in enumerate(zip(groups, weighted, strict=True)):
        for k, v in enumerate(row):
            is_out = k == len(row) - 1
            if (out_w if is_out else ig_w) != 0:
                pools.setdefault((g, is_out and norm == "separate"), []).append((i, k, v))
    normed = [[0.0] * len(r) for r in rewards]
    for items in pools.values():
        vals = [v for _, _, v in items]
        mu = sum(vals) / len(vals)
        sig = math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals) + 1e-8) if len(vals) > 1 else 1.0
        for i, k, v in items:
            normed[i][k] = (v - mu) / (sig + EPS)
    return [pytest.approx(_discount(z, gamma), abs=1e-9) for z in normed]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 10), st.data())
def test_masked_tokens_get_zero_advantage(n_ep, n_turns, length, data):
    turn_adv = torch.tensor(data.draw(st.lists(st.lists(reward, min_size=n_turns, max_size=n_turns),
                                               min_size=n_ep, max_size=n_ep)))
    turn_ids = torch.tensor(data.draw(st.lists(st.lists(st.integers(-1, n_turns - 1), min_size=length,
                                                        max_size=length), min_size=n_ep, max_size=n_ep)))
    mask = torch.tensor(data.draw(st.lists(st.lists(st.sampled_from([0.0, 1.0]), min_size=length,
                                                    max_size=length), min_size=n_ep, max_size=n_ep)))
    tok = broadcast_to_tokens(turn_adv, turn_ids, mask)
    off = (mask == 0) | (turn_ids < 0)
    assert torch.equal(tok[off], torch.zeros_like(tok[off]))
    on = ~off
    assert torch.equal(tok[on], turn_adv.gather(1, turn_ids.clamp_min(0))[on])
