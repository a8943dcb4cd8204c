"""The body of ``src/eval.py``: evaluate a registration checkpoint on real pairs.

    python src/eval.py checkpoint=path/to/registration.ckpt [experiment=...] [key=value ...]

For every test pair the checkpoint predicts ``u`` with ``warp(moving, u) ~ fixed`` and this script
writes, under ``output_dir``:

* ``pairs/<id>/warped.nii.gz`` — the moving image warped onto the fixed grid,
* ``pairs/<id>/warped_label.nii.gz`` — the moving label warped (nearest), when labelled,
* ``pairs/<id>/displacement.nii.gz`` — the field as an ITK vector NIfTI (mm, LPS; see
  :mod:`drdm.data.displacement_files`), readable by ``sitk.DisplacementFieldTransform``,

all with the affine of the pair as fed to the model (``batch["affine"]``); plus ``metrics.csv``
(one row per pair: Dice, HD95, ASD, TRE, field error (whole grid and inside the labels), folding
ratio, SD log-Jacobian; units in
``drdm.metrics.pairwise``) and ``summary.csv`` (mean and std per metric).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig

from drdm.apps.train import check_run_config
from drdm.checkpoints import read_lightning_checkpoint
from drdm.data.displacement_files import write_displacement_field
from drdm.data.io import save_nifti
from drdm.deform import warp
from drdm.metrics.pairwise import PAIR_METRICS, pair_metrics
from drdm.models.registration import RegistrationModule
from drdm.utils.atomic import write_csv_atomic
from drdm.utils.instantiate import build
from drdm.utils.progress import progress_bar

log = logging.getLogger(__name__)


def load_registration(checkpoint: str | Path, device: torch.device) -> RegistrationModule:
    """A trained :class:`RegistrationModule` in eval mode (the field source is not rebuilt).

    Raises:
        FileNotFoundError / ValueError: no file, not a readable checkpoint, or the checkpoint
            of another model (a DRDM, a segmentation network): the message names the file.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"registration checkpoint not found: {path} (set checkpoint=...)")
    hparams = read_lightning_checkpoint(path).get("hyper_parameters") or {}
    if "mode" not in hparams or "ncc_window" not in hparams:
        kind = "a DRDM" if "deformation" in hparams else "not a registration"
        raise ValueError(
            f"{path} is {kind} checkpoint: src/eval.py evaluates registration networks "
            "(trained with experiment=default_registration or another registration experiment); "
            "a DRDM checkpoint generates samples with src/augment.py ckpt_path=..."
        )
    # evaluation never makes synthetic pairs: skip building the training field source
    model = RegistrationModule.load_from_checkpoint(path, map_location=device, mode="unsupervised")
    return model.eval().to(device)


def training_mode(checkpoint: str | Path) -> str:
    """The ``mode`` a checkpoint was trained with (from its stored hyper-parameters)."""
    state = read_lightning_checkpoint(checkpoint)
    return str(state.get("hyper_parameters", {}).get("mode", "unknown"))


def _safe_name(pair_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(pair_id)) or "pair"


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _volume(tensor: torch.Tensor) -> np.ndarray:
    """``[C=1, *S]`` -> ``[*S]`` array with a trailing unit axis for 2D (a 3D NIfTI slice)."""
    array = tensor[0].detach().cpu().numpy()
    return array[..., None] if array.ndim == 2 else array


def write_pair_outputs(
    folder: Path,
    batch: Mapping,
    index: int,
    displacement: torch.Tensor,
    warped: torch.Tensor,
    warped_label: torch.Tensor | None,
) -> None:
    """Write one pair's warped image, warped label and ITK field with the pair's affine."""
    affine = batch["affine"][index].detach().cpu().numpy().astype(np.float64)
    save_nifti(folder / "warped.nii.gz", _volume(warped[index]).astype(np.float32), affine)
    if warped_label is not None:
        label = _volume(warped_label[index]).astype(np.int16)
        save_nifti(folder / "warped_label.nii.gz", label, affine)
    write_displacement_field(
        folder / "displacement.nii.gz", displacement[index].detach().cpu().numpy(), affine
    )


