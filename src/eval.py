"""Evaluate a registration checkpoint on real pairs (Hydra, ``conf/eval.yaml``).

    python src/eval.py checkpoint=path/to/registration.ckpt [experiment=...] [key=value ...]

Writes per-pair warped images, labels and ITK fields plus ``metrics.csv`` and ``summary.csv``
(:mod:`drdm.apps.evaluate`, the body of this script).
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

# outputs go to <checkout>/logs wherever the script is started from (conf/paths/default.yaml)
os.environ.setdefault("DRDM_ROOT", str(Path(__file__).resolve().parents[1]))

from drdm.apps.evaluate import evaluate  # noqa: E402
from drdm.apps.train import register_resolvers  # noqa: E402
from drdm.utils.errors import report_user_errors  # noqa: E402

# the resolvers of conf/hardware (composed by conf/eval.yaml like conf/train.yaml)
register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    with report_user_errors("eval.py"):
        evaluate(cfg)


if __name__ == "__main__":
    main()
