"""Train a DRDM: ``python src/train.py [experiment=acdc_drdm] [group=option] [key=value ...]``.

With no overrides it trains on the embedded default data on CPU for a few minutes and writes
checkpoints, logs and validation figures under ``logs/drdm/runs/<time>/``.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

# outputs go to <checkout>/logs wherever the script is started from (conf/paths/default.yaml)
os.environ.setdefault("DRDM_ROOT", str(Path(__file__).resolve().parents[1]))


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Fit; return the optimised metric (``val/loss``) for hyper-parameter sweeps."""
    from drdm.utils.training import train

    result = train(cfg)
    return result["metrics"].get("val/loss")


if __name__ == "__main__":
    main()
