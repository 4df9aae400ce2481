"""Small helpers shared by test modules."""

from __future__ import annotations

import torch


def sharpen(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Re-draw the weights with std 0.1 (norms stay 1): the default init (std 0.02) gives a nearly uniform,
    context-blind model, which would make agreement tests weak. With std 0.1 attention is sharp and
    probe values move by whole nats with context and positions."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def make_bigram(model: torch.nn.Module, transitions: dict[int, int]) -> torch.nn.Module:
    """Turn a (untied) tiny Qwen2 into a scripted bigram model: attention and MLP outputs are zeroed,
    so the last hidden state is the (normalised) input embedding, and the output head maps token a to
    its successor b. Greedy decoding then follows `transitions` exactly."""
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = model.get_output_embeddings().weight
        head.zero_()
        for a, b in transitions.items():
            head[b] += emb[a] / emb[a].norm()
    return model


def perturb_lora(model: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """A stand-in for a training step: draw every LoRA B (zero at init) at random."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
