"""The search tool interface: every retriever answers a batch of queries in one call."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from igpo.types import Doc


@runtime_checkable
class Retriever(Protocol):
    """`search_batch(queries, k)` returns, for each query, its `k` best documents, best first (the
    rollout passes its retrieval depth, `search_k`; the sampler's `top_k` is another thing).

    Retrievers are cheap to construct; heavy resources (an index, a client) are opened in `setup()`
    and released in `close()`, so Hydra multirun can build many in one process.
    """

    def setup(self) -> None: ...

    def search_batch(self, queries: list[str], k: int) -> list[list[Doc]]: ...

    def close(self) -> None: ...
