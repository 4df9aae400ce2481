"""Read training and eval run directories for notebooks: config, overrides, TensorBoard scalars, episodes.

A run directory is one with `.hydra/config.yaml` (what `train.py` and `eval.py` write, one per multirun
job under `multirun/<task>/<time>/<job_num>/`). Everything here only reads: what the run used from
`resolved_config.yaml` and `versions.json` (`igpo.protocol.write_run_metadata`), scalars from the
TensorBoard event files (`<run>/tb/`), sampled episodes from `episodes.jsonl` (`EpisodeLogger` writes it
next to the events, `eval.py` at the run root), eval summaries and result records from
`eval_metrics.json`, hyperparameters from checkpoints. Functions take a `Run` or a path, and return
pandas DataFrames in long form so notebooks can pivot and plot them. `compare` builds a results table
from `igpo.protocol.ResultRecord`s and refuses to mix metrics, question files or corpora in a column.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from igpo.protocol import (
    RESOLVED_CONFIG,
    STRICT_FIELDS,
    MeasurementProtocol,
    ResultRecord,
    protocol_from_config,
    read_run_metadata,
)
from igpo.protocol import checkpoint_hparams as checkpoint_hparams  # re-exported for notebooks
from igpo.stats import align, bootstrap_mean, per_question

CONFIG = Path(".hydra") / "config.yaml"
EVENTS = "events.out.tfevents.*"
EPISODE_COLUMNS = ["episode", "step", "question_id", "question", "answers", "data_source", "group", "finish",
                   "answer", "n_turns", "n_searches", "outcome", "gains", "advantages", "turns", "text"]
TURN_COLUMNS = ["episode", "step", "question_id", "group", "data_source", "finish", "answers", "index",
                "kind", "content", "docs", "probe_logprob", "reward", "advantage", "gain", "is_last"]
_HYDRA_REF = re.compile(r"\$\{hydra:([\w.]+)\}")
PathLike = str | os.PathLike[str]


class NotARunError(FileNotFoundError):
    """A path that should be a run directory (or hold run files) is not one; the message says what is
    missing."""


@dataclass(frozen=True)
class Run:
    """One run directory.

    path:      the run's output directory.
    overrides: the command-line overrides (`.hydra/overrides.yaml`) as {key: value}, `+`/`~` prefixes dropped.
    config:    the composed config with Hydra's runtime references (`${hydra:runtime.output_dir}`, ...)
               replaced by this run's values, so `paths.output_dir` and friends resolve outside Hydra.
    tb_dir:    the TensorBoard log directory, None when the run wrote no event files (e.g. eval runs).
    job_num:   the job's number within its multirun, None for a single run.
    sweep_dir: the multirun directory holding `multirun.yaml`, None for a single run.
    resolved:  `resolved_config.yaml`: the config as the run used it (interpolations and prepared asset
               paths filled in), None for runs that did not write it.
    versions:  `versions.json`: igpo, torch, vllm, transformers, ... versions ({} when absent).
    """

    path: Path
    overrides: dict[str, str]
    config: DictConfig = field(repr=False)
    tb_dir: Path | None
    job_num: int | None = None
    sweep_dir: Path | None = None
    resolved: DictConfig | None = field(default=None, repr=False)
    versions: dict[str, str | None] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        """A short label: `<sweep dir name>/<job_num>` for multirun jobs, the directory name otherwise."""
        return f"{self.sweep_dir.name}/{self.job_num}" if self.sweep_dir is not None else self.path.name

    def get(self, key: str, default: Any = None) -> Any:
        """A config value by dotted key (`algorithm.name`, `seed`), or `default` where absent or `???`;
        from the resolved config when the run wrote one."""
        if self.resolved is not None:
            value = OmegaConf.select(self.resolved, key, default=None)
            if value is not None and value != "???":
                return value
        return OmegaConf.select(self.config, key, default=default)

    @property
    def checkpoints(self) -> list[Path]:
        """The run's checkpoint files (`*.ckpt` under `checkpoints/`), sorted by name."""
        return sorted((self.path / "checkpoints").glob("*.ckpt"))


