"""Chunked log-probs (igpo.algorithm.logprobs) equal the full-logits path in values and gradients."""

from __future__ import annotations

import pytest
import torch

from igpo.algorithm.logprobs import head_logprobs, token_logprobs_at
from igpo.algorithm.loss import token_logprobs_and_entropy
from tests.helpers import sharpen


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 40), generator=g)
    att = torch.ones_like(ids)
    att[1, 30:] = 0
    att[2, 25:] = 0
    select = (torch.rand(ids.shape, generator=g) < 0.4) & att.bool()
    return ids, att, select


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_values_and_gradients_equal_the_full_logits_path(tiny_model, chunk):
    model = sharpen(tiny_model).train()
    ids, att, select = _batch(model.config.vocab_size)
    select[:, 0] = False
    lp, ent = token_logprobs_at(model, ids, att, select, with_entropy=True, chunk_size=chunk)
    loss = (lp * select).sum() + 0.1 * (ent * select).sum()
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])

    full_lp, full_ent = token_logprobs_and_entropy(model(input_ids=ids, attention_mask=att).logits, ids)
    full_loss = (full_lp * select).sum() + 0.1 * (full_ent * select).sum()
    full_grads = torch.autograd.grad(full_loss, [p for p in model.parameters() if p.requires_grad])

    assert torch.allclose(lp, torch.where(select, full_lp, 0.0), atol=1e-5)
    assert torch.allclose(ent, torch.where(select, full_ent, 0.0), atol=1e-5)
    for g, fg in zip(grads, full_grads, strict=True):  # fp32 sums in another order: relative 1e-5
        assert (g - fg).norm() <= 1e-5 * fg.norm() + 1e-7, float((g - fg).norm() / fg.norm())


def test_chunks_hold_no_more_than_one_logit_block(tiny_model):
    # with gradients, each chunk's [chunk, V] logits are recomputed in backward, not saved: the autograd
    # graph must not keep a tensor with more than chunk * V elements
    model = sharpen(tiny_model).train()
    ids, att, select = _batch(model.config.vocab_size)
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, _ = token_logprobs_at(model, ids, att, select, chunk_size=8)
    vocab = model.config.vocab_size
    logit_blocks = [s for s in saved if s and s[-1] == vocab]
    assert logit_blocks == [], logit_blocks  # chunks are recomputed in backward; nothing [.., V] is kept
    full = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: full.append(tuple(t.shape)) or t, lambda t: t):
        model(input_ids=ids, attention_mask=att).logits.log_softmax(-1)
    assert any(s[-1] == vocab and len(s) == 3 for s in full)  # the check above can see logits
    (lp.sum()).backward()


def test_head_logprobs_checks_shapes():
    head = torch.nn.Linear(4, 10, bias=False)
    with pytest.raises(ValueError, match="hidden"):
        head_logprobs(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), head)
    with pytest.raises(ValueError, match="chunk_size"):
        head_logprobs(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), head, chunk_size=0)
    lp, ent = head_logprobs(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), head, with_entropy=True)
    assert lp.shape == (0,) and ent.shape == (0,)
