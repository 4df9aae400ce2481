"""The advantage callback: probe → information gains → turn rewards → group-normalised, discounted
token advantages, written into the batch before `training_step` (with the pre-update weights).

One packed forward per chunk of episodes gives both the ground-truth probe values and the old
log-probs of the trajectory (fused); one more no-grad forward with the adapter disabled gives the
reference log-probs.
"""

from __future__ import annotations

import time

import lightning as L
import torch

from igpo.algorithm.advantages import (
    broadcast_to_tokens,
    information_gain,
    pack_turn_rewards,
    turn_advantages_tensor,
    zero_std_group_fraction,
)
from igpo.algorithm.config import AlgorithmConfig
from igpo.algorithm.probe import packed_probe, probe_inputs_from_episodes
from igpo.algorithm.rewards import outcome_reward
from igpo.types import RolloutBatch


class IGPOAdvantageCallback(L.Callback):
    """Fills batch.old_logprobs, ref_logprobs, advantages, probe_logprobs, turn_rewards and stats.

    The algorithm settings are the policy's (`pl_module.algorithm`), so one config drives both.
    """

    def __init__(self, chunk_size: int = 16) -> None:
        self.chunk_size = chunk_size

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch: RolloutBatch, batch_idx: int) -> None:
        dm = trainer.datamodule
        t0 = time.perf_counter()
        model = pl_module.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                boundaries, parts = probe_inputs_from_episodes(batch.episodes, dm.tokenizer, dm.pieces, dm.protocol)
                old, ref, probes = [], [], []
                for s in range(0, len(batch), self.chunk_size):
                    ids = batch.input_ids[s: s + self.chunk_size]
                    att = batch.attention_mask[s: s + self.chunk_size]
                    res = packed_probe(model, ids, att, boundaries[s: s + self.chunk_size],
                                       parts[s: s + self.chunk_size])
                    old.append(res.token_logprobs)
                    probes += res.probe_logprobs
                    with pl_module.reference():
                        ref.append(pl_module.forward_logprobs(ids, att, with_entropy=False)[0])
        finally:
            model.train(was_training)
        batch.old_logprobs = torch.cat(old).float()
        batch.ref_logprobs = torch.cat(ref).float()
        batch.probe_logprobs = probes
        probe_s = time.perf_counter() - t0
        fill_advantages(batch, pl_module.algorithm)
        batch.stats["time/probe_s"] = probe_s


def fill_advantages(batch: RolloutBatch, algo: AlgorithmConfig) -> None:
    """From batch.probe_logprobs and the episodes: turn rewards, token advantages and their stats."""
    rewards: list[list[float]] = []
    all_gains: list[float] = []
    for ep, probe in zip(batch.episodes, batch.probe_logprobs, strict=True):
        if len(probe) != len(ep.turns):
            raise ValueError(f"episode {ep.question.id}: {len(probe)} probe values for {len(ep.turns)} turns")
        gains = information_gain(probe, mode=algo.gain_mode)
        outcome = outcome_reward(ep.answer, ep.question.answers, ep.format_ok, penalty=algo.format_penalty)
        rewards.append([*gains, outcome])
        all_gains += gains
    batch.turn_rewards = rewards
    r, valid, is_outcome, _ = pack_turn_rewards(rewards, batch.group_ids.tolist(), dtype=torch.float32)
    turn_adv = turn_advantages_tensor(
        r, valid, is_outcome, batch.group_ids.cpu(), gamma=algo.gamma, norm=algo.norm,
        ig_weight=algo.ig_weight, outcome_weight=algo.outcome_weight, eps=algo.adv_eps,
    )
    device = batch.turn_ids.device
    batch.advantages = broadcast_to_tokens(turn_adv.to(device), batch.turn_ids, batch.loss_mask).float()
    gains = all_gains
    eps = batch.episodes
    batch.stats.update({
        "reward/outcome": float(torch.tensor([row[-1] for row in rewards]).mean()),
        "reward/ig_mean": float(torch.tensor(gains).mean()) if gains else 0.0,
        "reward/ig_pos_frac": float((torch.tensor(gains) > 0).float().mean()) if gains else 0.0,
        "adv/zero_std_group_frac": zero_std_group_fraction(turn_adv, batch.group_ids.cpu()),
        "episode/turns": sum(len(e.turns) for e in eps) / len(eps),
        "episode/searches": sum(e.num_searches for e in eps) / len(eps),
        "episode/format_ok": sum(e.format_ok for e in eps) / len(eps),
        "episode/max_turns_hit": sum(e.finish == "max_turns" for e in eps) / len(eps),
    })
    batch.turn_advantages = [turn_adv[i, : len(row)].tolist() for i, row in enumerate(rewards)]