# ---- finding runs ---------------------------------------------------------------------------------
def load_run(path: PathLike) -> Run:
    """The run at `path`; `NotARunError` naming the path and what is missing when it is not a run."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise NotARunError(f"{path}: no such directory")
    if not (path / CONFIG).is_file():
        hint = ("it is a multirun directory (multirun.yaml): use find_runs() to list its jobs"
                if (path / "multirun.yaml").is_file() else "find_runs(root) lists the runs under a folder")
        raise NotARunError(f"{path} is not a run directory: missing {CONFIG} ({hint})")
    hydra = _load_yaml(path / ".hydra" / "hydra.yaml")
    hydra = hydra.get("hydra", {}) if isinstance(hydra, dict) else {}
    runtime = {"runtime": {**hydra.get("runtime", {}), "output_dir": str(path)}, "job": hydra.get("job", {})}
    raw = _load_yaml(path / CONFIG)
    if not isinstance(raw, dict):
        raise NotARunError(f"{path / CONFIG}: expected a mapping, got {type(raw).__name__}")
    config = OmegaConf.create(_replace_hydra_refs(raw, runtime))
    sweep_dir = path.parent if (path.parent / "multirun.yaml").is_file() else None
    job_num = hydra.get("job", {}).get("num") if sweep_dir is not None else None
    resolved, versions = read_run_metadata(path)
    return Run(path=path, overrides=_parse_overrides(path / ".hydra" / "overrides.yaml"), config=config,
               tb_dir=_find_tb_dir(path, config), job_num=None if job_num is None else int(job_num),
               sweep_dir=sweep_dir, resolved=resolved, versions=versions)


def find_runs(root: PathLike) -> list[Run]:
    """Every run directory at or under `root` (a single run, a multirun dir, `outputs/`), sorted by path
    with numbers in natural order (job 2 before job 10). Raises `NotARunError` when there is none."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise NotARunError(f"find_runs: {root}: no such directory")
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if (here / CONFIG).is_file():
            found.append(here)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in ("checkpoints", "tb")]
    if not found:
        raise NotARunError(f"find_runs: no run directory under {root} (a run has {CONFIG})")
    return [load_run(p) for p in sorted(found, key=_natural_key)]


def latest_run(root: PathLike) -> Run:
    """The most recently started run at or under `root` (by the time of its `.hydra/config.yaml`)."""
    return max(find_runs(root), key=lambda r: (r.path / CONFIG).stat().st_mtime)


def runs_table(runs: Iterable[Run], keys: Iterable[str] = ("algorithm.name", "seed")) -> pd.DataFrame:
    """One row per run: name, the config values of `keys`, and the overrides that differ between runs."""
    runs = list(runs)
    all_keys = sorted({k for r in runs for k in r.overrides})
    varying = [k for k in all_keys if len({r.overrides.get(k) for r in runs}) > 1]
    rows = [{"run": r.name, **{k: r.get(k) for k in keys},
             **{f"override:{k}": r.overrides.get(k) for k in varying}, "path": str(r.path)} for r in runs]
    return pd.DataFrame(rows)


def run_assets(run: Run | PathLike) -> dict[str, str | None]:
    """The asset paths a run used (model, tokenizer, corpus, question files), from its
    `resolved_config.yaml` (written once `prepare` has filled them in). A run without that file (written
    before igpo saved it) has only what `.hydra/config.yaml` states: paths `prepare` built are `???`
    there and left out. {} when neither has any."""
    run = _as_run(run)
    source = run.resolved if run.resolved is not None and run.resolved.get("assets") is not None else run.config
    assets = OmegaConf.to_container(source.get("assets") or OmegaConf.create({}), resolve=False)
    return {k: v for k, v in assets.items()
            if isinstance(v, str | type(None)) and v != "???" and "${" not in str(v)}


