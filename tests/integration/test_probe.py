"""The ground-truth probe on the real tiny Qwen2: packed (one forward) == reference (one row per turn)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from igpo.algorithm.probe import ProbeParts, packed_probe, probe_inputs_from_episodes, reference_probe
from igpo.prompts import AgentProtocol, ChatPieces, encode, observation_text, prompt_ids
from igpo.types import Episode, Question, RolloutBatch, Turn
from tests.helpers import sharpen

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-5
# Property examples reach |log p| ~ 10 through 4 fp32 layers summed in another order (packed vs padded rows): a
# 2026-12-03 run found |diff| 1.34e-5 at log p = -10.3 with eager attention (1.3e-6 relative, ~11 fp32 ulps), so
# those comparisons allow TOL + REL * |value|.
REL = 2e-6


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request: pytest.FixtureRequest, tiny_model_dir: Path) -> torch.nn.Module:
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=request.param)
    return sharpen(m).eval()


def random_batch(seed: int, n_episodes: int = 5, max_turns: int = 4, min_len: int = 8, max_len: int = 60,
                 vocab: int = 2000) -> tuple[torch.Tensor, torch.Tensor, list[list[int]], list[ProbeParts]]:
    """Right-padded random episodes with different lengths, 1 + i % max_turns increasing boundaries for
    episode i, and per-episode probe parts (prefix, gold, suffix)."""
    rng = random.Random(seed)
    lens = [rng.randint(min_len, max_len) for _ in range(n_episodes)]
    ids = torch.zeros((n_episodes, max(lens)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    bounds, parts = [], []
    for i, n in enumerate(lens):
        ids[i, :n] = torch.tensor([rng.randrange(3, vocab) for _ in range(n)])
        mask[i, :n] = 1
        bounds.append(sorted(rng.sample(range(1, n + 1), min(1 + i % max_turns, n))))
        parts.append(([rng.randrange(3, vocab) for _ in range(rng.randint(1, 4))],
                      [rng.randrange(3, vocab) for _ in range(rng.randint(1, 3))],
                      [rng.randrange(3, vocab) for _ in range(rng.randint(0, 2))]))
    return ids, mask, bounds, parts


def max_diff(a: list[list[float]], b: list[list[float]], rel: float = 0.0) -> float:
    """The largest |a - b| over the ragged lists, less `rel` * |b| (a relative allowance) when given."""
    assert [len(x) for x in a] == [len(y) for y in b]
    return max((abs(x - y) - rel * abs(y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)),
               default=0.0)


def plain_token_logprobs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(S[j] | S[:j]) from an ordinary right-padded forward with default positions."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    out = torch.zeros(ids.shape)
    out[:, 1:] = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
    return out


def direct_probe(model: torch.nn.Module, context: list[int], prefix: list[int], gold: list[int]) -> float:
    """The definition, one sequence, no padding, no mask: mean_j log p(gold_j | context + prefix + gold_<j)."""
    seq = torch.tensor([context + prefix + gold])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=seq).logits[0].float(), dim=-1)
    start = len(context) + len(prefix)
    return sum(logp[start + j - 1, g].item() for j, g in enumerate(gold)) / len(gold)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_packed_equals_reference_and_fused_token_logprobs(model, padding_side: str) -> None:
    ids, mask, bounds, parts = random_batch(seed=1, n_episodes=6)
    assert {len(b) for b in bounds} >= {1, 4} and len(set(mask.sum(-1).tolist())) > 1
    ref = reference_probe(model, ids, mask, bounds, parts, padding_side=padding_side, batch_size=4)
    fast = packed_probe(model, ids, mask, bounds, parts, return_entropies=True)
    assert max_diff(fast.probe_logprobs, ref) < TOL
    assert torch.allclose(fast.token_logprobs, plain_token_logprobs(model, ids, mask), atol=TOL, rtol=0)
    assert (fast.token_logprobs[:, 0] == 0).all() and (fast.token_logprobs[mask == 0] == 0).all()
    # values are far from uniform (ln 2048 ≈ 7.6) and vary, so agreement is not trivial
    flat = [v for row in ref for v in row]
    assert max(flat) - min(flat) > 1.0


def test_entropies_match_a_plain_forward(model) -> None:
    ids, mask, bounds, parts = random_batch(seed=2, n_episodes=3)
    fast = packed_probe(model, ids, mask, bounds, parts, return_token_logprobs=False, return_entropies=True)
    assert fast.token_logprobs is None
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    expected = torch.zeros(ids.shape)
    expected[:, 1:] = -(logp.exp() * logp).sum(-1)[:, :-1] * mask[:, 1:]
    assert torch.allclose(fast.entropies, expected, atol=1e-4, rtol=0)
    assert (fast.entropies[:, 1:][mask[:, 1:] == 1] > 0).all()


def test_one_probe_value_by_hand(model) -> None:
    ids, mask, bounds, parts = random_batch(seed=3, n_episodes=3)
    i, t = 1, len(bounds[1]) - 1
    prefix, gold, _ = parts[i]
    expected = direct_probe(model, ids[i, : bounds[i][t]].tolist(), list(prefix), list(gold))
    assert abs(packed_probe(model, ids, mask, bounds, parts).probe_logprobs[i][t] - expected) < TOL
    assert abs(reference_probe(model, ids, mask, bounds, parts)[i][t] - expected) < TOL


def test_empty_prefix_scores_first_gold_token_from_the_context(model) -> None:
    ids, mask, bounds, _ = random_batch(seed=4, n_episodes=2)
    parts = [([], [11, 12], [2]), ([], [13], [])]
    fast = packed_probe(model, ids, mask, bounds, parts).probe_logprobs
    for i in range(2):
        for t, b in enumerate(bounds[i]):
            assert abs(fast[i][t] - direct_probe(model, ids[i, :b].tolist(), [], list(parts[i][1]))) < TOL


def test_probe_sees_its_context_and_nothing_else(model) -> None:
    ids, mask, bounds, parts = random_batch(seed=5, n_episodes=4, min_len=30)
    bounds[0] = [5, 15, 25]
    base = packed_probe(model, ids, mask, bounds, parts)
    # a token between boundary 0 and 1 changes probes 1 and 2, not probe 0
    changed = ids.clone()
    changed[0, 10] = (changed[0, 10] + 7) % 2000 + 3
    after = packed_probe(model, changed, mask, bounds, parts).probe_logprobs[0]
    assert abs(after[0] - base.probe_logprobs[0][0]) < 1e-6
    assert abs(after[1] - base.probe_logprobs[0][1]) > 1e-3 and abs(after[2] - base.probe_logprobs[0][2]) > 1e-3
    # tokens after the last boundary change token log-probs but no probe
    n0 = int(mask[0].sum())
    tail = ids.clone()
    tail[0, 25:n0] = 5
    tail_out = packed_probe(model, tail, mask, bounds, parts)
    assert max_diff(tail_out.probe_logprobs, base.probe_logprobs) < 1e-6
    assert not torch.allclose(tail_out.token_logprobs[0], base.token_logprobs[0])
    # other rows, their padding, batch composition and micro-batching do not matter
    alone = packed_probe(model, ids[2:3, : int(mask[2].sum())], mask[2:3, : int(mask[2].sum())], bounds[2:3],
                         parts[2:3])
    assert max_diff(alone.probe_logprobs, base.probe_logprobs[2:3]) < TOL
    assert torch.allclose(alone.token_logprobs[0], base.token_logprobs[2, : int(mask[2].sum())], atol=TOL)
    chunked = packed_probe(model, ids, mask, bounds, parts, batch_size=3)
    assert max_diff(chunked.probe_logprobs, base.probe_logprobs) < TOL


def test_real_episodes_with_the_trained_tokenizer(tiny_model_dir: Path, tiny_tokenizer) -> None:
    model = sharpen(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    protocol, pieces = AgentProtocol(), ChatPieces.from_tokenizer(tiny_tokenizer)
    episodes = []
    for g, (name, city, hops) in enumerate([("Andus Zuraston", "Garmi", 1), ("Kadus Bri", "Linashsa", 3)]):
        q = Question(f"q{g}", f"Where was {name} born?", [city, city.lower()])
        ep = Episode(q, group=g, prompt_ids=prompt_ids(tiny_tokenizer, q.text, protocol))
        for t in range(hops):
            action = protocol.action(f"I need the birthplace of {name}.", "search", name)
            obs = observation_text(pieces, f"(1) {name}. {name} was born in {city}.", protocol)
            ep.turns.append(Turn(t, encode(tiny_tokenizer, action), [0.0], action, "search", name,
                                 encode(tiny_tokenizer, obs)))
        final = protocol.action(f"{name} was born in {city}.", "answer", city)
        ep.turns.append(Turn(hops, encode(tiny_tokenizer, final), [0.0], final, "answer", city))
        episodes.append(ep)
    batch = RolloutBatch.from_episodes(episodes, tiny_tokenizer.pad_token_id)
    bounds, parts = probe_inputs_from_episodes(episodes, tiny_tokenizer, pieces, protocol)
    assert [len(b) for b in bounds] == [2, 4]
    assert tiny_tokenizer.decode(parts[0][1]) == "Garmi"  # first alias, original casing
    for i, bs in enumerate(bounds):
        for b in bs:
            assert tiny_tokenizer.decode(batch.input_ids[i, :b]).endswith("<|im_start|>assistant\n")
    fast = packed_probe(model, batch.input_ids, batch.attention_mask, bounds, parts)
    ref = reference_probe(model, batch.input_ids, batch.attention_mask, bounds, parts, padding_side="left")
    assert max_diff(fast.probe_logprobs, ref) < TOL
    context = batch.input_ids[1, : bounds[1][2]].tolist()
    assert abs(fast.probe_logprobs[1][2] - direct_probe(model, context, list(parts[1][0]), list(parts[1][1]))) < TOL


def test_peft_model_and_training_flags_restored(tiny_model_dir: Path) -> None:
    peft = pytest.importorskip("peft")
    base = sharpen(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    ids, mask, bounds, parts = random_batch(seed=6, n_episodes=3)
    before = packed_probe(base, ids, mask, bounds, parts).probe_logprobs
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    model.train()
    fast = packed_probe(model, ids, mask, bounds, parts)
    assert all(m.training for m in model.modules())  # restored after the probe ran in eval mode
    ref = reference_probe(model, ids, mask, bounds, parts, padding_side="right")
    assert max_diff(fast.probe_logprobs, ref) < TOL  # dropout 0.5 would break this if it were active
    assert max_diff(fast.probe_logprobs, before) > 1e-3  # the adapter is in the forward
    assert torch.allclose(fast.token_logprobs, plain_token_logprobs(model.eval(), ids, mask), atol=TOL)


def test_bad_inputs_are_rejected(model) -> None:
    ids, mask, bounds, parts = random_batch(seed=7, n_episodes=2)
    n0 = int(mask[0].sum())
    with pytest.raises(ValueError, match=r"episode 0 turn 0: boundary 0 outside \[1, "):
        packed_probe(model, ids, mask, [[0], bounds[1]], parts)
    with pytest.raises(ValueError, match=f"episode 0 turn 1: boundary {n0 + 1}"):
        reference_probe(model, ids, mask, [[1, n0 + 1], bounds[1]], parts)
    with pytest.raises(ValueError, match="episode 1: attention_mask is not right-padded"):
        packed_probe(model, ids, mask.flip(-1), bounds, parts)
    with pytest.raises(ValueError, match="2 episodes but 1 boundary lists"):
        packed_probe(model, ids, mask, bounds[:1], parts)
    with pytest.raises(ValueError, match="episode 1: empty gold"):
        packed_probe(model, ids, mask, bounds, [parts[0], ([1], [], [])])
    with pytest.raises(ValueError, match="padding_side"):
        reference_probe(model, ids, mask, bounds, parts, padding_side="middle")  # type: ignore[arg-type]


def test_unsupported_attention_implementation_is_named(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config._attn_implementation = "flash_attention_2"
    ids, mask, bounds, parts = random_batch(seed=8, n_episodes=1)
    with pytest.raises(ValueError, match="flash_attention_2"):
        packed_probe(model, ids, mask, bounds, parts)


@st.composite
def batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, list[list[int]], list[ProbeParts]]:
    n_episodes = draw(st.integers(1, 4))
    lens = draw(st.lists(st.integers(1, 30), min_size=n_episodes, max_size=n_episodes))
    token = st.integers(3, 1999)
    ids = torch.zeros((n_episodes, max(lens)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    bounds, parts = [], []
    for i, n in enumerate(lens):
        ids[i, :n] = torch.tensor(draw(st.lists(token, min_size=n, max_size=n)))
        mask[i, :n] = 1
        bounds.append(draw(st.lists(st.integers(1, n), max_size=4)))  # any order, repeats allowed, may be empty
        parts.append((draw(st.lists(token, max_size=3)), draw(st.lists(token, min_size=1, max_size=3)),
                      draw(st.lists(token, max_size=2))))
    return ids, mask, bounds, parts


@settings(max_examples=10, deadline=None, database=None, derandomize=True)  # the same examples on every run
@given(batch=batches(), padding_side=st.sampled_from(["left", "right"]))
@example(batch=(torch.tensor([[491, 502, 58, 1381, 1317, 3, 3, 3, 3, 3]]), torch.ones(1, 10, dtype=torch.long), [[5]],
                [([], [101], [])]), padding_side="left")  # the two examples that found REL (eager attention)
@example(batch=(torch.tensor([[3, 502, 58, 1382, 3, 3, 3, 3, 3, 3]]), torch.ones(1, 10, dtype=torch.long), [[1]],
                [([], [3], [])]), padding_side="left")
def test_property_packed_equals_reference(model, batch, padding_side: str) -> None:
    ids, mask, bounds, parts = batch
    ref = reference_probe(model, ids, mask, bounds, parts, padding_side=padding_side, batch_size=3)
    fast = packed_probe(model, ids, mask, bounds, parts)
    assert max_diff(fast.probe_logprobs, ref, rel=REL) < TOL
    assert torch.allclose(fast.token_logprobs, plain_token_logprobs(model, ids, mask), atol=TOL, rtol=REL)
