"""Generate DRDM samples of NIfTI images (Hydra, ``conf/augment.yaml``).

``python src/augment.py ckpt_path=PATH input=PATH output_dir=DIR num_samples=N seed=S``

``ckpt_path`` is a Lightning ``.ckpt`` or the authors' ``.pth``; ``input`` a NIfTI file or a
folder of them. Writes ``DIR/{image,label,field}/<stem>_<k>.nii.gz`` with the input's affine and
``DIR/manifest.csv`` and ``DIR/run.json``; re-running skips finished samples, and refuses a folder
holding another run's samples (other seed, checkpoint, settings or input content) unless
``overwrite=true``.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

os.environ.setdefault("DRDM_ROOT", str(Path(__file__).resolve().parents[1]))

from drdm.apps.augment import augment, summary_lines  # noqa: E402
from drdm.utils.errors import report_user_errors  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="augment")
def main(cfg: DictConfig) -> None:
    t0 = cfg.t0
    with report_user_errors("augment.py"):
        summary = augment(
            ckpt_path=cfg.ckpt_path,
            input=cfg.input,
            output_dir=cfg.output_dir,
            num_samples=cfg.num_samples,
            seed=cfg.seed,
            t0=OmegaConf.to_container(t0) if OmegaConf.is_list(t0) else t0,
            slice_axis=cfg.slice_axis,
            device=cfg.device,
            use_ema=bool(cfg.use_ema),
            progress=bool(cfg.progress),
            overwrite=bool(cfg.overwrite),
            drdm_options=OmegaConf.to_container(cfg.generation, resolve=True),
        )
    print("\n".join(summary_lines(cfg.output_dir, summary)))


if __name__ == "__main__":
    main()
