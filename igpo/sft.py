"""SFT warm start as a Lightning stage with the same policy module (full fine-tune or LoRA).

The data are episodes tokenised exactly like rollouts (see igpo.data.oracle); the loss is the
mean NLL of the assistant action tokens only (loss_mask). Training stops at a step budget or a
wall-clock budget, whichever comes first; the learning rate follows warm-up then cosine decay over
that budget (measured in time when a time budget is set). The result is a plain model directory
(LoRA merged) that both transformers and vLLM load.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from igpo.algorithm.loss import token_logprobs_and_entropy
from igpo.policy import IGPOPolicy, LoraSettings, OptimSettings
from igpo.types import Episode


class SFTPolicy(IGPOPolicy):
    """IGPOPolicy with a supervised step: masked NLL on policy tokens, warm-up + cosine schedule."""

    def __init__(
        self, model: str, lora: LoraSettings | None = None, optim: OptimSettings | None = None,
        max_steps: int = 1000, max_seconds: float | None = None, warmup_steps: int = 30, min_lr_ratio: float = 0.1,
        torch_dtype: str = "float32", autocast_bf16: bool = False,
    ) -> None:
        super().__init__(model, lora=lora or LoraSettings(enabled=False), optim=optim, torch_dtype=torch_dtype,
                         keep_reference=False)
        self.automatic_optimization = True
        self.max_steps_budget, self.max_seconds = max_steps, max_seconds
        self.warmup_steps, self.min_lr_ratio, self.autocast_bf16 = warmup_steps, min_lr_ratio, autocast_bf16
        self._t0: float | None = None
        self.losses: list[float] = []
        self.tokens_seen = 0

    def progress(self) -> float:
        """Share of the budget used, in [0, 1]: time-based when max_seconds is set."""
        by_steps = self.global_step / max(self.max_steps_budget, 1)
        if self.max_seconds is None or self._t0 is None:
            return min(by_steps, 1.0)
        return min(max(by_steps, (time.perf_counter() - self._t0) / self.max_seconds), 1.0)

    def on_train_start(self) -> None:
        self._t0 = time.perf_counter()

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        o = self.optim
        opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)

        def factor(_: int) -> float:
            if self.global_step < self.warmup_steps:
                return (self.global_step + 1) / self.warmup_steps
            cos = 0.5 * (1 + math.cos(math.pi * self.progress()))
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * cos

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast_bf16):
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logprobs, _ = token_logprobs_and_entropy(logits.float(), batch["input_ids"])
        mask = batch["loss_mask"]
        loss = -(logprobs * mask).sum() / mask.sum().clamp(min=1)
        self.losses.append(float(loss.detach()))
        self.tokens_seen += int(batch["attention_mask"].sum())
        self.log_dict({"sft/loss": loss.detach(), "sft/lr": self.optimizers().param_groups[0]["lr"]},
                      on_step=True, prog_bar=True)
        if self.max_seconds is not None and self._t0 is not None and time.perf_counter() - self._t0 > self.max_seconds:
            self.trainer.should_stop = True
        return loss

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return {k: v.to(device) for k, v in batch.items()}

    def validation_step(self, batch, batch_idx):  # SFT has no rollout validation
        return None

    def export(self, out_dir: str | Path, tokenizer) -> Path:
        """Write a plain HF model directory (LoRA merged) + tokenizer, atomically."""
        out = Path(out_dir)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model = self.model
        if self.lora.enabled:
            model = model.merge_and_unload()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        return out


def sft_batches(
    episodes: list[Episode], pad_token_id: int, batch_size: int = 16, seed: int = 0, bucket: int = 50,
) -> list[dict[str, torch.Tensor]]:
    """Length-bucketed, shuffled padded batches (input_ids, attention_mask, loss_mask)."""
    rng = random.Random(seed)
    rows = [(e.token_ids, e.loss_mask) for e in episodes]
    rng.shuffle(rows)
    chunks = [sorted(rows[i: i + batch_size * bucket], key=lambda r: len(r[0]))
              for i in range(0, len(rows), batch_size * bucket)]
    batches = []
    for chunk in chunks:
        for i in range(0, len(chunk), batch_size):
            batches.append(_pad(chunk[i: i + batch_size], pad_token_id))
    rng.shuffle(batches)
    return batches


def _pad(rows: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (t, m) in enumerate(rows):
        ids[i, : len(t)] = torch.tensor(t)
        att[i, : len(t)] = 1
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": att, "loss_mask": mask}


def run_sft(
    model_dir: str | Path, episodes: list[Episode], out_dir: str | Path, *, lora: LoraSettings | None = None,
    optim: OptimSettings | None = None, batch_size: int = 16, max_steps: int = 1000, max_seconds: float | None = None,
    warmup_steps: int = 30, seed: int = 0, autocast_bf16: bool = True, log_dir: str | Path | None = None,
) -> tuple[Path, dict[str, float]]:
    """Fine-tune `model_dir` on `episodes` and export to `out_dir`; returns (dir, stats)."""
    from transformers import AutoTokenizer

    L.seed_everything(seed, workers=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = SFTPolicy(str(model_dir), lora=lora, optim=optim or OptimSettings(lr=2e-3, betas=(0.9, 0.95)),
                       max_steps=max_steps, max_seconds=max_seconds, warmup_steps=warmup_steps,
                       autocast_bf16=autocast_bf16)
    batches = sft_batches(episodes, tokenizer.pad_token_id, batch_size, seed)
    epochs = max(1, math.ceil(max_steps / max(len(batches), 1)))
    loader = DataLoader(_Repeat(batches, epochs, seed), batch_size=None, num_workers=0)
    logger = L.pytorch.loggers.TensorBoardLogger(str(log_dir), name="sft", version="") if log_dir else False
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=1, logger=logger,
                        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=10,
                        limit_val_batches=0, gradient_clip_val=1.0, enable_progress_bar=True)
    t0 = time.perf_counter()
    trainer.fit(policy, train_dataloaders=loader)
    seconds = time.perf_counter() - t0
    head, tail = policy.losses[:10], policy.losses[-10:]
    stats = {"steps": float(policy.global_step), "seconds": seconds,
             "loss_first10": sum(head) / max(len(head), 1), "loss_last10": sum(tail) / max(len(tail), 1),
             "epochs": policy.global_step / max(len(batches), 1),
             "tokens_per_s": policy.tokens_seen / max(seconds, 1e-9)}
    return policy.export(out_dir, tokenizer), stats


class _Repeat(torch.utils.data.IterableDataset):
    def __init__(self, batches: list, epochs: int, seed: int) -> None:
        self.batches, self.epochs, self.seed = batches, epochs, seed

    def __len__(self) -> int:
        return len(self.batches) * self.epochs

    def __iter__(self):
        rng = random.Random(self.seed)
        for _ in range(self.epochs):
            order = list(range(len(self.batches)))
            rng.shuffle(order)
            for i in order:
                yield self.batches[i]
