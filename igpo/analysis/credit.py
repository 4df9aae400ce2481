"""Turn credit: where the information gain goes (notebooks/03_turn_credit.ipynb).

Per search turn: whether its documents held a gold answer, whether it found the next document of the
question's gold chain (answer hop, bridge hop) or nothing new (useless); per step: the groups whose
rewards cannot rank their episodes (advantage collapse).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from igpo.analysis.logs import _num, load_episodes
from igpo.analysis.runs import PathLike, Run


def mark_gold_retrieved(turns: pd.DataFrame, corpus: Mapping[str, str] | PathLike) -> pd.DataFrame:
    """Search turns of `turns_frame` with a gain, plus `gold_retrieved`: whether one of the turn's
    retrieved documents (looked up in `corpus`: {doc id: text}, or a Search-R1 jsonl file) contains a
    gold answer as whole words (normalised as the EM reward does)."""
    from igpo.algorithm.rewards import normalize_answer, split_aliases

    texts = corpus if isinstance(corpus, Mapping) else _corpus_texts(Path(corpus))
    search = turns[(turns["kind"] == "search") & turns["gain"].notna()].copy()
    unknown = sorted({d for docs in search["docs"] for d in docs if d not in texts})
    if unknown:
        raise LookupError(f"{len(unknown)} doc id(s) not in the corpus, e.g. {unknown[:3]}")
    norm = {d: f" {normalize_answer(texts[d])} " for docs in search["docs"] for d in docs}
    aliases = [[a for a in map(normalize_answer, split_aliases(gold)) if a] for gold in search["answers"]]
    search["gold_retrieved"] = [any(f" {a} " in norm[d] for d in docs for a in golds)
                                for docs, golds in zip(search["docs"], aliases, strict=True)]
    return search


def gains_by_usefulness(turns: pd.DataFrame, corpus: Mapping[str, str] | PathLike) -> pd.DataFrame:
    """Information gains of search turns split by whether the search was useful, per turn index: columns
    [index, useful, count, mean, std, pos_frac]. A search is useful when one of its retrieved documents
    (looked up in `corpus`: {doc id: text}, or a Search-R1 jsonl file) contains a gold answer (normalised
    as the EM reward does). A proxy: the bridge document of a multi-hop question counts as not useful."""
    try:
        search = mark_gold_retrieved(turns, corpus).rename(columns={"gold_retrieved": "useful"})
    except LookupError as e:
        raise LookupError(f"gains_by_usefulness: {e}") from None
    grouped = search.groupby(["index", "useful"])["gain"]
    out = grouped.agg(count="count", mean="mean", std="std")
    out["pos_frac"] = grouped.apply(lambda g: float((g > 0).mean()))
    return out.reset_index()


def advantage_collapse(episodes: pd.DataFrame | Run | PathLike, group_size: int | None = None) -> pd.DataFrame:
    """Per training step, the share of groups (episodes of one question) whose rewards cannot rank them:
    `outcome_equal` = all outcomes equal (GRPO's advantage is 0 for every token), `all_equal` = all turn
    rewards equal as well (IGPO's advantage is 0 too; gains usually break the tie). Columns [step, groups,
    outcome_equal, all_equal]. Only complete groups count: with `group_size`, groups with fewer logged
    episodes (EpisodeLogger dumps `n_dump` episodes per step) are skipped."""
    if not isinstance(episodes, pd.DataFrame):
        episodes = load_episodes(episodes)
    rows = []
    for step, at_step in episodes.groupby("step"):
        out_eq = all_eq = n = 0
        for _, g in at_step.groupby(["question_id", "group"]):
            if group_size is not None and len(g) < group_size:
                continue
            n += 1
            outcomes = g["outcome"].to_numpy(dtype=float)
            same_outcome = bool(np.allclose(outcomes, outcomes[0], atol=1e-9))
            pool = np.array([x for gains in g["gains"] for x in gains] + list(outcomes), dtype=float)
            out_eq += same_outcome
            all_eq += same_outcome and bool(np.allclose(pool, pool[0], atol=1e-9))
        rows.append({"step": step, "groups": n, "outcome_equal": out_eq / n if n else math.nan,
                     "all_equal": all_eq / n if n else math.nan})
    return pd.DataFrame(rows, columns=["step", "groups", "outcome_equal", "all_equal"])


def classify_searches(episodes: pd.DataFrame | Run | PathLike, questions: Mapping[str, Any] | PathLike) -> pd.DataFrame:
    """Every search turn that has a probe after it, classified by the first not-yet-seen gold-chain
    document it retrieved: `hopK_of_H` (the K-th document of an H-hop chain) or `useless_Hhop` (no new
    gold document). `questions` maps question ids to questions whose metadata holds the synthetic world's
    `extra_info` (`docs`: the chain's gold documents in order, `hops`), or is a question file. Columns:
    [episode, step, question_id, index, hops, kind, hop_kind (answer hop / bridge hop / useless),
    gain_prob (ΔP), gain_logprob (Δlog p)] — both gain modes from the stored probe log-probs."""
    if not isinstance(episodes, pd.DataFrame):
        episodes = load_episodes(episodes)
    if not isinstance(questions, Mapping):
        from igpo.data.questions import load_questions

        questions = {q.id: q for q in load_questions(str(questions))}
    rows = []
    for ep in episodes.itertuples(index=False):
        q = questions.get(str(ep.question_id))
        meta = (getattr(q, "metadata", q) or {}) if q is not None else {}
        info = meta.get("extra_info", meta)  # a question file's extra_info, or a world question's metadata
        if not info or "docs" not in info:
            raise LookupError(f"classify_searches: question {ep.question_id!r} has no extra_info with the "
                              "chain's gold docs (a synthetic-world question file is needed)")
        gold, hops = list(info["docs"]), int(info["hops"])
        probes = [_num(t.get("probe_logprob")) for t in ep.turns]
        seen: set[str] = set()
        for i, t in enumerate(ep.turns[:-1]):
            if t.get("kind") != "search":
                continue
            new = [d for d in t.get("docs") or [] if d in gold and d not in seen]
            k = gold.index(new[0]) + 1 if new else None
            rows.append({
                "episode": ep.episode, "step": ep.step, "question_id": ep.question_id, "index": i, "hops": hops,
                "kind": f"hop{k}_of_{hops}" if k else f"useless_{hops}hop",
                "hop_kind": "useless" if k is None else ("answer hop" if k == hops else "bridge hop"),
                "gain_prob": math.exp(probes[i + 1]) - math.exp(probes[i]),
                "gain_logprob": probes[i + 1] - probes[i],
            })
            seen |= set(t.get("docs") or [])
    cols = ["episode", "step", "question_id", "index", "hops", "kind", "hop_kind", "gain_prob", "gain_logprob"]
    return pd.DataFrame(rows, columns=cols)


def _corpus_texts(path: Path) -> dict[str, str]:
    from igpo.retriever.corpus import iter_corpus

    return {d.id: f"{d.title} {d.text}" for d in iter_corpus(path)}
