"""Algorithm settings as one typed dataclass (Hydra's `algorithm/` group instantiates it).

IGPO, GRPO and IG-only differ only in these numbers: GRPO is `ig_weight=0`, IG-only is
`outcome_weight=0` (entries with weight 0 leave the normalisation pool; see advantages.py).
Defaults follow the authors' v2 code with its bugs removed (docs/algorithm.md §1.7–1.9, §4).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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
    # Weight curriculum (CODE-v2: IG weight 1.0 -> 0.5 while the outcome weight rises 0.5 -> 1.0): when set,
    # a weight moves linearly from its value above (progress 0) to this one (progress 1); None = constant.
    ig_weight_final: float | None = None
    outcome_weight_final: float | None = None

    def __post_init__(self) -> None:
        if self.gain_mode not in ("prob", "logprob"):
            raise ValueError(f"algorithm.gain_mode must be 'prob' or 'logprob', got {self.gain_mode!r}")
        if self.norm not in ("joint", "separate"):
            raise ValueError(f"algorithm.norm must be 'joint' or 'separate', got {self.norm!r}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"algorithm.gamma must be in [0, 1], got {self.gamma}")
        if self.ig_weight == 0 and self.outcome_weight == 0:
            raise ValueError("algorithm: ig_weight and outcome_weight are both 0; nothing to learn from")
        for start, end in (("ig_weight", "ig_weight_final"), ("outcome_weight", "outcome_weight_final")):
            final = getattr(self, end)
            if final is not None and (final < 0 or (final > 0) != (getattr(self, start) > 0)):
                raise ValueError(f"algorithm.{end}={final}: must be >= 0 and zero exactly when {start} is "
                                 f"(the passes a step runs follow the weights being zero or not)")

    @property
    def scheduled(self) -> bool:
        """The weights depend on training progress (a curriculum is set)."""
        return self.ig_weight_final is not None or self.outcome_weight_final is not None

    def at_progress(self, progress: float) -> AlgorithmConfig:
        """The constant-weight config at training progress p in [0, 1] (clamped): each scheduled weight
        is start + (final - start) * p."""
        if not self.scheduled:
            return self
        p = min(max(float(progress), 0.0), 1.0)

        def lerp(start: float, final: float | None) -> float:
            return start if final is None else start + (final - start) * p

        return replace(self, ig_weight=lerp(self.ig_weight, self.ig_weight_final),
                       outcome_weight=lerp(self.outcome_weight, self.outcome_weight_final),
                       ig_weight_final=None, outcome_weight_final=None)
