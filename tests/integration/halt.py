"""A callback that parks a training subprocess at a chosen point so a test can SIGKILL it there.

Added to a `train.py` run with Hydra overrides (`+callbacks.halt._target_=tests.integration.halt.HaltAt ...`): when
`trainer.global_step` equals `step` at the hook `at`, it writes `marker` and sleeps until killed. The kill then lands at
a known step on any machine, however fast or busy (a poll of `last.ckpt` can miss a step: the kill then lands later
and leaves fewer steps to compare). Before parking it flushes the loggers, so what the run logged up to that point is
on disk when it is killed (TensorBoard otherwise writes every `flush_secs`)."""

from __future__ import annotations

import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

HOOKS = ("train_batch_start", "validation_start")


class HaltAt(Callback):
    def __init__(self, step: int, at: str, marker: str) -> None:
        if at not in HOOKS:
            raise ValueError(f"HaltAt: at={at!r} is not one of {HOOKS}")
        self.step, self.at, self.marker = int(step), at, Path(marker)

    def _maybe_halt(self, trainer, hook: str) -> None:
        if hook == self.at and trainer.global_step == self.step:
            for logger in trainer.loggers:
                logger.save()
            self.marker.write_text(str(trainer.global_step))
            while True:  # parked: the test kills the process group
                time.sleep(1)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._maybe_halt(trainer, "train_batch_start")

    def on_validation_start(self, trainer, pl_module) -> None:
        self._maybe_halt(trainer, "validation_start")