# ---- scalars --------------------------------------------------------------------------------------
def load_scalars(run_or_dir: Run | PathLike, tags: Iterable[str] | None = None) -> pd.DataFrame:
    """TensorBoard scalars as rows (step, tag, value, wall_time), sorted by tag then step. `tags` picks
    some; a tag the run never logged raises `LookupError` listing the ones it has."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = _tb_dir_of(run_or_dir)
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    available = acc.Tags()["scalars"]
    wanted = list(available) if tags is None else list(tags)
    missing = [t for t in wanted if t not in available]
    if missing:
        raise LookupError(f"{tb}: no scalar tag(s) {missing}; the run logged {sorted(available)}")
    rows = [(e.step, tag, e.value, e.wall_time) for tag in wanted for e in acc.Scalars(tag)]
    df = pd.DataFrame(rows, columns=["step", "tag", "value", "wall_time"])
    return df.sort_values(["tag", "step"], kind="stable").reset_index(drop=True)


def compare_runs(runs: Iterable[Run] | PathLike, tag: str, by: str = "algorithm.name") -> pd.DataFrame:
    """Mean ± std of one scalar across the runs sharing a config value `by` (seeds of one setting), per
    step: columns [by, step, mean, std, n]. `std` is the sample std (ddof=1), NaN where n == 1."""
    runs = find_runs(runs) if isinstance(runs, str | os.PathLike) else list(runs)
    if not runs:
        raise ValueError("compare_runs: no runs given")
    frames = []
    for run in runs:
        key = run.get(by)
        if key is None:
            raise LookupError(f"compare_runs: {run.path} has no config value {by!r} to group by")
        df = load_scalars(run, [tag])
        frames.append(df.assign(**{by: key, "run": run.name})[[by, "run", "step", "value"]])
    joined = pd.concat(frames, ignore_index=True)
    # a step logged twice by one run (e.g. on resume) counts once per run: its last value
    joined = joined.groupby([by, "run", "step"], sort=False).value.last().reset_index()
    out = joined.groupby([by, "step"]).value.agg(mean="mean", std="std", n="count").reset_index()
    return out


# ---- episodes -------------------------------------------------------------------------------------
def load_episodes(run_or_dir: Run | PathLike) -> pd.DataFrame:
    """One row per logged episode (`EPISODE_COLUMNS` first, then any other record field; eval records'
    `metrics` become `metrics.em`, `metrics.f1`, ...). `outcome` is the last turn's reward, `gains` the
    rewards of the turns before it (information gains), `advantages` every turn's advantage."""
    path = _episodes_file(run_or_dir)
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("turns"), list):
                raise ValueError(f"{path}:{lineno}: an episode record needs a 'turns' list")
            rows.append(_episode_row(len(rows), rec))
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=EPISODE_COLUMNS)
    for col in EPISODE_COLUMNS:
        if col not in df:
            df[col] = None
    return df[EPISODE_COLUMNS + [c for c in df.columns if c not in EPISODE_COLUMNS]]


def turns_frame(episodes: pd.DataFrame | Run | PathLike) -> pd.DataFrame:
    """One row per turn (`TURN_COLUMNS`) of `load_episodes`' frame (or of a run). `gain` is the turn's
    reward on every turn but the last (its information gain), NaN on the last (that reward is the outcome)."""
    if not isinstance(episodes, pd.DataFrame):
        episodes = load_episodes(episodes)
    rows = []
    for ep in episodes.itertuples(index=False):
        n = len(ep.turns)
        for pos, t in enumerate(ep.turns):
            reward, is_last = _num(t.get("reward")), pos == n - 1
            rows.append({
                "episode": ep.episode, "step": ep.step, "question_id": ep.question_id, "group": ep.group,
                "data_source": ep.data_source, "finish": ep.finish, "answers": ep.answers,
                "index": t.get("index", pos), "kind": t.get("kind"), "content": t.get("content"),
                "docs": list(t.get("docs") or []), "probe_logprob": _num(t.get("probe_logprob")),
                "reward": reward, "advantage": _num(t.get("advantage")),
                "gain": math.nan if is_last else reward, "is_last": is_last,
            })
    return pd.DataFrame(rows, columns=TURN_COLUMNS)


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


def load_eval(run_or_dir: Run | PathLike) -> pd.DataFrame:
    """`eval.py`'s summary (`eval_metrics.json`) as a frame indexed by data source (plus "all", "macro")."""
    path = (run_or_dir.path if isinstance(run_or_dir, Run) else Path(run_or_dir)) / "eval_metrics.json"
    if not path.is_file():
        raise NotARunError(f"{path.parent}: no eval_metrics.json (eval.py writes it at the end of a run)")
    summary = json.loads(path.read_text(encoding="utf-8")).get("summary")
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: no 'summary' mapping")
    return pd.DataFrame.from_dict(summary, orient="index").rename_axis("source")


