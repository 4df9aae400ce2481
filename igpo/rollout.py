"""The multi-turn rollout loop: generator + retriever → episodes, token-in token-out.

Each turn samples one action for every active episode in one generator call, runs all searches of
the turn in one `search_batch`, and appends the observation tokens. The training sequence is exactly
the sampled tokens plus the observation tokens (no decode → re-tokenise round trip). With a sampling
seed, turn t samples with `seed + t * TURN_SEED_STRIDE` (the engines seed prompt i with `seed + i`), so
the draws of different turns are not the same random stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from igpo.generator.base import Generator, SamplingConfig
from igpo.prompts import AgentProtocol, ChatPieces, observation_ids, parse_action, prompt_ids
from igpo.retriever.base import Retriever
from igpo.types import Episode, Question, Turn

TURN_SEED_STRIDE = 1_000_003  # > any batch size: turn t's per-prompt seeds never meet turn t+1's


class RetrieverContractError(RuntimeError):
    """A retriever's `search_batch` did not return one result list per query."""


@dataclass(frozen=True)
class RolloutConfig:
    """max_turns: assistant turns per episode (a search at the last turn ends it as `max_turns`).
    search_k: documents per search (the retrieval depth; the sampler's top-k is `SamplingConfig.top_k`).
    max_context_tokens: an episode whose next context would not leave `sampling.max_new_tokens`
    of room is ended as `max_turns` (it ran out of budget) instead of being silently truncated."""

    max_turns: int = 4
    search_k: int = 2
    max_doc_tokens: int = 64
    max_context_tokens: int = 2048


@dataclass
class RolloutStats:
    generate_s: float = 0.0
    search_s: float = 0.0
    searches: int = 0
    search_failures: int = 0
    empty_results: int = 0  # searches that returned no document ("No results." observations)
    tokens_generated: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class RolloutRunner:
    """Runs batched multi-turn episodes; holds the pieces that do not change between steps."""

    def __init__(
        self, generator: Generator, retriever: Retriever, tokenizer, protocol: AgentProtocol | None = None,
        config: RolloutConfig | None = None,
    ) -> None:
        self.generator, self.retriever, self.tokenizer = generator, retriever, tokenizer
        self.protocol = protocol or AgentProtocol()
        self.config = config or RolloutConfig()
        self.pieces = ChatPieces.from_tokenizer(tokenizer, self.protocol)
        self._eos_texts = [t for t in {tokenizer.eos_token, tokenizer.pad_token} if t]

    def run(
        self, questions: list[Question], group_size: int, sampling: SamplingConfig, group_offset: int = 0,
    ) -> tuple[list[Episode], RolloutStats]:
        """G = group_size episodes per question; episode.group = group_offset + question index."""
        cfg, stats = self.config, RolloutStats()
        episodes = []
        for qi, q in enumerate(questions):
            ids = prompt_ids(self.tokenizer, q.text, self.protocol)
            episodes += [Episode(q, group_offset + qi, list(ids)) for _ in range(group_size)]
        active = list(episodes)
        for turn in range(cfg.max_turns):
            if not active:
                break
            t0 = time.perf_counter()
            gens = self.generator.generate([e.token_ids for e in active], turn_sampling(sampling, turn))
            stats.generate_s += time.perf_counter() - t0
            searching: list[tuple[Episode, Turn]] = []
            for ep, gen in zip(active, gens, strict=True):
                stats.tokens_generated += len(gen.token_ids)
                action = parse_action(self._strip_eos(gen.text), self.protocol)
                kind = action.kind if gen.finish_reason != "length" else "malformed"
                t = Turn(turn, list(gen.token_ids), list(gen.logprobs), gen.text, kind, action.content)
                ep.turns.append(t)
                if kind == "answer":
                    ep.finish = "answer"
                elif kind == "malformed":
                    ep.finish = "malformed"
                elif turn == cfg.max_turns - 1:
                    ep.finish = "max_turns"  # a search at the last turn: no observation, no answer
                else:
                    searching.append((ep, t))
            if searching:
                self._search(searching, stats)
            budget = cfg.max_context_tokens - sampling.max_new_tokens
            for ep, _ in searching:
                if len(ep.token_ids) > budget:
                    ep.finish = "max_turns"
            active = [e for e in active if e.finish is None]
        return episodes, stats

    def _search(self, searching: list[tuple[Episode, Turn]], stats: RolloutStats) -> None:
        t0 = time.perf_counter()
        failures_before = getattr(self.retriever, "failures", 0)
        queries = [t.content for _, t in searching]
        results = self.retriever.search_batch(queries, self.config.search_k)
        if results is None or len(results) != len(queries):
            got = "None" if results is None else f"{len(results)} result lists"
            raise RetrieverContractError(
                f"{type(self.retriever).__name__}.search_batch returned {got} for {len(queries)} queries; it must "
                f"return one list of documents per query, in order (an empty list when nothing matches). First "
                f"queries: {queries[:3]}")
        stats.empty_results += sum(1 for docs in results if not docs)
        stats.search_failures += getattr(self.retriever, "failures", 0) - failures_before
        stats.search_s += time.perf_counter() - t0
        stats.searches += len(searching)
        for (_, t), docs in zip(searching, results, strict=True):
            t.docs = list(docs)
            t.obs_ids = observation_ids(
                self.tokenizer, self.pieces, t.docs, self.protocol, self.config.max_doc_tokens
            )

    def _strip_eos(self, text: str) -> str:
        for eos in self._eos_texts:
            if text.endswith(eos):
                return text[: -len(eos)]
        return text


def turn_sampling(sampling: SamplingConfig, turn: int) -> SamplingConfig:
    """The sampling of turn `turn`: its own seed (`seed + turn * TURN_SEED_STRIDE`) when a seed is set."""
    if sampling.seed is None or turn == 0:
        return sampling
    return replace(sampling, seed=sampling.seed + turn * TURN_SEED_STRIDE)
