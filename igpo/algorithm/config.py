"""Algorithm settings as one typed dataclass (Hydra's `algorithm/` group instantiates it).

IGPO, GRPO and IG-only differ only in these numbers: GRPO is `ig_weight=0`, IG-only is
`outcome_weight=0` (entries with weight 0 leave the normalisation pool; see advantages.py).
Defaults follow the authors' v2 code with its bugs removed (docs/algorithm.md §1.7–1.9, §4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class AlgorithmConfig:
    name: str = "igpo"
    gain_mode: Literal["prob", "logprob"] = "prob"
    norm: Literal["joint", "separate"] = "joint"
    gamma: float = 1.0
    ig_weight: float = 1.0
    outcome_weight: float = 1.0
    format_penalty: float = -2.0
    adv_eps: float = 1e-6
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0
    kl_coef: float = 0.001
    entropy_coef: float = 0.001
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "seq-mean-token-sum"

    def __post_init__(self) -> None:
        if self.gain_mode not in ("prob", "logprob"):
            raise ValueError(f"algorithm.gain_mode must be 'prob' or 'logprob', got {self.gain_mode!r}")
        if self.norm not in ("joint", "separate"):
            raise ValueError(f"algorithm.norm must be 'joint' or 'separate', got {self.norm!r}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"algorithm.gamma must be in [0, 1], got {self.gamma}")
        if self.ig_weight == 0 and self.outcome_weight == 0:
            raise ValueError("algorithm: ig_weight and outcome_weight are both 0; nothing to learn from")
