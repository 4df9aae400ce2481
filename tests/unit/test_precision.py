"""bf16 only where the hardware computes it natively: the check, the config resolver, and the CPU configs
resolving to bf16 or fp32 accordingly (igpo.precision)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from igpo.precision import if_native_bf16, native_bf16
from igpo.run import compose_config


def _cpu(monkeypatch, *, bf16: bool = False, amx: bool = False, cuda: bool = False, cuda_bf16: bool = False):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)


@pytest.mark.parametrize(("flags", "expected"), [
    ({}, False), ({"bf16": True}, True), ({"amx": True}, True),
    ({"cuda": True, "cuda_bf16": True}, True), ({"cuda": True, "cuda_bf16": False, "bf16": True}, False),
])
def test_native_bf16_follows_the_device_training_would_use(monkeypatch, flags, expected):
    _cpu(monkeypatch, **flags)
    assert native_bf16() is expected
    assert if_native_bf16("a", "b") == ("a" if expected else "b")


def test_native_bf16_of_a_named_device(monkeypatch):
    _cpu(monkeypatch, bf16=True, cuda=True, cuda_bf16=False)
    assert native_bf16("cpu") and not native_bf16("cuda")
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        native_bf16("tpu")


@pytest.mark.parametrize("native", [True, False])
def test_cpu_configs_pick_bf16_only_on_native_hardware(monkeypatch, native):
    _cpu(monkeypatch, bf16=native)
    for name in ("train", "demo"):
        cfg = compose_config(name)
        assert cfg.generator.dtype == ("bfloat16" if native else "float32"), name
        assert {cfg.model.precision[p] for p in ("probe", "reference", "update")} == {"bf16" if native else "fp32"}
        assert cfg.prepare.sft.bf16 is native
        resolved = OmegaConf.to_container(cfg.model.precision, resolve=True)
        assert "${" not in str(resolved)


@pytest.mark.parametrize("native", [True, False])
def test_the_comparison_benchmarks_run_bf16_on_any_machine(monkeypatch, native):
    """A benchmark's config must not change with the machine (its sweeps span machines): pinned to bf16."""
    _cpu(monkeypatch, bf16=native)
    for experiment in ("testbed_compare", "testbed_compare_hard"):
        cfg = compose_config("train", [f"experiment={experiment}"])
        assert cfg.generator.dtype == "bfloat16" and cfg.prepare.sft.bf16 is True
        assert {cfg.model.precision[p] for p in ("probe", "reference", "update")} == {"bf16"}
