"""A tiny trained DRDM checkpoint and NIfTI inputs for the generation tests (real files)."""

from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import torch

from drdm.data.io import save_nifti
from drdm.models import DRDMModule

SIZE = 32


def blob_volume(shape, seed):
    """A smooth bright blob with a darker ring: an image whose warps are easy to see."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    centre = rng.uniform(-0.2, 0.2, len(shape))
    radius = np.sqrt(sum((a - c) ** 2 for a, c in zip(axes, centre, strict=True)))
    image = np.exp(-4 * radius**2) * 100 + (radius < 0.35) * 50
    label = (radius < 0.6).astype(np.int16) + (radius < 0.35).astype(np.int16)
    return image.astype(np.float32), label


def tiny_drdm_checkpoint(folder: Path) -> Path:
    """A tiny 2D DRDM trained for two steps by a real Trainer and saved as a Lightning .ckpt.

    The U-Net starts near the identity, so the samples' fields stay close to the (unfolded) forward
    fields and their statistics are well defined -- unlike those of an untrained RecResACNet.
    """
    torch.manual_seed(0)
    net = {
        "_target_": "drdm.nets.UNet",
        "ndims": 2,
        "timesteps": 20,
        "channels": [8, 16],
        "blocks_per_level": 1,
        "time_dim": 16,
        "groups": 4,
        "recursions": 1,
    }
    schedule = {"_target_": "drdm.deform.RandomDeformation", "ndims": 2, "timesteps": 20}
    module = DRDMModule(net, schedule, image_size=[SIZE, SIZE], ndims=2, figure_every_n_epochs=0)
    images = torch.from_numpy(np.stack([blob_volume((SIZE, SIZE), s)[0] for s in range(4)]))
    loader = torch.utils.data.DataLoader([{"image": i[None] / 150} for i in images], batch_size=2)
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
        accelerator="cpu",
    )
    trainer.fit(module, loader)
    path = folder / "drdm.ckpt"
    trainer.save_checkpoint(path)
    return path


def write_inputs(folder: Path) -> Path:
    """A 3D stack with ``X_gt`` label (oblique, anisotropic affine) and a 2D image with labels/."""
    angle = 0.3
    affine = np.array(
        [
            [1.2 * np.cos(angle), -1.2 * np.sin(angle), 0.0, -20.0],
            [0.9 * np.sin(angle), 0.9 * np.cos(angle), 0.0, 15.0],
            [0.0, 0.0, 4.0, 7.5],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    volume, volume_label = blob_volume((SIZE, 28, 3), seed=1)
    save_nifti(folder / "stack.nii.gz", volume, affine)
    save_nifti(folder / "stack_gt.nii.gz", volume_label, affine)
    image, label = blob_volume((SIZE, SIZE), seed=2)
    save_nifti(folder / "slice.nii.gz", image, np.diag([0.8, 0.8, 1.0, 1.0]))
    save_nifti(folder / "labels" / "slice.nii.gz", label, np.diag([0.8, 0.8, 1.0, 1.0]))
    return folder


def output_files(folder: Path) -> dict[str, bytes]:
    """Relative path -> voxel bytes of every NIfTI output, plus the manifest rows."""
    found = {
        str(p.relative_to(folder)): np.asarray(nib.load(p).dataobj).tobytes()
        for p in sorted(folder.rglob("*.nii.gz"))
    }
    found["manifest"] = (folder / "manifest.csv").read_bytes()
    return found
