"""The generator interface: one call samples one assistant action for each of many contexts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample one assistant action. temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ("</search>", "</answer>")
    seed: int | None = None


@dataclass
class Generation:
    """One sampled action: token ids exactly as sampled (stop string included, EOS included if
    sampled), the sampler's log-prob of each, the decoded text, and why it stopped."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str = "stop"  # "stop" (stop string or EOS) or "length"
    extra: dict = field(default_factory=dict)


@runtime_checkable
class Generator(Protocol):
    """Samples continuations of token-id prompts; opened in `setup()`, released in `close()`."""

    def setup(self) -> None: ...

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]: ...

    def close(self) -> None: ...
