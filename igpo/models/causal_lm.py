"""One model builder for every stage: a HF causal LM, optionally wrapped in peft LoRA adapters.

The RL policy (`igpo.policy.IGPOPolicy`) and the SFT warm start (`igpo.sft.SFTModule`) both call
`load_causal_lm`, so they load, wrap and configure the model the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """peft LoRA settings; `enabled=False` trains all weights."""

    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS)


ATTENTION = ("eager", "sdpa", "flash_attention_2", "flex_attention")


def load_causal_lm(
    path: str, *, dtype: str = "float32", lora: LoraSettings | None = None, gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
) -> nn.Module:
    """Load `path` (a directory or hub id) in `dtype`, in train mode, wrapped in LoRA when enabled.

    `attn_implementation` picks the transformers attention kernel (None: its default, sdpa); the kernels agree
    to rounding. On a 2-core CPU, "eager" trains the tiny testbed model 1.07x faster than sdpa in isolated SFT
    steps (benchmarks/sft_throughput.py) and was no faster in a whole 1,000-step SFT build."""
    from transformers import AutoModelForCausalLM

    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise ValueError(f"load_causal_lm: dtype {dtype!r} is not a torch dtype (float32, bfloat16, float16)")
    if attn_implementation is not None and attn_implementation not in ATTENTION:
        raise ValueError(f"load_causal_lm: attn_implementation {attn_implementation!r} is not one of {ATTENTION} "
                         "(or None for the transformers default)")
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    base = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **extra)
    if gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    model = base
    if lora is not None and lora.enabled:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                         target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
        model = get_peft_model(base, cfg)
    model.train()
    return model
