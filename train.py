"""Train a search agent with IGPO: `python train.py` (offline defaults), overrides as Hydra allows,
e.g. `python train.py -m algorithm=igpo,grpo trainer.max_steps=20`."""

import hydra
from omegaconf import DictConfig

from igpo.run import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
