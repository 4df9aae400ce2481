"""igpo: Information Gain-based Policy Optimization for multi-turn search agents, on PyTorch Lightning."""

__version__ = "0.1.0"
