"""igpo: Information Gain-based Policy Optimization for multi-turn search agents, on PyTorch Lightning."""

__version__ = "0.1.0"

from igpo.precision import register_resolvers as _register_resolvers

_register_resolvers()  # ${igpo.if_native_bf16:A,B} in the configs (train.py, eval.py, the demo, compose_config)
