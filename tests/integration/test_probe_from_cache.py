"""The fused probe (probe blocks against the KV cache of the trajectory's own forward) equals the packed
probe (one forward over trajectory + blocks) on the real tiny Qwen2, for sdpa and eager attention, with
and without a probe prefix, with gradients on for the trajectory forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from igpo.algorithm.logprobs import decoder_hidden_and_cache, token_logprobs_at
from igpo.algorithm.probe import packed_probe, probe_from_cache
from tests.helpers import sharpen

from .test_probe import max_diff, random_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request: pytest.FixtureRequest, tiny_model_dir: Path) -> torch.nn.Module:
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=request.param)
    return sharpen(m).eval()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("empty_prefix", [False, True])
def test_probe_from_cache_equals_packed_probe(model, seed: int, empty_prefix: bool) -> None:
    ids, mask, bounds, parts = random_batch(seed)
    if empty_prefix:
        parts = [([], gold, suffix) for _, gold, suffix in parts]
    want = packed_probe(model, ids, mask, bounds, parts, return_token_logprobs=False).probe_logprobs
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        hidden, cache = decoder_hidden_and_cache(model, ids, mask)  # grad-enabled, as in the update
        assert hidden.requires_grad
        got = probe_from_cache(model, hidden, cache, mask.sum(1).tolist(), bounds, parts)
        hidden.sum().backward()  # the cache read left the graph usable
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
    assert max_diff(got, want) < 1e-5


def test_last_mlp_only_at_the_needed_rows_gives_the_same_logprobs(model) -> None:
    ids, mask, _, _ = random_batch(3)
    select = mask.bool() & (torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.3)
    forward = type(model.get_decoder().layers[-1].mlp).forward
    with torch.no_grad():
        full, _ = token_logprobs_at(model, ids, mask, select)
        cut, _ = token_logprobs_at(model, ids, mask, select, last_mlp_rows_only=True)
    assert float((full - cut).abs().max()) < 1e-5 and bool((cut != 0).any())
    assert "forward" not in model.get_decoder().layers[-1].mlp.__dict__  # restored
    assert type(model.get_decoder().layers[-1].mlp).forward is forward
