"""The fused probe (probe blocks against the KV cache of the trajectory's own forward) equals the packed
probe (one forward over trajectory + blocks) on the real tiny Qwen2, for sdpa and eager attention, with
and without a probe prefix, with gradients on for the trajectory forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from igpo.algorithm.logprobs import decoder_hidden_and_cache
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
