"""Retrievers behind one protocol: embedded bm25s (default) and Elasticsearch (the `es` extra).

The Elasticsearch names are imported on first use, so `import igpo.retriever` works without the
`elasticsearch` client installed.
"""

from __future__ import annotations

from typing import Any

from igpo.retriever.base import Retriever
from igpo.retriever.bm25 import BM25Retriever
from igpo.retriever.corpus import CorpusFormatError, iter_corpus, parse_contents

_ES_NAMES = ("ElasticsearchRetriever", "IndexSettings", "IngestReport", "SearchError", "index_corpus")

__all__ = ["Retriever", "BM25Retriever", "CorpusFormatError", "iter_corpus", "parse_contents", *_ES_NAMES]


def __getattr__(name: str) -> Any:
    if name in _ES_NAMES:
        from igpo.retriever import elasticsearch

        return getattr(elasticsearch, name)
    raise AttributeError(f"module 'igpo.retriever' has no attribute {name!r}")