# ---- results with their protocol ----------------------------------------------------------------------
def load_records(run_or_dir: Run | PathLike) -> list[ResultRecord]:
    """The result records an eval run wrote into `eval_metrics.json` (one per source row and metric)."""
    path = (run_or_dir.path if isinstance(run_or_dir, Run) else Path(run_or_dir)) / "eval_metrics.json"
    if not path.is_file():
        raise NotARunError(f"{path.parent}: no eval_metrics.json (eval.py writes it at the end of a run)")
    records = json.loads(path.read_text(encoding="utf-8")).get("records")
    if not isinstance(records, list):
        raise ValueError(f"{path}: no 'records' list (written by an igpo older than its protocol records)")
    return [ResultRecord.from_dict(r) for r in records]


def recent_episodes(episodes: pd.DataFrame, last_steps: int | None) -> pd.DataFrame:
    """The episodes of the last `last_steps` logged training steps (all of them when None or for eval
    episodes, which have no step)."""
    if last_steps is None or not episodes["step"].notna().any():
        return episodes
    steps = sorted(episodes["step"].dropna().unique())[-last_steps:]
    return episodes[episodes["step"].isin(steps)]


def episode_scores(episodes: pd.DataFrame | Run | PathLike, metric: str = "em",
                   last_steps: int | None = None) -> dict[str, float]:
    """Per question id, the mean `metric` (em or f1, no format penalty: an episode that did not finish
    with an answer scores 0) over the logged episodes, of the last `last_steps` training steps only when
    given. Eval episodes carry their metrics; training episodes are scored here from answer and gold."""
    from igpo.algorithm.rewards import exact_match, f1

    if not isinstance(episodes, pd.DataFrame):
        episodes = load_episodes(episodes)
    if metric not in ("em", "f1"):
        raise ValueError(f"episode_scores: metric must be 'em' or 'f1', got {metric!r}")
    episodes = recent_episodes(episodes, last_steps)
    score, stored = (exact_match if metric == "em" else f1), f"metrics.{metric}"
    pairs = []
    for ep in episodes.to_dict("records"):
        value = ep.get(stored)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            value = score(ep["answer"], list(ep["answers"])) if ep["finish"] == "answer" and ep["answer"] else 0.0
        pairs.append((str(ep["question_id"]), float(value)))
    if not pairs:
        raise ValueError("episode_scores: no episodes (after the step filter)")
    return per_question(pairs)


def train_protocol(run: Run | PathLike) -> MeasurementProtocol:
    """The protocol of a training run's logged episodes: the training question file, the run's corpus and
    retriever, its sampling settings, the group size as samples per question, its seed."""
    run = _as_run(run)
    if run.resolved is None:
        raise NotARunError(f"{run.path}: no {RESOLVED_CONFIG} (the run predates igpo's run metadata), so its "
                           "corpus and question file are unknown")
    cfg = run.resolved
    return protocol_from_config(
        cfg, data_path=run_assets(run).get("train_questions"),
        temperature=float(OmegaConf.select(cfg, "data.sampling.temperature", default=1.0)),
        samples=int(OmegaConf.select(cfg, "data.group_size", default=1)))


def run_records(run: Run | PathLike, metrics: Iterable[str] = ("em", "f1"), last_steps: int | None = None,
                label: str | None = None, n_boot: int = 2000) -> list[ResultRecord]:
    """Result records of a training run from its episode dump (source "train"; protocol:
    `train_protocol`), each with a bootstrap CI over questions; an eval run's own records
    (`load_records`) when it has `eval_metrics.json`."""
    run = _as_run(run)
    if (run.path / "eval_metrics.json").is_file():
        return load_records(run)
    episodes = recent_episodes(load_episodes(run), last_steps)
    protocol = train_protocol(run)
    out = []
    for metric in metrics:
        est = bootstrap_mean(list(episode_scores(episodes, metric).values()), n_boot=n_boot)
        out.append(ResultRecord.from_estimate(label or run.name, "train", metric, est, len(episodes), protocol,
                                              last_steps=last_steps))
    return out


