"""Read training and eval run directories for notebooks: config, overrides, TensorBoard scalars, episodes.

A run directory is one with `.hydra/config.yaml` (what `train.py` and `eval.py` write, one per multirun
job under `multirun/<task>/<time>/<job_num>/`). Everything here only reads: scalars come from the
TensorBoard event files (`<run>/tb/`), sampled episodes from `episodes.jsonl` (`EpisodeLogger` writes it
next to the events, `eval.py` at the run root), eval summaries from `eval_metrics.json`. Functions take a
`Run` or a path, and return pandas DataFrames in long form so notebooks can pivot and plot them.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

CONFIG = Path(".hydra") / "config.yaml"
EVENTS = "events.out.tfevents.*"
EPISODE_COLUMNS = ["episode", "step", "question_id", "question", "answers", "data_source", "group", "finish",
                   "answer", "n_turns", "n_searches", "outcome", "gains", "advantages", "turns", "text"]
TURN_COLUMNS = ["episode", "step", "question_id", "group", "data_source", "finish", "answers", "index",
                "kind", "content", "docs", "probe_logprob", "reward", "advantage", "gain", "is_last"]
_HYDRA_REF = re.compile(r"\$\{hydra:([\w.]+)\}")
_ASSETS_LOG = re.compile(r"\] - assets: (\{.*\})\s*$")
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
    """

    path: Path
    overrides: dict[str, str]
    config: DictConfig = field(repr=False)
    tb_dir: Path | None
    job_num: int | None = None
    sweep_dir: Path | None = None

    @property
    def name(self) -> str:
        """A short label: `<sweep dir name>/<job_num>` for multirun jobs, the directory name otherwise."""
        return f"{self.sweep_dir.name}/{self.job_num}" if self.sweep_dir is not None else self.path.name

    def get(self, key: str, default: Any = None) -> Any:
        """A config value by dotted key (`algorithm.name`, `seed`), or `default` where absent or `???`."""
        return OmegaConf.select(self.config, key, default=default)


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
    return Run(path=path, overrides=_parse_overrides(path / ".hydra" / "overrides.yaml"), config=config,
               tb_dir=_find_tb_dir(path, config), job_num=None if job_num is None else int(job_num),
               sweep_dir=sweep_dir)


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
    """The asset paths a run used (model, corpus, question files). The saved config holds `???` where
    `prepare` filled them at run time, so the values `igpo.run.train` logged (`assets: {...}` in the run's
    `*.log`) fill the gaps; {} when neither has them."""
    run = _as_run(run)
    assets = OmegaConf.to_container(run.config.get("assets") or OmegaConf.create({}), resolve=False)
    out = {k: v for k, v in assets.items()
           if isinstance(v, str | type(None)) and v != "???" and "${" not in str(v)}
    for log in sorted(run.path.glob("*.log")):
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            m = _ASSETS_LOG.search(line)
            if m:
                out.update(ast.literal_eval(m.group(1)))
    return out


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
    from igpo.algorithm.rewards import normalize_answer, split_aliases

    texts = corpus if isinstance(corpus, Mapping) else _corpus_texts(Path(corpus))
    search = turns[(turns["kind"] == "search") & turns["gain"].notna()].copy()
    unknown = sorted({d for docs in search["docs"] for d in docs if d not in texts})
    if unknown:
        raise LookupError(f"gains_by_usefulness: {len(unknown)} doc id(s) not in the corpus, "
                          f"e.g. {unknown[:3]}")
    norm = {d: f" {normalize_answer(texts[d])} " for docs in search["docs"] for d in docs}
    aliases = [[a for a in map(normalize_answer, split_aliases(gold)) if a] for gold in search["answers"]]
    search["useful"] = [any(f" {a} " in norm[d] for d in docs for a in golds)
                        for docs, golds in zip(search["docs"], aliases, strict=True)]
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
