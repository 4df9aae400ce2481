"""Exact kill-and-resume: a run SIGKILLed mid-training and resumed from `last.ckpt` logs, from the
checkpoint's step on, the same loss, outcome reward and IG mean (1e-6) as the uninterrupted run.

7 steps with 3 steps per epoch (epoch boundaries, and validation, after steps 3 and 6), a checkpoint after
every step, 2 PPO epochs × 2 mini-batches per step (off-policy: old log-probs from the probe pass, 4 updates a
step). `train.py` runs as a subprocess so the kill is a real SIGKILL. One chain covers both kill points: the run is
killed at the epoch boundary (after step 3's checkpoint, during validation), resumed, the resumed run is killed
mid-epoch (after step 5's checkpoint, before step 6) and resumed again."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.integration.test_train import ROOT, SMALL, _scalars

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
STEPS, PER_EPOCH = 7, 3
METRICS = ("train/loss", "reward/outcome", "reward/ig_mean",  # the three, and fingerprints of
           "train/entropy", "train/kl", "episode/tokens_generated", "episode/turns",  # the samples,
           "train/clip_frac", "train/optimizer_steps", "train/skipped_steps")  # and the restored counters


def _overrides(out: Path, artifacts: Path, *extra: str) -> list[str]:
    small = [o for o in SMALL if not o.startswith(("data.steps_per_epoch", "data.val_max_questions"))]
    return [f"paths.root_dir={out}", f"paths.artifacts_dir={artifacts}", f"paths.output_dir={out}",
            f"hydra.run.dir={out}", *small, f"trainer.max_steps={STEPS}", f"data.steps_per_epoch={PER_EPOCH}",
            "data.val_max_questions=2", *extra]


def _start(out: Path, artifacts: Path, *extra: str) -> subprocess.Popen:
    log = open(out.parent / f"{out.name}.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen([sys.executable, "train.py", *_overrides(out, artifacts, *extra)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(proc: subprocess.Popen, out: Path, timeout: float = 900) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 0, (out.parent / f"{out.name}.log").read_text()[-3000:]


def _ckpt_step(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=False, map_location="cpu")["global_step"])
    except Exception:  # not there yet
        return -1


def _by_step(out: Path) -> dict[str, dict[int, float]]:
    return {k: dict(v) for k, v in _scalars(out / "tb").items()}


SEVERAL_UPDATES = ("model.ppo_epochs=2", "model.mini_batch_size=3")  # 2 questions × 3 episodes: 2 mini-batches


def _killed_at(out: Path, artifacts: Path, step: int, at: str, *extra: str) -> Path:
    """Runs until `trainer.global_step == step` at hook `at`, where tests/integration/halt.py parks the run (so the
    kill does not depend on how fast the machine is), SIGKILLs it there and returns its `last.ckpt`."""
    marker = out.parent / f"{out.name}.halted"
    proc = _start(out, artifacts, *SEVERAL_UPDATES, *extra, "+callbacks.halt._target_=tests.integration.halt.HaltAt",
                  f"+callbacks.halt.step={step}", f"+callbacks.halt.at={at}", f"+callbacks.halt.marker={marker}")
    deadline = time.time() + 900
    while proc.poll() is None and not marker.exists() and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), f"{out.name} did not reach step {step} ({at}):\n" + \
        (out.parent / f"{out.name}.log").read_text()[-3000:]
    last = out / "checkpoints" / "last.ckpt"
    assert _ckpt_step(last) == step, f"{out.name} was killed at checkpoint step {_ckpt_step(last)}, expected {step}"
    return last


def test_sigkill_and_resume_continues_exactly(tmp_path):
    artifacts = tmp_path / "artifacts"
    full, first, second, third = (tmp_path / n for n in ("full", "killed", "resumed", "resumed_again"))
    for d in (full, first, second, third):
        d.mkdir()
    _wait(_start(full, artifacts, *SEVERAL_UPDATES), full)  # the uninterrupted run (builds the artifacts)
    # killed at the epoch boundary, during validation; the resumed run is killed mid-epoch with several updates a
    # step behind it; the last resume runs to the end
    shutil.copy(_killed_at(first, artifacts, 3, "validation_start"), second / "last.ckpt")
    shutil.copy(_killed_at(second, artifacts, 5, "train_batch_start", f"ckpt_path={second / 'last.ckpt'}"),
                third / "last.ckpt")
    _wait(_start(third, artifacts, *SEVERAL_UPDATES, f"ckpt_path={third / 'last.ckpt'}"), third)

    a, logged = _by_step(full), {3: _by_step(second), 5: _by_step(third)}
    rows = []
    for s in range(3, STEPS):  # TensorBoard step s = the (s+1)-th step; the checkpoint holds `step` of them
        b = logged[3 if s < 5 else 5]
        for k in METRICS:
            rows.append((s, k, a[k].get(s), b[k].get(s)))
    report = "\n".join(f"step {s} {k}: full {x} resumed {y}" for s, k, x, y in rows)
    diffs = [abs(x - y) for *_, x, y in rows if x is not None and y is not None]
    print(f"\nresumed from steps 3 and 5: {len(diffs)}/{len(rows)} values, "
          f"max |diff| {max(diffs, default=float('nan')):.3g}\n{report}")
    # not a vacuous comparison: the weights (loss, KL) and the samples (tokens) move from step to step. With
    # the untrained tiny model every episode is one malformed turn (outcome -2, IG 0, advantages 0), so the
    # loss is the KL/entropy part; test_testbed.py covers the SFT-warm-started path.
    assert len({a["train/loss"][s] for s in range(3, STEPS)}) > 1, report
    same = [x is not None and y is not None and math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6) for *_, x, y in rows]
    assert all(same), report
