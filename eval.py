"""Evaluate a search agent: `python eval.py data.path=FILE data.max_per_source=N [ckpt_path=CKPT]`.

Greedy rollouts with the configured generator and retriever; the per-source table (EM, F1, format-ok,
searches, turns) is printed and written with the metrics, the result records and the episodes into the
run directory (conf/eval.yaml, `igpo.evaluate.run_eval`)."""

import hydra
from omegaconf import DictConfig

from igpo.evaluate import POOLED, format_table, run_eval


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    summary = run_eval(cfg)
    print(format_table(summary))
    return summary.get(POOLED, {}).get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
