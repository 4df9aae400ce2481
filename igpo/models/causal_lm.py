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


def load_causal_lm(
    path: str, *, dtype: str = "float32", lora: LoraSettings | None = None, gradient_checkpointing: bool = False,
) -> nn.Module:
    """Load `path` (a directory or hub id) in `dtype`, in train mode, wrapped in LoRA when enabled."""
    from transformers import AutoModelForCausalLM

    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise ValueError(f"load_causal_lm: dtype {dtype!r} is not a torch dtype (float32, bfloat16, float16)")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
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
