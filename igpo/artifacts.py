"""Offline assets, built by igpo itself and cached by content: the synthetic world, a tokenizer and
tiny Qwen2 trained on its texts, and (optionally) the SFT warm-start model.

Each artifact lives in `<root>/<kind>-<hash of everything that determines it>/`, is written to a
temporary directory and renamed when complete, and is reused when the same configuration asks
for it again (a second `make demo` skips straight to RL).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from igpo.io import atomic_write

log = logging.getLogger(__name__)
ARTIFACT_VERSION = 1  # bump when the code that builds an artifact changes its output


def content_key(*parts: Any) -> str:
    blob = json.dumps([ARTIFACT_VERSION, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def prepare_synthetic(
    root: str | Path,
    world: dict | None = None,
    tokenizer: dict | None = None,
    model: dict | None = None,
    sft: dict | None = None,
    oracle: dict | None = None,
    seed: int = 0,
    tokenizer_texts: int = 3000,
) -> dict[str, str]:
    """Build (or reuse) the world, the tiny model and optionally the SFT model; return asset paths:
    model, corpus, train_questions, val_questions, heldout_questions (IGPO-format parquet files)."""
    from igpo.data.world import WorldConfig, build_world, ensure_world

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    wcfg = WorldConfig(**dict(world or {}))
    files = ensure_world(wcfg, root)
    tok_cfg, model_cfg = dict(tokenizer or {}), dict(model or {})
    base_key = content_key("tiny", files.root.name, tok_cfg, model_cfg, seed, tokenizer_texts)
    base_dir = root / f"tiny-{base_key}"
    built_world = None
    if not (base_dir / "config.json").exists():
        from igpo.data.oracle import tokenizer_corpus
        from igpo.models.tiny import build_tiny

        built_world = build_world(wcfg)
        texts = tokenizer_corpus(built_world, tokenizer_texts, seed=seed)
        log.info("building tiny model %s", base_dir)
        build_tiny(base_dir, texts, vocab_size=tok_cfg.get("vocab_size", 2048), seed=seed, **model_cfg)
    model_dir = base_dir
    if sft:
        sft_key = content_key("sft", base_key, dict(sft), dict(oracle or {}))
        model_dir = root / f"sft-{sft_key}"
        if not (model_dir / "config.json").exists():
            _build_sft(base_dir, model_dir, files, built_world or build_world(wcfg), dict(sft), dict(oracle or {}),
                       seed)
    return {
        "model": str(model_dir), "corpus": str(files.corpus), "train_questions": str(files.parquet["train"]),
        "val_questions": str(files.parquet["validation"]), "heldout_questions": str(files.parquet["heldout"]),
    }


def _build_sft(base_dir: Path, out_dir: Path, files, world, sft: dict, oracle: dict, seed: int) -> None:
    from transformers import AutoTokenizer

    from igpo.data.oracle import OracleConfig, OracleStats, oracle_dataset
    from igpo.policy import LoraSettings, OptimSettings
    from igpo.retriever.bm25 import BM25Retriever
    from igpo.sft import run_sft

    t0 = time.perf_counter()
    ocfg = OracleConfig(**oracle)
    retriever = BM25Retriever(files.corpus)
    retriever.setup()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    stats = OracleStats()
    episodes = oracle_dataset(world.questions["train"], world, retriever, tokenizer, cfg=ocfg,
                              samples_per_question=int(sft.get("samples_per_question", 2)), seed=seed, stats=stats)
    retriever.close()
    log.info("SFT data: %d oracle trajectories in %.1fs", len(episodes), time.perf_counter() - t0)
    lora = LoraSettings(**sft["lora"]) if sft.get("lora") else LoraSettings(enabled=False)
    optim = OptimSettings(lr=float(sft.get("lr", 2e-3)), betas=(0.9, 0.95), weight_decay=0.01)
    out, train_stats = run_sft(
        base_dir, episodes, out_dir, lora=lora, optim=optim, batch_size=int(sft.get("batch_size", 16)),
        max_steps=int(sft.get("max_steps", 100000)), max_seconds=sft.get("max_seconds"),
        warmup_steps=int(sft.get("warmup_steps", 30)), seed=seed, autocast_bf16=bool(sft.get("bf16", True)),
        log_dir=out_dir.with_name(out_dir.name + ".logs"),
    )
    manifest = {"trajectories": len(episodes), "oracle": dataclasses.asdict(stats), "sft": train_stats,
                "data_seconds": time.perf_counter() - t0}
    atomic_write(out / "sft_manifest.json", json.dumps(manifest, indent=1, default=str))
