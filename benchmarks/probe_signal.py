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
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def classify(runs: Path, arm: str, questions: dict) -> dict[str, list[tuple[float, float]]]:
    stats: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for path in sorted(runs.glob(f"{arm}_seed*/tb/episodes.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            info = questions[r["question_id"]].metadata["extra_info"]
            gold, hops = list(info["docs"]), int(info["hops"])
            probes = [t["probe_logprob"] for t in r["turns"]]
            stats[f"P0_{hops}hop"].append((math.exp(probes[0]), probes[0]))
            seen: set[str] = set()
            for i, t in enumerate(r["turns"][:-1]):
                if t["kind"] != "search":
                    continue
                new = [d for d in t["docs"] if d in gold and d not in seen]
                kind = f"hop{gold.index(new[0]) + 1}_of_{hops}" if new else f"useless_{hops}hop"
                stats[kind].append((math.exp(probes[i + 1]) - math.exp(probes[i]), probes[i + 1] - probes[i]))
                seen |= set(t["docs"])
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
