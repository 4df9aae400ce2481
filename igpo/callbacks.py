"""Trainer callbacks at the edges: weight sync to the generator, and episode logging.

`WeightSyncCallback` pushes the updated policy into the generator after every optimizer step (and
at the start and before validation, so a resumed run or a fresh engine serves the current adapter).
`EpisodeLogger` writes a TensorBoard text summary of a few sampled episodes with their per-turn gains,
a histogram of gains by turn index, and appends sampled episodes as JSONL under the run directory.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import lightning as L

from igpo.generator.sync import WeightSync
from igpo.types import Episode, RolloutBatch


class WeightSyncCallback(L.Callback):
    def __init__(self, strategy: WeightSync) -> None:
        self.strategy = strategy
        self.version = 0

    def _sync(self, trainer: L.Trainer, pl_module) -> float:
        self.version += 1
        return self.strategy.sync(pl_module.model, trainer.datamodule.generator, self.version)

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._sync(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module) -> None:
        """A `trainer.validate` call may have started a fresh engine: serve the current policy."""
        if not trainer.sanity_checking:
            self._sync(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        seconds = self._sync(trainer, pl_module)
        pl_module.log("time/sync_s", seconds, on_step=True, on_epoch=False, batch_size=len(batch))


class EpisodeLogger(L.Callback):
    """Every `every_n_steps`: `n_text` episodes as TensorBoard text, gains histogram per turn index,
    and `n_dump` episodes appended to `<log_dir>/episodes.jsonl` (one write per step)."""

    def __init__(self, every_n_steps: int = 1, n_text: int = 2, n_dump: int = 8, seed: int = 0) -> None:
        self.every_n_steps, self.n_text, self.n_dump = every_n_steps, n_text, n_dump
        self.rng = random.Random(seed)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch: RolloutBatch, batch_idx: int) -> None:
        step = trainer.global_step
        if batch.turn_rewards is None or step % self.every_n_steps:
            return
        tok = trainer.datamodule.tokenizer
        picks = self.rng.sample(range(len(batch)), min(self.n_dump, len(batch)))
        records = [batch_record(batch, i, tok, step) for i in picks]
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "episodes.jsonl", "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        writer = _tb_writer(trainer)
        if writer is None:
            return
        for j, r in enumerate(records[: self.n_text]):
            writer.add_text(f"episodes/sample_{j}", _markdown(r), step)
        by_turn: dict[int, list[float]] = {}
        for rewards in batch.turn_rewards:
            for t, g in enumerate(rewards[:-1]):
                by_turn.setdefault(t, []).append(g)
        for t, gs in by_turn.items():
            writer.add_histogram(f"gains/turn_{t}", _tensor(gs), step)


def episode_record(
    ep: Episode, tokenizer=None, step: int | None = None, rewards: list[float] | None = None,
    advantages: list[float] | None = None, probes: list[float] | None = None,
) -> dict:
    """A JSON-able view of one episode: question, gold, turns with text, query, doc ids and (when given)
    the probe log-prob, reward and advantage of each turn, and the decoded token sequence."""

    def at(values: list[float] | None, i: int) -> float | None:
        return values[i] if values is not None and i < len(values) else None

    turns = [{
        "index": t.index, "kind": t.kind, "text": t.text, "content": t.content, "docs": [d.id for d in t.docs],
        "probe_logprob": at(probes, t.index), "reward": at(rewards, t.index), "advantage": at(advantages, t.index),
    } for t in ep.turns]
    record = {
        "question_id": ep.question.id, "question": ep.question.text, "answers": ep.question.answers,
        "data_source": ep.question.data_source, "group": ep.group, "finish": ep.finish, "answer": ep.answer,
        "turns": turns, "text": tokenizer.decode(ep.token_ids) if tokenizer is not None else None,
    }
    return record if step is None else {"step": step, **record}


def batch_record(batch: RolloutBatch, i: int, tokenizer, step: int) -> dict:
    """`episode_record` of episode i of a trained batch, with its probes, rewards and advantages."""
    def row(values: list[list[float]] | None) -> list[float] | None:
        return values[i] if values is not None else None

    return episode_record(batch.episodes[i], tokenizer, step, row(batch.turn_rewards), row(batch.turn_advantages),
                          row(batch.probe_logprobs))


def _markdown(r: dict) -> str:
    lines = [f"**Q** {r['question']}  **gold** {r['answers'][:3]}  **finish** {r['finish']}", ""]
    for t in r["turns"]:
        reward = "—" if t["reward"] is None else f"{t['reward']:+.3f}"
        adv = "—" if t["advantage"] is None else f"{t['advantage']:+.3f}"
        lines.append(f"- turn {t['index']} ({t['kind']}) reward {reward} adv {adv}: `{t['text'][:300]}`")
    return "\n".join(lines)


def _tb_writer(trainer: L.Trainer):
    for logger in trainer.loggers:
        exp = getattr(logger, "experiment", None)
        if exp is not None and hasattr(exp, "add_histogram"):
            return exp
    return None


def _tensor(values: list[float]):
    import torch

    return torch.tensor(values, dtype=torch.float32)
