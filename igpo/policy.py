"""The LightningModule: a causal LM with LoRA adapters (peft), trained with the IGPO loss.

The reference policy is the same model with the adapter disabled (one copy of the base weights).
Advantages, old and reference log-probs are written into the batch by `IGPOAdvantageCallback` before
`training_step`; the step itself is PPO over mini-batches (manual optimisation, `ppo_epochs` passes).
Checkpoints hold only the trainable (adapter) weights, the optimizer, the step and the RNG states.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch

from igpo.algorithm.config import AlgorithmConfig
from igpo.algorithm.loss import policy_loss, token_logprobs_and_entropy
from igpo.algorithm.rewards import episode_metrics
from igpo.types import RolloutBatch

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """peft LoRA settings; `enabled=False` trains all weights (then the reference is a frozen copy)."""

    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS)


@dataclass(frozen=True)
class OptimSettings:
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 1.0


class IGPOPolicy(L.LightningModule):
    def __init__(
        self,
        model: str,
        algorithm: AlgorithmConfig | None = None,
        lora: LoraSettings | None = None,
        optim: OptimSettings | None = None,
        ppo_epochs: int = 1,
        mini_batch_size: int | None = None,
        micro_batch_size: int = 16,
        torch_dtype: str = "float32",
        gradient_checkpointing: bool = False,
        shuffle_minibatches: bool = False,
        keep_reference: bool = True,
    ) -> None:
        super().__init__()
        self.model_name = model
        self.algorithm = algorithm or AlgorithmConfig()
        self.lora = lora or LoraSettings()
        self.optim = optim or OptimSettings()
        self.ppo_epochs, self.mini_batch_size, self.micro_batch_size = ppo_epochs, mini_batch_size, micro_batch_size
        self.torch_dtype, self.gradient_checkpointing = torch_dtype, gradient_checkpointing
        self.shuffle_minibatches, self.keep_reference = shuffle_minibatches, keep_reference
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the adapter only
        self.model: torch.nn.Module | None = None
        self.ref_model: torch.nn.Module | None = None
        self._val: dict[str, list[dict[str, float]]] = defaultdict(list)

    # ---- model ----------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(self.model_name, dtype=getattr(torch, self.torch_dtype))
        if self.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.config.use_cache = False
        if self.lora.enabled:
            from peft import LoraConfig, get_peft_model

            cfg = LoraConfig(
                r=self.lora.r, lora_alpha=self.lora.alpha, lora_dropout=self.lora.dropout,
                target_modules=list(self.lora.target_modules), task_type="CAUSAL_LM",
            )
            self.model = get_peft_model(base, cfg)
        else:
            import copy

            self.model = base
            if self.keep_reference:  # full fine-tune: the reference is a frozen copy of the start
                self.ref_model = copy.deepcopy(base).eval().requires_grad_(False)
        self.model.train()

    def reference(self):
        """Context manager under which `self.model` computes the reference policy."""
        if self.ref_model is not None:
            return _Swap(self)
        return self.model.disable_adapter()

    def forward_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_entropy: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logprobs, entropy = token_logprobs_and_entropy(logits, input_ids)
        return logprobs, (entropy if with_entropy else None)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        o = self.optim
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch.to(device) if isinstance(batch, RolloutBatch) else batch

    # ---- training -------------------------------------------------------------------------------
    def training_step(self, batch: RolloutBatch, batch_idx: int) -> torch.Tensor:
        if batch.advantages is None or batch.old_logprobs is None or batch.ref_logprobs is None:
            raise RuntimeError(
                "IGPOPolicy.training_step got a batch without advantages/old/ref log-probs: add "
                "igpo.algorithm.callback.IGPOAdvantageCallback to the trainer's callbacks (conf/callbacks/)."
            )
        t0 = time.perf_counter()
        opt = self.optimizers()
        n = len(batch)
        mb = self.mini_batch_size or n
        sums: dict[str, float] = defaultdict(float)
        updates = 0
        for _ in range(self.ppo_epochs):
            order = torch.randperm(n) if self.shuffle_minibatches else torch.arange(n)
            for start in range(0, n, mb):
                idx = order[start: start + mb]
                opt.zero_grad()
                metrics = self._accumulate(batch, idx)
                self.clip_gradients(opt, gradient_clip_val=self.optim.grad_clip, gradient_clip_algorithm="norm")
                opt.step()
                updates += 1
                for k, v in metrics.items():
                    sums[k] += v
        logs = {f"train/{k}": v / updates for k, v in sums.items()}
        logs["time/update_s"] = time.perf_counter() - t0
        logs.update(batch.stats)
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=n)
        return torch.tensor(logs["train/loss"])

    def _accumulate(self, batch: RolloutBatch, idx: torch.Tensor) -> dict[str, float]:
        """Backward over micro-batches of `idx`, weighting each by its share of the aggregation units
        (tokens for token-mean, sequences otherwise) so the result equals one big-batch step."""
        units = _agg_units(batch.loss_mask[idx], self.algorithm.loss_agg)
        total = max(float(units.sum()), 1.0)
        out: dict[str, float] = defaultdict(float)
        for start in range(0, len(idx), self.micro_batch_size):
            sub = batch.select(idx[start: start + self.micro_batch_size])
            weight = float(_agg_units(sub.loss_mask, self.algorithm.loss_agg).sum()) / total
            if weight == 0:
                continue
            width = int(sub.attention_mask.sum(1).max())
            ids, att = sub.input_ids[:, :width], sub.attention_mask[:, :width]
            logprobs, entropy = self.forward_logprobs(ids, att)
            a = self.algorithm
            loss, m = policy_loss(
                logprobs, sub.old_logprobs[:, :width], sub.ref_logprobs[:, :width], sub.advantages[:, :width],
                sub.loss_mask[:, :width], entropy, clip_low=a.clip_low, clip_high=a.clip_high,
                dual_clip=a.dual_clip, kl_coef=a.kl_coef, entropy_coef=a.entropy_coef, agg=a.loss_agg,
            )
            self.manual_backward(loss * weight)
            out["loss"] += float(loss.detach()) * weight
            for k in ("kl", "entropy", "clip_frac"):
                out[k] += float(m[k]) * weight
        return out

    # ---- validation -----------------------------------------------------------------------------
    def validation_step(self, batch: RolloutBatch, batch_idx: int) -> None:
        for ep in batch.episodes:
            self._val[ep.question.data_source].append(episode_metrics(ep))

    def on_validation_epoch_end(self) -> None:
        rows = [r for rs in self._val.values() for r in rs]
        if not rows:
            return
        logs = {f"val/{k}": float(np.mean([r[k] for r in rows])) for k in rows[0]}
        for source, rs in sorted(self._val.items()):
            for k in ("em", "f1"):
                logs[f"val/{source}/{k}"] = float(np.mean([r[k] for r in rs]))
        self.log_dict(logs, on_step=False, on_epoch=True)
        self._val.clear()

    # ---- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        name, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint["rng_states"] = {  # plain types only: Lightning restores with torch.load(weights_only=True)
            "torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("rng_states")
        if rng:
            torch.set_rng_state(rng["torch"])
            name, keys, pos, has_gauss, cached = rng["numpy"]
            np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
            random.setstate(rng["python"])

    def save_adapter(self, path: str) -> None:
        """Adapter only (peft format) — or the full model when LoRA is off."""
        self.model.save_pretrained(path)


def _agg_units(mask: torch.Tensor, agg: str) -> torch.Tensor:
    return mask.sum(1) if agg == "token-mean" else (mask.sum(1) > 0).float()


class _Swap:
    """Reference = frozen copy when training all weights (LoRA off)."""

    def __init__(self, policy: IGPOPolicy) -> None:
        self.policy = policy

    def __enter__(self):
        self.saved = self.policy.model
        self.policy.model = self.policy.ref_model

    def __exit__(self, *exc):
        self.policy.model = self.saved
