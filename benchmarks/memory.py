"""Peak memory of one policy update on the Qwen2.5-0.5B-shaped model (vocabulary 151,936), chunked vs full logits.

Each variant runs in its own subprocess (so peaks do not mix): load the model with LoRA (r=16, the
experiments' setting) and gradient checkpointing (as the GPU experiments; `--no-grad-ckpt` keeps every
layer's activations, which then dominate the peak), take one forward + backward of the PPO loss over
one sequence of `--tokens` tokens with bf16 autocast, and report the peak resident memory above the level
right after loading
(on a GPU: torch.cuda.max_memory_allocated above the loaded level). Variants:
  full      logits for every position ([1, L, V] fp32 + softmax copies), then the log-probs (the first round)
  chunked   igpo.algorithm.logprobs: the head and log-softmax in blocks of `--chunk` rows, each checkpointed,
            at the policy tokens only (`--policy-share` of the positions, ~25 % in search-agent trajectories)
  chunked_all  the same at every position (isolates the chunking from the masking)
Prints the prediction, a table and `memory_ratio_4k=<chunked/full at the largest length>`.

  python benchmarks/memory.py --tokens 2048 4096
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PREDICTION = """prediction (written before measuring):
  full logits at 4k tokens: 4096 x 151,936 x 4 B = 2.5 GB of fp32 logits, plus the bf16 copy, the log-softmax
  output and the entropy's softmax (each 1.2-2.5 GB) -> ~8 GB above the model, most of the update's peak
  chunked at 25 % policy tokens: one ~128 MiB fp32 logit block at a time; with gradient checkpointing the rest
  is one layer's recompute (sdpa's math path keeps [14, L, L] attention weights) -> ~0.2-0.3x of the full peak"""


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process: loading the model may peak higher."""
    Path("/proc/self/clear_refs").write_text("5")


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(variant: str, tokens: int, chunk: int, share: float, layers: int, grad_ckpt: bool) -> dict:
    import torch

    from igpo.algorithm.logprobs import token_logprobs_at
    from igpo.algorithm.loss import token_logprobs_and_entropy
    from igpo.models.causal_lm import LoraSettings, load_causal_lm
    from igpo.models.qwen import qwen25_05b_shaped

    model_dir = qwen25_05b_shaped(num_layers=layers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_causal_lm(str(model_dir), dtype="bfloat16", lora=LoraSettings(r=16, alpha=32),
                           gradient_checkpointing=grad_ckpt).to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151_000, (1, tokens), generator=g).to(device)
    att = torch.ones_like(ids)
    select = (torch.rand(ids.shape, generator=g) < share).to(device) if variant == "chunked" else att.bool()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        import gc

        gc.collect()
        _reset_peak()
        base = _status_mb("VmRSS")
    with torch.autocast(device, dtype=torch.bfloat16):
        if variant == "full":
            logits = model(input_ids=ids, attention_mask=att).logits
            lp, ent = token_logprobs_and_entropy(logits.float(), ids)
        else:
            lp, ent = token_logprobs_at(model, ids, att, select, with_entropy=True, chunk_size=chunk or None)
    mask = select.float()
    loss = -(lp * mask).sum() / mask.sum() - 0.001 * (ent * mask).sum() / mask.sum()
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _status_mb("VmHWM")
    return {"variant": variant, "tokens": tokens, "device": device, "base_mb": base, "peak_mb": peak,
            "update_mb": peak - base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--chunk", type=int, default=0, help="rows per logit block (0: the library default, ~128 MiB)")
    ap.add_argument("--policy-share", type=float, default=0.25)
    ap.add_argument("--layers", type=int, default=24, help="decoder layers (24 = the real 0.5B shape)")
    ap.add_argument("--no-grad-ckpt", action="store_true",
                    help="keep every layer's activations (the GPU experiments use gradient checkpointing)")
    ap.add_argument("--variants", nargs="+", default=["full", "chunked_all", "chunked"])
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = child(args.child[0], int(args.child[1]), args.chunk, args.policy_share, args.layers,
                    not args.no_grad_ckpt)
        print("RESULT " + json.dumps(res), flush=True)
        return
    print(PREDICTION, flush=True)
    rows = []
    for tokens in args.tokens:
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--child", variant, str(tokens), "--chunk", str(args.chunk),
                   "--policy-share", str(args.policy_share), "--layers", str(args.layers)]
            cmd += ["--no-grad-ckpt"] if args.no_grad_ckpt else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:  # e.g. killed for memory: record it, go on
                res = {"variant": variant, "tokens": tokens, "device": "?", "base_mb": float("nan"),
                       "peak_mb": float("nan"), "update_mb": float("nan"), "failed": proc.returncode}
                rows.append(res)
                print(f"{variant:12s} {tokens:6d} tokens: FAILED (exit {proc.returncode}: killed for memory?)")
                continue
            res = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
            rows.append(res)
            print(f"{variant:12s} {tokens:6d} tokens: +{res['update_mb']:,.0f} MB above the loaded model "
                  f"(peak {res['peak_mb']:,.0f} MB, {res['device']})", flush=True)
    print("\n| tokens | full | chunked (all positions) | chunked (policy tokens) | ratio |\n|---|---|---|---|---|")
    by = {(r["variant"], r["tokens"]): r["update_mb"] for r in rows}
    nan = float("nan")
    for t in args.tokens:
        f, a, c = by.get(("full", t), nan), by.get(("chunked_all", t), nan), by.get(("chunked", t), nan)
        print(f"| {t} | {f:,.0f} MB | {a:,.0f} MB | {c:,.0f} MB | {c / f:.2f}x |")
    top = max(args.tokens)
    print(f"grad_ckpt={not args.no_grad_ckpt} memory_ratio_{top // 1024}k="
          f"{by.get(('chunked', top), nan) / by.get(('full', top), nan):.3f}")


if __name__ == "__main__":
    main()