def write_csv(path: Path, rows: Sequence[Mapping], columns: Sequence[str]) -> Path:
    """Write ``rows`` atomically (temporary file in the same folder + ``os.replace``)."""
    return write_csv_atomic(path, rows, columns)


def summarise(rows: Sequence[Mapping], metrics: Sequence[str]) -> list[dict]:
    """Mean, std and count of each metric over the pairs (NaN values skipped)."""
    summary = []
    for name in metrics:
        values = np.array([row[name] for row in rows if name in row], dtype=np.float64)
        values = values[np.isfinite(values)]
        mean = float(values.mean()) if values.size else math.nan
        std = float(values.std()) if values.size else math.nan
        summary.append({"metric": name, "mean": mean, "std": std, "count": int(values.size)})
    return summary


def _evaluate_batch(cfg, model, mode: str, batch: Mapping, rows: list, output_dir: Path) -> bool:
    """Metrics (appended to ``rows``) and outputs of one batch; ``True`` once ``max_pairs``
    pairs are done."""
    with torch.no_grad():
        displacement = model(batch["moving"], batch["fixed"])
    metrics = pair_metrics(displacement, batch, num_classes=cfg.num_classes)
    warped = warp(batch["moving"], displacement)
    warped_label = None
    if "moving_label" in batch:
        warped_label = warp(batch["moving_label"], displacement, mode="nearest")
    for index, pair_id in enumerate(batch["id"]):
        row = {"id": str(pair_id), "mode": mode}
        row.update({name: float(values[index]) for name, values in metrics.items()})
        rows.append(row)
        if cfg.write_outputs:
            folder = output_dir / "pairs" / _safe_name(pair_id)
            labelled = warped_label is not None and bool((batch["moving_label"][index] >= 0).all())
            write_pair_outputs(
                folder, batch, index, displacement, warped, warped_label if labelled else None
            )
    dice = metrics.get("dice")
    log.info(
        "pairs %s: done%s",
        ", ".join(map(str, batch["id"])),
        "" if dice is None else f", mean Dice {float(dice.float().mean()):.4f}",
    )
    return cfg.max_pairs is not None and len(rows) >= cfg.max_pairs


def evaluate(cfg: DictConfig) -> Path:
    """Run the evaluation described by ``cfg`` (see ``conf/eval.yaml``); return ``metrics.csv``."""
    check_run_config(cfg)
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    L.seed_everything(cfg.seed, workers=True)
    device = torch.device(cfg.device if cfg.device != "auto" else _default_device())
    model = load_registration(cfg.checkpoint, device)
    mode = training_mode(cfg.checkpoint)
    datamodule = build(cfg.data)
    datamodule.setup("test")
    loader = datamodule.test_dataloader()
    output_dir = Path(cfg.output_dir)
    rows: list[dict] = []
    total = len(loader.dataset)
    if cfg.max_pairs is not None:
        total = min(total, int(cfg.max_pairs))
    with progress_bar(total, "pair", enabled=bool(cfg.get("progress", True))) as bar:
        for batch in loader:
            if _evaluate_batch(cfg, model, mode, _to_device(batch, device), rows, output_dir):
                break
            bar.update(min(len(batch["id"]), total - bar.n))
    if not rows:
        raise ValueError("the test split has no registration pairs; check the data config")
    present = [name for name in PAIR_METRICS if any(name in row for row in rows)]
    csv_path = write_csv(output_dir / "metrics.csv", rows, ["id", "mode", *present])
    write_csv(
        output_dir / "summary.csv", summarise(rows, present), ["metric", "mean", "std", "count"]
    )
    for line in summarise(rows, present):
        print(f"{line['metric']:>16}: {line['mean']:.4f} +- {line['std']:.4f} (n={line['count']})")
    print(f"  per pair: {csv_path}; means: {output_dir / 'summary.csv'}")
    if cfg.write_outputs:
        print(
            f"  outputs: {output_dir / 'pairs'}/<pair>/warped.nii.gz, warped_label.nii.gz, "
            "displacement.nii.gz (ITK field, mm)"
        )
    return csv_path


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
