"""Exact kill-and-resume: a run SIGKILLed mid-training and resumed from `last.ckpt` logs, from the
checkpoint's step on, the same loss, outcome reward and IG mean (1e-6) as the uninterrupted run.

7 steps with 3 steps per epoch (epoch boundaries, and validation, after steps 3 and 6), a checkpoint after
every step; `train.py` runs as a subprocess so the kill is a real SIGKILL. The mid-epoch case trains with
2 PPO epochs × 2 mini-batches per step (off-policy: old log-probs from the probe pass, 4 updates a step)."""

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


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, artifacts):
    """The uninterrupted 7-step run of a configuration, run once per module (the first builds the artifacts)."""
    runs: dict[tuple[str, ...], Path] = {}

    def get(extra: tuple[str, ...]) -> Path:
        if extra not in runs:
            out = tmp_path_factory.mktemp("full") / "full"
            out.mkdir()
            _wait(_start(out, artifacts, *extra), out)
            runs[extra] = out
        return runs[extra]

    return get


SEVERAL_UPDATES = ("model.ppo_epochs=2", "model.mini_batch_size=3")  # 2 questions × 3 episodes: 2 mini-batches


# 3: the kill lands at the epoch boundary (after step 3's checkpoint, during validation); 5: mid-epoch, after step
# 5's checkpoint, before step 6, with 4 updates per step. The run parks itself there (tests/integration/halt.py) and
# is killed while parked, so the kill does not depend on how fast the machine is.
@pytest.mark.parametrize(("kill_after", "at", "extra"),
                         [(3, "validation_start", ()), (5, "train_batch_start", SEVERAL_UPDATES)],
                         ids=["epoch_end", "mid_epoch_ppo2"])
def test_sigkill_and_resume_continues_exactly(tmp_path, artifacts, full_runs, kill_after, at, extra):
    full = full_runs(extra)
    killed, resumed = tmp_path / "killed", tmp_path / "resumed"
    for d in (killed, resumed):
        d.mkdir()
    marker = tmp_path / "halted"
    proc = _start(killed, artifacts, *extra, "+callbacks.halt._target_=tests.integration.halt.HaltAt",
                  f"+callbacks.halt.step={kill_after}", f"+callbacks.halt.at={at}", f"+callbacks.halt.marker={marker}")
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 900
    while proc.poll() is None and not marker.exists() and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), f"the run did not reach step {kill_after} ({at}):\n" + \
        (killed.parent / "killed.log").read_text()[-3000:]
    step = _ckpt_step(last)
    assert step == kill_after, f"killed at checkpoint step {step}, expected {kill_after}"
    shutil.copy(last, resumed / "last.ckpt")
    _wait(_start(resumed, artifacts, *extra, f"ckpt_path={resumed / 'last.ckpt'}"), resumed)

    a, b = _by_step(full), _by_step(resumed)
    rows = []
    for s in range(step, STEPS):  # TensorBoard step s = the (s+1)-th step; the checkpoint holds `step` of them
        for k in METRICS:
            rows.append((s, k, a[k].get(s), b[k].get(s)))
    report = "\n".join(f"step {s} {k}: full {x} resumed {y}" for s, k, x, y in rows)
    diffs = [abs(x - y) for *_, x, y in rows if x is not None and y is not None]
    print(f"\nresumed from step {step} ({' '.join(extra) or 'defaults'}): {len(diffs)}/{len(rows)} values, "
          f"max |diff| {max(diffs, default=float('nan')):.3g}\n{report}")
    # not a vacuous comparison: the weights (loss, KL) and the samples (tokens) move from step to step. With
    # the untrained tiny model every episode is one malformed turn (outcome -2, IG 0, advantages 0), so the
    # loss is the KL/entropy part; test_testbed.py covers the SFT-warm-started path.
    assert len({a["train/loss"][s] for s in range(step, STEPS)}) > 1, report
    same = [x is not None and y is not None and math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6) for *_, x, y in rows]
    assert all(same), report
