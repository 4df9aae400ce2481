"""Evaluation: greedy rollouts on a question file, metrics per data source, files in the run directory.

`run_eval(cfg)` (what `eval.py` runs) loads the questions (`data.path`, `data.max_per_source`, ...), builds
the same `RolloutDataModule` as training (so the same generator, retriever and rollout loop), optionally
loads a checkpoint's adapter into a policy built with the LoRA settings the checkpoint records
(`policy_from_checkpoint`) and pushes it to the generator with the configured weight sync, runs `samples`
episodes per question at `temperature` (0 = greedy), and writes `eval_table.md`, `eval_metrics.json` and
`episodes.jsonl` atomically, beside the run metadata (`resolved_config.yaml`, `versions.json`).
`summarize` and `format_table` are plain functions for notebooks. Per-episode metrics come from
`igpo.algorithm.rewards.episode_metrics` (the one definition). `eval_metrics.json` also holds one
`igpo.protocol.ResultRecord` per row and metric: the value with its bootstrap CI over questions and the
protocol (data file hash, corpus fingerprint, sampling, episodes, seed).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from igpo.algorithm.rewards import episode_metrics
from igpo.callbacks import episode_record
from igpo.data.questions import load_questions
from igpo.generator.sync import AdapterSync, NoSync
from igpo.io import atomic_write
from igpo.models.causal_lm import LoraSettings
from igpo.protocol import (
    MeasurementProtocol,
    ResultRecord,
    checkpoint_hparams,
    protocol_from_config,
    read_checkpoint,
    write_run_metadata,
)
from igpo.run import prepare_assets
from igpo.stats import bootstrap_mean, per_question
from igpo.types import Episode, Question

log = logging.getLogger(__name__)

EVAL_DATA_KEYS = ("path", "split", "data_sources", "max_per_source")  # eval.yaml's keys in `data`
POOLED, MACRO = "all", "macro"
COLUMNS = (  # (summary key, table header, scale, decimals)
    ("em", "EM", 100.0, 1), ("f1", "F1", 100.0, 1), ("format_ok", "format ok", 100.0, 1),
    ("searches", "searches/ep", 1.0, 2), ("turns", "turns/ep", 1.0, 2),
)
RECORD_METRICS = ("em", "f1")  # the metrics that get a ResultRecord (with a CI) per row
BOOTSTRAP_SAMPLES = 2000


# ---- metrics ---------------------------------------------------------------------------------------
def summarize(episodes: Iterable[Episode]) -> dict[str, dict[str, float]]:
    """Per data source (sorted), then "all" (every episode pooled) and, with two or more sources, "macro"
    (the unweighted mean of the source rows, like the paper's Avg column). Each row: `count` (episodes),
    `questions` (distinct question ids), and the mean of every `episode_metrics` value (em, f1 and
    format_ok as fractions in [0, 1]; searches and turns per episode)."""
    metrics: dict[str, list[dict[str, float]]] = {}
    qids: dict[str, set[str]] = {}
    for ep in episodes:
        source = ep.question.data_source
        if source in (POOLED, MACRO):
            raise ValueError(f"summarize: data source {source!r} (question {ep.question.id!r}) clashes with "
                             f"the summary row of the same name; rename it in the question file")
        metrics.setdefault(source, []).append(episode_metrics(ep))
        qids.setdefault(source, set()).add(ep.question.id)
    out = {s: _row(metrics[s], len(qids[s])) for s in sorted(metrics)}
    if not out:
        return out
    sources = list(out)
    out[POOLED] = _row([m for s in sources for m in metrics[s]], sum(len(qids[s]) for s in sources))
    if len(sources) > 1:
        keys = [k for k in out[sources[0]] if k not in ("count", "questions")]
        out[MACRO] = {"count": out[POOLED]["count"], "questions": out[POOLED]["questions"],
                      **{k: float(np.mean([out[s][k] for s in sources])) for k in keys}}
    return out


def _row(rows: list[dict[str, float]], questions: int) -> dict[str, float]:
    means = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return {"count": len(rows), "questions": questions, **means}


def result_records(
    episodes: Sequence[Episode], protocol: MeasurementProtocol, label: str,
    metrics: Iterable[str] = RECORD_METRICS, n_boot: int = BOOTSTRAP_SAMPLES,
) -> list[ResultRecord]:
    """One record per row of `summarize` (sources, "all", "macro") and metric: the mean over questions of
    each question's mean score (its samples averaged) with a percentile-bootstrap CI over questions
    (`igpo.stats.bootstrap_mean`). The macro row (unweighted mean of the source rows) gets no CI."""
    by_source: dict[str, list[tuple[str, dict[str, float]]]] = {}
    for ep in episodes:
        by_source.setdefault(ep.question.data_source, []).append((ep.question.id, episode_metrics(ep)))
    rows = {s: by_source[s] for s in sorted(by_source)}
    if rows:
        rows[POOLED] = [(f"{s}/{q}", m) for s in sorted(by_source) for q, m in by_source[s]]
    out = []
    for metric in metrics:
        means = []
        for source, items in rows.items():
            scores = per_question((q, m[metric]) for q, m in items)
            est = bootstrap_mean(list(scores.values()), n_boot=n_boot)
            out.append(ResultRecord.from_estimate(label, source, metric, est, len(items), protocol))
            if source != POOLED:
                means.append(est.mean)
        if len(means) > 1:
            pooled = rows[POOLED]
            out.append(ResultRecord(label, MACRO, metric, float(np.mean(means)), None, None, 0.95,
                                    len({q for q, _ in pooled}), len(pooled), protocol))
    return out


def format_table(summary: dict[str, dict[str, float]]) -> str:
    """A markdown table of `summarize`'s rows: EM, F1, format-ok in percent; searches, turns per episode."""
    head = ["source", "questions", "episodes", *(c[1] for c in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|:--" + "|--:" * (len(head) - 1) + "|"]
    for source, row in summary.items():
        cells = [source, str(int(row["questions"])), str(int(row["count"]))]
        for key, _, scale, decimals in COLUMNS:
            value = row.get(key)
            cells.append("—" if value is None else f"{value * scale:.{decimals}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- checkpoints -----------------------------------------------------------------------------------
def checkpoint_lora(hparams: dict[str, Any]) -> LoraSettings | None:
    """The LoRA settings a checkpoint's `hyper_parameters` record (`IGPOPolicy.save_hyperparameters`
    writes `lora`: enabled, r, alpha, dropout, target_modules); None for checkpoints without them."""
    lora = hparams.get("lora")
    if lora is None:
        return None
    known = {f.name for f in dataclasses.fields(LoraSettings)}
    unknown = sorted(set(lora) - known)
    if unknown:
        raise ValueError(f"checkpoint hyper_parameters.lora has unknown field(s) {unknown}")
    values = dict(lora)
    if "target_modules" in values:
        values["target_modules"] = tuple(values["target_modules"])
    return LoraSettings(**values)


def lora_differences(a: LoraSettings, b: LoraSettings) -> list[str]:
    """The names of the LoRA settings where `a` and `b` differ (target modules compared as tuples)."""
    def value(s: LoraSettings, name: str) -> Any:
        v = getattr(s, name)
        return tuple(v) if name == "target_modules" else v

    return [f.name for f in dataclasses.fields(LoraSettings) if value(a, f.name) != value(b, f.name)]


def load_adapter(policy: Any, ckpt_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Copy a train.py checkpoint's trainable weights (the LoRA adapter, or all weights with LoRA off) into
    `policy` (an `IGPOPolicy` after `configure_model()`). The checkpoint's own LoRA settings (its
    `hyper_parameters`) must equal the policy's: an adapter trained with r=8 does not go into a policy built
    with r=16 (the error names both; `policy_from_checkpoint` builds the policy the checkpoint needs). Then
    every trainable parameter must be in the file with its shape, and the file must hold nothing else.
    The file is unpickled (it holds optimizer and RNG states): load only checkpoints you trust."""
    path = Path(ckpt_path)
    if policy.model is None:
        raise RuntimeError("load_adapter: call policy.configure_model() first")
    ckpt = read_checkpoint(path)
    saved = checkpoint_lora(checkpoint_hparams(ckpt))
    if saved is not None and lora_differences(saved, policy.lora):
        diff = lora_differences(saved, policy.lora)
        raise ValueError(
            f"{path}: the adapter was trained with model.lora "
            f"{', '.join(f'{k}={getattr(saved, k)!r}' for k in diff)}; this policy has "
            f"{', '.join(f'{k}={getattr(policy.lora, k)!r}' for k in diff)} (build it with "
            "igpo.evaluate.policy_from_checkpoint, which uses the checkpoint's settings)")
    return _copy_weights(policy, ckpt["state_dict"], path, ckpt.get("global_step"))


def policy_from_checkpoint(model_cfg: DictConfig, ckpt_path: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    """Build the policy of `model_cfg` (the `model` config group) with the LoRA settings the checkpoint
    records, load its weights, and return (policy, info). Where the config's `model.lora` differs from the
    checkpoint's, the checkpoint wins (the adapter is what it is; r and alpha decide its shapes and its
    scale alpha/r) and a warning names both values. A checkpoint written without hyperparameters (before
    igpo saved them) is loaded with the config's settings, and a shape mismatch fails in `load_adapter`."""
    path = Path(ckpt_path)
    ckpt = read_checkpoint(path)
    hparams = checkpoint_hparams(ckpt)
    saved = checkpoint_lora(hparams)
    model_cfg = copy.deepcopy(model_cfg)  # keeps the parent: ${assets.model}, ${algorithm} still resolve
    if saved is not None:
        configured = instantiate(model_cfg.lora) if model_cfg.get("lora") is not None else LoraSettings()
        diff = lora_differences(saved, configured)
        if diff:
            log.warning("eval: %s was trained with model.lora %s; the config says %s: using the checkpoint's",
                        path, {k: getattr(saved, k) for k in diff}, {k: getattr(configured, k) for k in diff})
        with open_dict(model_cfg):
            model_cfg.lora = {"_target_": f"{LoraSettings.__module__}.LoraSettings",
                              **{**dataclasses.asdict(saved), "target_modules": list(saved.target_modules)}}
    trained_on, base = hparams.get("model"), model_cfg.get("model")
    if trained_on is not None and str(trained_on) != str(base):
        log.warning("eval: %s was trained on the base model %s; evaluating it on %s", path, trained_on, base)
    policy = instantiate(model_cfg)
    policy.configure_model()
    info = _copy_weights(policy, ckpt["state_dict"], path, ckpt.get("global_step"))
    info["lora"] = {k: v for k, v in dataclasses.asdict(policy.lora).items() if k != "target_modules"}
    info["lora_from"] = "checkpoint" if saved is not None else "config"
    info["base_model"] = None if trained_on is None else str(trained_on)
    return policy, info


def _copy_weights(policy: Any, state: dict[str, Any], path: Path, global_step: Any) -> dict[str, Any]:
    params = dict(policy.named_parameters())
    trainable = sorted(n for n, p in params.items() if p.requires_grad)
    unexpected = sorted(k for k in state if k not in params)
    missing = [n for n in trainable if n not in state]
    if unexpected or missing:
        raise ValueError(f"{path}: checkpoint does not match the policy (model.lora settings?): "
                         f"{len(unexpected)} unexpected key(s) {unexpected[:3]}, {len(missing)} missing "
                         f"trainable parameter(s) {missing[:3]}")
    for name, value in state.items():
        if tuple(value.shape) != tuple(params[name].shape):
            raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, the policy's is "
                             f"{tuple(params[name].shape)} (model.lora.r?)")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(dtype=params[name].dtype, device=params[name].device))
    return {"tensors": len(state), "global_step": global_step}


# ---- the run ---------------------------------------------------------------------------------------
def eval_questions(cfg: DictConfig) -> list[Question]:
    """The questions of `cfg.data.path`, filtered by split, data_sources, max_per_source (seed `cfg.seed`)."""
    data = cfg.data
    if data.get("path") is None:
        raise ValueError("eval: no question file; set data.path=FILE (.parquet or .jsonl)")
    sources = data.get("data_sources")
    if isinstance(sources, str):
        sources = [sources]
    questions = load_questions(
        str(data.path), split=data.get("split"),
        data_sources=None if sources is None else [str(s) for s in sources],
        max_per_source=data.get("max_per_source"), seed=int(cfg.seed),
    )
    if not questions:
        raise ValueError(f"eval: {data.path} has no questions after filtering")
    return questions


def run_eval(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Run the evaluation described by an eval.yaml config; write the files; return `summarize`'s rows."""
    import lightning as L

    prepare_assets(cfg)
    write_run_metadata(cfg.paths.output_dir, cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    questions = eval_questions(cfg)
    samples, temperature = int(cfg.get("samples", 1)), float(cfg.get("temperature", 0.0))
    if samples < 1 or temperature < 0:
        raise ValueError(f"eval: samples must be >= 1 and temperature >= 0, got {samples} and {temperature}")
    if samples > 1 and temperature == 0:
        log.warning("eval: %d samples per question at temperature 0 are %d copies of one greedy episode",
                    samples, samples)
    dm = instantiate(datamodule_config(cfg), train_questions=[], val_questions=None)
    ckpt_info: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        dm.setup("validate")
        if cfg.get("ckpt_path"):
            ckpt_info = _push_checkpoint(cfg, dm.generator)
        sampling = replace(dm.sampling, temperature=temperature, seed=int(cfg.seed))
        episodes = dm.run_episodes(questions, sampling, samples=samples)
    finally:
        dm.teardown("validate")
    seconds = time.perf_counter() - t0
    summary = summarize(episodes)
    data = cfg.data
    meta = {
        "questions_file": str(data.path), "split": data.get("split"),
        "data_sources": _plain(data.get("data_sources")), "max_per_source": data.get("max_per_source"),
        "questions": len(questions), "episodes": len(episodes),
        "samples": samples, "temperature": temperature, "seed": int(cfg.seed), "model": str(cfg.assets.model),
        "ckpt_path": cfg.get("ckpt_path"), **{f"ckpt_{k}": v for k, v in ckpt_info.items()},
        "generator": cfg.generator.get("_target_"), "retriever": cfg.retriever.get("_target_"),
        "sync": cfg.sync.get("_target_") if cfg.get("ckpt_path") else None, "seconds": round(seconds, 3),
    }
    protocol = protocol_from_config(cfg, data_path=str(data.path), temperature=temperature, samples=samples)
    label = Path(str(cfg.assets.model)).name + (f" + {cfg.ckpt_path}" if cfg.get("ckpt_path") else "")
    records = result_records(episodes, protocol, label)
    write_results(Path(cfg.paths.output_dir), summary, episodes, dm.tokenizer, meta, records)
    log.info("eval of %s: %d episodes in %.1fs, written to %s", meta["questions_file"], len(episodes),
             seconds, cfg.paths.output_dir)
    return summary


def datamodule_config(cfg: DictConfig) -> DictConfig:
    """`cfg.data` without eval.yaml's question keys (RolloutDataModule does not take them)."""
    data = copy.deepcopy(cfg.data)  # keeps the parent, so ${generator} etc. still resolve
    with open_dict(data):
        for key in EVAL_DATA_KEYS:
            data.pop(key, None)
    return data


def _push_checkpoint(cfg: DictConfig, generator: Any) -> dict[str, Any]:
    """Build the policy, load the checkpoint's adapter, and push it into the generator with `cfg.sync`."""
    sync = instantiate(cfg.sync)
    policy, info = policy_from_checkpoint(cfg.model, cfg.ckpt_path)
    shares = getattr(generator, "shares_weights", None)
    if isinstance(sync, NoSync) and not (callable(shares) and shares(policy.model)):
        raise ValueError("eval: ckpt_path is set, but sync=none would leave the generator on the base "
                         "weights; use sync=merged (full weights) or sync=adapter (vLLM with enable_lora)")
    rank = (getattr(generator, "engine_args", None) or {}).get("max_lora_rank")
    if isinstance(sync, AdapterSync) and policy.lora.enabled and rank is not None and policy.lora.r > int(rank):
        r = policy.lora.r  # vLLM would refuse the adapter later, with a less direct message
        raise ValueError(f"eval: {cfg.ckpt_path} holds a LoRA adapter of r={r}, but the generator serves "
                         f"adapters up to max_lora_rank={rank} (which follows model.lora.r in the config); "
                         f"set model.lora.r={r} or generator.max_lora_rank={r}")
    info["sync_s"] = round(float(sync.sync(policy.model, generator, 1)), 3)
    return info


# ---- files -----------------------------------------------------------------------------------------
def write_results(
    out_dir: Path, summary: dict[str, dict[str, float]], episodes: Sequence[Episode], tokenizer: Any,
    meta: dict[str, Any], records: Sequence[ResultRecord] = (),
) -> None:
    """eval_table.md, eval_metrics.json ({"summary", "meta", "records"}) and episodes.jsonl (one record per episode:
    `igpo.callbacks.episode_record` fields plus "sample" and "metrics"), each written to a temporary file
    in `out_dir` and renamed into place."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = f" (ckpt {meta['ckpt_path']})" if meta.get("ckpt_path") else ""
    where = f"{meta.get('questions_file')}{ckpt}"
    table = (f"# eval: {where}\n\nmodel `{meta.get('model')}`, {meta.get('samples')} sample(s) per question, "
             f"temperature {meta.get('temperature')}\n\n{format_table(summary)}\n")
    atomic_write(out_dir / "eval_table.md", [table])
    metrics = json.dumps({"summary": summary, "meta": meta, "records": [r.to_dict() for r in records]},
                         indent=1)
    atomic_write(out_dir / "eval_metrics.json", [metrics + "\n"])
    atomic_write(out_dir / "episodes.jsonl", (json.dumps(r, ensure_ascii=False) + "\n"
                                               for r in episode_records(episodes, tokenizer)))


def episode_records(episodes: Sequence[Episode], tokenizer: Any) -> Iterable[dict[str, Any]]:
    """JSON-able records: the training dump's fields (question, answers, turns with text, query and doc ids,
    decoded text), the sample index within its question, and the episode's metrics."""
    seen: dict[int, int] = {}
    for ep in episodes:
        record = episode_record(ep, tokenizer)
        record["sample"] = seen.get(ep.group, 0)
        seen[ep.group] = record["sample"] + 1
        record["metrics"] = episode_metrics(ep)
        yield record


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def __getattr__(name: str) -> Any:
    if name == "evaluate":  # the old name of run_eval (three functions were called `evaluate`)
        import warnings

        warnings.warn("igpo.evaluate.evaluate is now igpo.evaluate.run_eval", DeprecationWarning, stacklevel=2)
        return run_eval
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