def pooled_record(runs: Iterable[Run | PathLike], label: str, metric: str = "em", last_steps: int | None = None,
                  n_boot: int = 2000) -> ResultRecord:
    """One record for several seeds of one training setting: the runs' per-question scores as [S, Q] when
    they all saw the same questions (seeds and questions resampled), else pooled as one [Σ Q] array
    (questions resampled; the seed-to-seed spread is then only partly in the CI). Refuses runs whose
    protocols differ in anything but the seed."""
    runs = [_as_run(r) for r in runs]
    if not runs:
        raise ValueError("pooled_record: no runs")
    protocols = [train_protocol(r) for r in runs]
    for r, p in zip(runs[1:], protocols[1:], strict=True):
        diff = [k for k, v in p.to_dict().items() if k != "seeds" and v != protocols[0].to_dict()[k]]
        if diff:
            raise ValueError(f"pooled_record: {r.name} differs from {runs[0].name} in {diff}")
    frames = [recent_episodes(load_episodes(r), last_steps) for r in runs]
    per_run = [episode_scores(f, metric) for f in frames]
    if len(per_run) > 1 and all(set(d) == set(per_run[0]) for d in per_run):
        _, scores = align(per_run)
    else:
        scores = [v for d in per_run for v in d.values()]
    est = bootstrap_mean(scores, n_boot=n_boot)
    protocol = replace(protocols[0], seeds=tuple(s for p in protocols for s in p.seeds))
    return ResultRecord(label, "train", metric, est.mean, est.lo, est.hi, est.level, est.n_questions,
                        sum(len(f) for f in frames), protocol,
                        {"runs": [r.name for r in runs], "n_seeds": est.n_seeds, "last_steps": last_steps})


def protocol_table(records: Iterable[ResultRecord]) -> pd.DataFrame:
    """One row per record: label, source, metric, value, CI and every protocol field (to see what differs)."""
    rows = [{"label": r.label, "source": r.source, "metric": r.metric, "mean": r.mean, "lo": r.lo, "hi": r.hi,
             "questions": r.questions, "episodes": r.episodes, **r.protocol.to_dict()} for r in records]
    return pd.DataFrame(rows)


def compare(records: Iterable[ResultRecord], rows: str = "label", columns: str = "source",
            allow_mixed: bool = False) -> pd.DataFrame:
    """A results table: one row per value of `rows` (a record or protocol field), one column group
    (mean, lo, hi) per value of `columns`. Refuses (ValueError naming the fields and their values) to put
    records measured differently into one column — another metric, question file (sha256) or corpus
    (index fingerprint), `igpo.protocol.STRICT_FIELDS` — unless `allow_mixed=True`. Protocol fields shared
    by all records are in `table.attrs["protocol"]`, the others' names in `table.attrs["differs"]`."""
    records = list(records)
    if not records:
        raise ValueError("compare: no records")
    by_col: dict[Any, list[ResultRecord]] = {}
    for r in records:
        by_col.setdefault(r.value_of(columns), []).append(r)
    problems = []
    for col, recs in by_col.items():
        for name in STRICT_FIELDS:
            values = sorted({str(r.value_of(name)) for r in recs})
            if len(values) > 1:
                who = "; ".join(f"{r.label}: {r.value_of(name)}" for r in recs)
                problems.append(f"column {col!r}: {name} differs ({who})")
    if problems and not allow_mixed:
        raise ValueError("compare: results measured differently in one column (pass allow_mixed=True to "
                         "show them anyway):\n  " + "\n  ".join(problems))
    cells: dict[tuple[Any, Any], ResultRecord] = {}
    for r in records:
        key = (r.value_of(rows), r.value_of(columns))
        if key in cells:
            raise ValueError(f"compare: two records for {rows}={key[0]!r}, {columns}={key[1]!r}; "
                             "label them apart or pick other rows/columns")
        cells[key] = r
    row_keys = list(dict.fromkeys(k[0] for k in cells))
    col_keys = list(by_col)
    data = {(c, stat): [getattr(cells[(rk, c)], stat) if (rk, c) in cells else math.nan for rk in row_keys]
            for c in col_keys for stat in ("mean", "lo", "hi")}
    table = pd.DataFrame(data, index=pd.Index(row_keys, name=rows))
    table.columns = pd.MultiIndex.from_tuples(table.columns, names=[columns, "stat"])
    protocols = [r.protocol.to_dict() for r in records]
    shared = {k: v for k, v in protocols[0].items() if all(p[k] == v for p in protocols)}
    table.attrs["protocol"] = shared
    table.attrs["differs"] = sorted(set(protocols[0]) - set(shared))
    if problems:
        table.attrs["mixed"] = problems
    return table


