"""Where the information gain goes: per kind of search turn, the probe's ΔP and Δlog p, from the episode
dumps of `benchmarks/learning.py` runs.

A search is classified by the first not-yet-seen gold-chain document it retrieved: `hopK_of_H` (it
found the K-th document of an H-hop chain) or `useless_Hhop` (no new gold document). Both gain modes
are computed from the stored probe log-probs, so one run answers both. `P0` rows are the question-only
probe (P and log p, not a gain).
Usage: python benchmarks/probe_signal.py [--runs outputs/learning] [--arm igpo]
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def classify(runs: Path, arm: str, questions: dict) -> dict[str, list[tuple[float, float]]]:
    """(ΔP, Δlog p) per kind of search (`igpo.analysis.classify_searches`), plus the question-only probe
    (P, log p) of every episode as `P0_Hhop`, over the episode dumps of the arm's seeds."""
    import pandas as pd

    from igpo import analysis

    stats: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for path in sorted(runs.glob(f"{arm}_seed*/tb/episodes.jsonl")):
        episodes = analysis.load_episodes(path)
        for ep in episodes.itertuples(index=False):
            hops = int(questions[ep.question_id].metadata["extra_info"]["hops"])
            p0 = float(ep.turns[0]["probe_logprob"])
            stats[f"P0_{hops}hop"].append((math.exp(p0), p0))
        searches = analysis.classify_searches(episodes, questions) if len(episodes) else pd.DataFrame()
        for row in searches.itertuples(index=False):
            stats[row.kind].append((row.gain_prob, row.gain_logprob))
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=str(ROOT / "outputs" / "learning"))
    ap.add_argument("--arm", default="igpo")
    args = ap.parse_args()
    from igpo.data.questions import load_questions
    from igpo.run import compose_config, prepare_assets

    cfg = compose_config("demo")
    prepare_assets(cfg)
    questions = {q.id: q for q in load_questions(cfg.assets.train_questions)}
    stats = classify(Path(args.runs), args.arm, questions)
    print(f"| {args.arm}: search kind | n | mean ΔP | ΔP > 0 | mean Δlog p | Δlog p > 0 |")
    print("|---|---|---|---|---|---|")
    for kind, v in sorted(stats.items()):
        n = len(v)
        print(f"| {kind} | {n} | {sum(a for a, _ in v) / n:+.3f} | {sum(a > 0 for a, _ in v) / n:.2f} | "
              f"{sum(b for _, b in v) / n:+.3f} | {sum(b > 0 for _, b in v) / n:.2f} |")


if __name__ == "__main__":
    main()
