"""The generator interface: one call samples one assistant action for each of many contexts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample one assistant action. temperature 0 means greedy. `top_k` is the sampler's top-k
    (vLLM's and transformers' `top_k`; -1 = off), not the retrieval depth, which is the rollout's
    `search_k` (documents per search)."""

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


def split_stops(
    tokenizer: Any, stops: Sequence[str], use_token_ids: bool = True
) -> tuple[list[int], list[str]]:
    """Split stop strings into ids of single added tokens (a cheap id check, and the tokenizer never
    spells them from pieces) and the remaining strings (matched on text, e.g. Qwen's `</answer>`)."""
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not s:
            raise ValueError(f"split_stops: stop #{i} must be a non-empty string, got {s!r}")
    added = tokenizer.get_added_vocab() if use_token_ids else {}
    return [added[s] for s in stops if s in added], [s for s in stops if s not in added]


def check_prompts(prompts: Sequence[Sequence[int]], where: str) -> None:
    """Every generator's input check: a list of non-empty token-id lists (`where` names the caller)."""
    if not isinstance(prompts, list | tuple):
        raise TypeError(f"{where}: expected a list of token-id lists, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"{where}: sequence #{i} is empty")
