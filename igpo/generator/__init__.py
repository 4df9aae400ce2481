"""Generators (in-process vLLM, vLLM servers over HTTP, transformers) behind one Protocol, and the
weight sync strategies.

Engines and torch are imported lazily: `import igpo.generator` stays cheap for pure-logic code.
"""

from __future__ import annotations

import importlib
from typing import Any

from igpo.generator.base import Generation, Generator, SamplingConfig, split_stops

_LAZY = {
    "VLLMGenerator": "igpo.generator.vllm",
    "HFGenerator": "igpo.generator.hf",
    "VLLMServerGenerator": "igpo.generator.vllm_server",
    "ServerError": "igpo.generator.vllm_server",
    "WeightSync": "igpo.generator.sync",
    "MergedSync": "igpo.generator.sync",
    "AdapterSync": "igpo.generator.sync",
    "ServerAdapterSync": "igpo.generator.sync",
    "NoSync": "igpo.generator.sync",
    "make_sync": "igpo.generator.sync",
    "merged_state_dict": "igpo.generator.sync",
}

__all__ = ["Generation", "Generator", "SamplingConfig", "split_stops", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'igpo.generator' has no attribute {name!r}")
