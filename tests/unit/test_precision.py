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


@pytest.mark.parametrize("native", [True, False])
def test_python_api_defaults_follow_the_hardware(monkeypatch, native):
    """Objects built in Python (a notebook, a script) choose like the YAML configs: bf16 only where native."""
    from igpo.artifacts import artifact_keys
    from igpo.generator.vllm import VLLMGenerator
    from igpo.policy import PrecisionSettings
    from igpo.prompts import AgentProtocol
    from igpo.sft import SFTConfig

    _cpu(monkeypatch, bf16=native)
    mode = "bf16" if native else "fp32"
    assert PrecisionSettings() == PrecisionSettings(mode, mode, mode)
    assert PrecisionSettings(update="fp32").probe == mode
    assert SFTConfig().bf16 is native and SFTConfig(accelerator="cpu").bf16 is native
    assert SFTConfig(bf16=True).bf16 is True and SFTConfig(bf16=False).bf16 is False
    assert VLLMGenerator("m").engine_args["dtype"] == ("bfloat16" if native else "float32")
    assert VLLMGenerator("m", dtype="float32").engine_args["dtype"] == "float32"
    # an SFT config without `bf16` gets the key of the value it resolves to on this machine
    base = dict(world_name="w", tokenizer={}, model={}, seed=0, tokenizer_texts=10, protocol=AgentProtocol(),
                oracle={})
    assert artifact_keys(**base, sft={"max_steps": 5}) == artifact_keys(**base, sft={"max_steps": 5, "bf16": None}) \
        != artifact_keys(**base, sft={"max_steps": 5, "bf16": not native})
    with pytest.raises(ValueError, match="'bf16', 'fp32' or 'native'"):
        PrecisionSettings(probe="fp16")


def test_native_on_a_cuda_machine_follows_its_bf16_support(monkeypatch):
    from igpo.policy import PrecisionSettings
    from igpo.sft import SFTConfig

    _cpu(monkeypatch, bf16=False, cuda=True, cuda_bf16=True)
    assert PrecisionSettings().update == "bf16" and SFTConfig().bf16 is True
    assert SFTConfig(accelerator="cpu").bf16 is False  # training on the CPU of that machine: its CPU decides
