"""Rollout-path benchmark: probe overhead (fast vs reference), vLLM vs transformers, sync share.

Runs in one process on the offline tiny model (or `--model DIR` on a GPU box). Prints predictions
first, then the measurements, and ends with exactly one line:
`probe_overhead=<a> reference_probe_overhead=<b> vllm_speedup=<c> sync_share=<d>` where "rollout" is
what a PPO step needs before the update without any probe: generation + the old-log-prob pass, and
 a = (generation + the packed pass, which yields the old log-probs AND all probes) / rollout,
 b = (rollout + the per-prefix reference probe, which cannot share that pass) / rollout,
 c = transformers time / vLLM time for the same per-turn prompt batches (same sampling settings),
 d = weight sync seconds / whole RL step seconds (rollout + probe + reference + update + sync).
Goals: a <= 1.10, c >= 1.5, d <= 0.02. Compare ratios measured in the same run only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PREDICTION = """prediction (written before measuring):
  a probe_overhead           ~1.05-1.3: the packed pass adds T short probe blocks to the old-log-prob
                               pass PPO runs anyway
  b reference_probe_overhead ~1.5-2.5: T separate prefix encodings per episode (the official cost)
  c vllm_speedup             ~1.5-1.8 (environment.md: 1.8x on the tiny model, bf16, 64x64 tokens)
  d sync_share               ~0.005: merged push is ~0.02 s vs a multi-second step"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model dir or hub id (default: the offline SFT tiny model, built if missing)")
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    print(PREDICTION, flush=True)

    from igpo.algorithm.probe import packed_probe, probe_inputs_from_episodes, reference_probe
    from igpo.data.questions import load_questions
    from igpo.generator.base import SamplingConfig
    from igpo.generator.hf import HFGenerator
    from igpo.generator.sync import MergedSync
    from igpo.generator.vllm import VLLMGenerator
    from igpo.policy import IGPOPolicy, LoraSettings
    from igpo.retriever.bm25 import BM25Retriever
    from igpo.rollout import RolloutConfig, RolloutRunner
    from igpo.run import compose_config, prepare_assets
    from igpo.types import RolloutBatch

    cfg = compose_config("demo")  # the demo's SFT warm start (built once, cached by content)
    prepare_assets(cfg)
    assets = cfg.assets
    model_dir = args.model or assets["model"]
    questions = load_questions(assets["train_questions"])[: args.questions]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=48)
    rcfg = RolloutConfig(max_turns=4, top_k=2, max_doc_tokens=64, max_context_tokens=1024)
    retriever = BM25Retriever(assets["corpus"])
    retriever.setup()
    vllm_gen = VLLMGenerator(model_dir, dtype=args.dtype, max_model_len=1024, seed=0)
    vllm_gen.setup()
    policy = IGPOPolicy(model_dir, lora=LoraSettings(r=16, alpha=32))
    policy.configure_model()
    policy.model.to(args.device)
    tok = vllm_gen.tokenizer
    runner = RolloutRunner(_Recorder(vllm_gen), retriever, tok, config=rcfg)

    rollout_s, fast_s, ref_s, plain_s, episodes_n, turn_batches = [], [], [], [], 0, []
    for rep in range(args.repeats + 1):  # the first repeat warms up (kernel compiles, caches)
        runner.generator.batches = []
        t0 = time.perf_counter()
        episodes, _ = runner.run(questions, args.group, sampling)
        t_roll = time.perf_counter() - t0
        batch = RolloutBatch.from_episodes(episodes, tok.pad_token_id).to(args.device)
        bounds, parts = probe_inputs_from_episodes(episodes, tok, runner.pieces, runner.protocol)
        model = policy.model.eval()
        with torch.no_grad():
            t0 = time.perf_counter()
            for s in range(0, len(episodes), 16):
                packed_probe(model, batch.input_ids[s: s + 16], batch.attention_mask[s: s + 16],
                             bounds[s: s + 16], parts[s: s + 16])
            t_fast = time.perf_counter() - t0
            t0 = time.perf_counter()
            reference_probe(model, batch.input_ids, batch.attention_mask, bounds, parts, batch_size=16)
            t_ref = time.perf_counter() - t0
            t0 = time.perf_counter()
            for s in range(0, len(episodes), 16):  # the old-log-prob pass alone (what PPO needs anyway)
                policy.forward_logprobs(batch.input_ids[s: s + 16], batch.attention_mask[s: s + 16],
                                        with_entropy=False)
            t_plain = time.perf_counter() - t0
        if rep:
            rollout_s.append(t_roll)
            fast_s.append(t_fast)
            ref_s.append(t_ref)
            plain_s.append(t_plain)
            episodes_n = len(episodes)
            turn_batches = list(runner.generator.batches)
    roll, fast, ref, plain = (statistics.median(x) for x in (rollout_s, fast_s, ref_s, plain_s))
    print(f"\ngeneration of {episodes_n} episodes (vLLM + bm25s): {roll:.2f}s; old-log-prob pass {plain:.2f}s; "
          f"packed pass (old log-probs + all probes) {fast:.2f}s; reference per-prefix probe {ref:.2f}s")

    # (c) the same per-turn prompt batches through both engines
    greedy = replace(sampling, temperature=0.0)
    t_vllm = _timed(lambda: [vllm_gen.generate(b, greedy) for b in turn_batches])
    hf = HFGenerator(model_dir, tok, dtype=args.dtype, device=args.device, batch_size=64)
    hf.setup()
    hf.generate(turn_batches[0][:2], greedy)  # warm-up
    t_hf = _timed(lambda: [hf.generate(b, greedy) for b in turn_batches])
    hf.close()
    print(f"same {len(turn_batches)} turn batches ({sum(map(len, turn_batches))} prompts, greedy): "
          f"vLLM {t_vllm:.2f}s, transformers {t_hf:.2f}s")

    # (d) one RL step's parts: update (fwd+bwd over the batch) and merged sync
    policy.model.train()
    opt = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=1e-5)
    t0 = time.perf_counter()
    for s in range(0, len(batch), 16):
        lp, _ = policy.forward_logprobs(batch.input_ids[s: s + 16], batch.attention_mask[s: s + 16])
        (-(lp * batch.loss_mask[s: s + 16]).sum()).backward()
    opt.step()
    t_update = time.perf_counter() - t0
    with torch.no_grad(), policy.reference():
        t0 = time.perf_counter()
        for s in range(0, len(batch), 16):
            policy.forward_logprobs(batch.input_ids[s: s + 16], batch.attention_mask[s: s + 16], with_entropy=False)
        t_refpass = time.perf_counter() - t0
    syncs = [MergedSync().sync(policy.model, vllm_gen, v) for v in range(1, 4)]
    t_sync = statistics.median(syncs)
    step = roll + fast + t_refpass + t_update + t_sync  # the packed pass replaces the old-log-prob pass
    print(f"RL step parts: rollout {roll:.2f}s, probe {fast:.2f}s, reference pass {t_refpass:.2f}s, "
          f"update {t_update:.2f}s, sync {t_sync:.3f}s -> step {step:.2f}s")
    vllm_gen.close()
    retriever.close()
    base = roll + plain
    a, b, c, d = (roll + fast) / base, (base + ref) / base, t_hf / t_vllm, t_sync / step
    print(f"\nmeasured: a={a:.3f} (goal <= 1.10)  b={b:.3f}  c={c:.2f} (goal >= 1.5)  d={d:.4f} (goal <= 0.02)")
    print(f"  against generation alone (no old-log-prob pass): packed {(roll + fast) / roll:.2f}x, "
          f"reference {(roll + ref) / roll:.2f}x -- on this CPU the trainer's fp32 forward, not vLLM, dominates")
    print(f"device={args.device} dtype={args.dtype} model={model_dir} threads={torch.get_num_threads()} "
          f"cpus={os.cpu_count()}")
    print(f"probe_overhead={a:.3f} reference_probe_overhead={b:.3f} vllm_speedup={c:.2f} sync_share={d:.4f}")


class _Recorder:
    """Wraps a generator and records the prompt batch of every call (for the vLLM/HF replay)."""

    def __init__(self, inner) -> None:
        self.inner, self.batches = inner, []

    def setup(self) -> None:
        self.inner.setup()

    def close(self) -> None:
        self.inner.close()

    def generate(self, prompts, sampling):
        self.batches.append([list(p) for p in prompts])
        return self.inner.generate(prompts, sampling)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
