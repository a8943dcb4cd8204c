"""Train a DRDM: ``python src/train.py [experiment=acdc_drdm] [group=option] [key=value ...]``.

With no overrides it trains on the embedded default data on CPU for a few minutes and writes
checkpoints, logs and validation figures under ``logs/drdm/runs/<time>/``. ``hardware=ddp``,
``hydra/launcher=slurm`` and ``hparams_search=drdm_optuna`` scale it out (conf/hardware,
conf/hydra/launcher, conf/hparams_search).
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

# outputs go to <checkout>/logs wherever the script is started from (conf/paths/default.yaml)
os.environ.setdefault("DRDM_ROOT", str(Path(__file__).resolve().parents[1]))

from drdm.apps.train import optimized_metric, register_resolvers, summary_lines, train  # noqa: E402
from drdm.utils.errors import report_user_errors  # noqa: E402

# the resolvers conf/hardware uses, before Hydra composes the config
register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Fit; return ``cfg.optimized_metric`` (the value hyper-parameter sweeps optimise)."""
    with report_user_errors("train.py"):
        result = train(cfg)
        if result["trainer"].is_global_zero:
            print("\n".join(summary_lines(cfg, result)), flush=True)
        return optimized_metric(cfg, result)


if __name__ == "__main__":
    main()
