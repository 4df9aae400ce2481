"""Atomic checkpoint writes: a process killed in the middle of writing a checkpoint leaves the previous
one loadable and unchanged; every trainer config uses the plugin."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from igpo.checkpoint import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[2]

# A child process: save checkpoint 1, then die (os._exit, no cleanup) halfway through writing checkpoint 2.
CHILD = textwrap.dedent("""
    import os, sys, torch
    from igpo.checkpoint import AtomicCheckpointIO

    class DiesMidWrite(AtomicCheckpointIO):
        def _write(self, f, data):
            f.write(data[: len(data) // 2])
            f.flush()
            os._exit(9)

    path = sys.argv[1]
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.arange(100_000.0)}, path)
    DiesMidWrite().save_checkpoint({"global_step": 2, "w": torch.zeros(100_000)}, path)
""")


def test_kill_during_a_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    run = subprocess.run([sys.executable, "-c", CHILD, str(path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 9, run.stderr
    leftovers = list(path.parent.glob("last.ckpt.tmp-*"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the half-written file, beside the target
    state = AtomicCheckpointIO().load_checkpoint(path)
    assert state["global_step"] == 1 and torch.equal(state["w"], torch.arange(100_000.0))
    # the next save replaces the target and removes the dead writer's temporary file
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, path)
    assert AtomicCheckpointIO().load_checkpoint(path)["global_step"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_an_error_during_a_write_keeps_the_target_and_cleans_up(tmp_path):
    class Fails(AtomicCheckpointIO):
        def _write(self, f, data):
            f.write(data[:10])
            raise OSError("disk full")

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, path)
    with pytest.raises(OSError, match="disk full"):
        Fails().save_checkpoint({"global_step": 2}, path)
    assert AtomicCheckpointIO().load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    path = tmp_path / "last.ckpt"
    other = tmp_path / f"last.ckpt.tmp-{os.getppid()}"  # a process that exists
    other.write_bytes(b"partial")
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, path)
    assert other.exists()


@pytest.mark.parametrize("trainer", ["cpu", "gpu"])
def test_every_trainer_config_writes_atomically(trainer):
    from hydra.utils import instantiate

    from igpo.run import compose_config

    cfg = compose_config("train", [f"trainer={trainer}", "trainer.accelerator=cpu", "trainer.precision=32-true"])
    assert isinstance(instantiate(cfg.trainer, logger=False).strategy.checkpoint_io, AtomicCheckpointIO)