# ---- turn credit -------------------------------------------------------------------------------------
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


# ---- helpers --------------------------------------------------------------------------------------
def _episode_row(i: int, rec: dict[str, Any]) -> dict[str, Any]:
    turns = rec["turns"]
    rewards = [_num(t.get("reward")) for t in turns]
    row = {k: v for k, v in rec.items() if k != "metrics"}
    row.update({
        "episode": i, "turns": turns, "n_turns": len(turns),
        "n_searches": sum(t.get("kind") == "search" for t in turns),
        "outcome": rewards[-1] if rewards else math.nan, "gains": rewards[:-1],
        "advantages": [_num(t.get("advantage")) for t in turns],
    })
    for k, v in (rec.get("metrics") or {}).items():
        row[f"metrics.{k}"] = v
    return row


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _as_run(run: Run | PathLike) -> Run:
    return run if isinstance(run, Run) else load_run(run)


def _tb_dir_of(run_or_dir: Run | PathLike) -> Path:
    if not isinstance(run_or_dir, Run):
        path = Path(run_or_dir).expanduser().resolve()
        if path.is_dir() and any(path.glob(EVENTS)):
            return path
        run_or_dir = load_run(path)
    if run_or_dir.tb_dir is None:
        raise NotARunError(f"{run_or_dir.path}: no TensorBoard event files ({EVENTS}) in the run directory")
    return run_or_dir.tb_dir


def _episodes_file(run_or_dir: Run | PathLike) -> Path:
    if not isinstance(run_or_dir, Run):
        path = Path(run_or_dir).expanduser().resolve()
        if path.is_file():
            return path
        if (path / "episodes.jsonl").is_file():
            return path / "episodes.jsonl"
        run_or_dir = load_run(path)
    dirs = (run_or_dir.tb_dir, _logger_dir(run_or_dir.path, run_or_dir.config), run_or_dir.path)
    places = list(dict.fromkeys(d / "episodes.jsonl" for d in dirs if d is not None))
    for p in places:
        if p.is_file():
            return p
    raise NotARunError(f"{run_or_dir.path}: no episodes.jsonl (looked at {', '.join(map(str, places))}); "
                       "training writes it with callbacks.episodes, eval.py at the run root")


def _logger_dir(path: Path, config: DictConfig) -> Path:
    """Where the TensorBoard logger of `config` writes inside the run directory `path` (`<run>/tb`)."""
    tb = OmegaConf.select(config, "logger.tensorboard", default=None) or {}
    version = tb.get("version")
    return path / str(tb.get("name") or "tb") / ("" if version is None else str(version))


def _find_tb_dir(path: Path, config: DictConfig) -> Path | None:
    guess = _logger_dir(path, config)
    if guess.is_dir() and any(guess.glob(EVENTS)):
        return guess
    hits = sorted({p.parent for p in path.rglob(EVENTS)}, key=lambda p: (len(p.parts), str(p)))
    return hits[0] if hits else None


def _replace_hydra_refs(node: Any, hydra: dict[str, Any]) -> Any:
    """`${hydra:a.b}` → the value at a.b in the run's hydra.yaml (left as is when it has none)."""
    if isinstance(node, dict):
        return {k: _replace_hydra_refs(v, hydra) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_hydra_refs(v, hydra) for v in node]
    if isinstance(node, str) and "${hydra:" in node:
        def sub(m: re.Match[str]) -> str:
            value: Any = hydra
            for part in m.group(1).split("."):
                value = value.get(part) if isinstance(value, dict) else None
            return m.group(0) if value is None or isinstance(value, dict | list) else str(value)

        return _HYDRA_REF.sub(sub, node)
    return node


def _parse_overrides(path: Path) -> dict[str, str]:
    items = _load_yaml(path) if path.is_file() else []
    out = {}
    for item in items or []:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def _load_yaml(path: Path) -> Any:
    if not path.is_file():
        return {}
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _corpus_texts(path: Path) -> dict[str, str]:
    from igpo.retriever.corpus import iter_corpus

    return {d.id: f"{d.title} {d.text}" for d in iter_corpus(path)}


def _natural_key(path: Path) -> list[Any]:
    return [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in path.parts]
