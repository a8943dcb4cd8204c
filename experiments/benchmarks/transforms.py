"""drdm's TorchIO transforms against the peers' random elastic deformations, in one run.

Not a test. Per 2D 256^2 image and per 3D 128^3 volume on the CPU (``--threads``, default 2):

* TorchIO ``RandomElasticDeformation`` (its defaults: 7 control points, 7.5 mm, 1 mm voxels);
* MONAI ``Rand2DElastic(spacing=30, magnitude_range=(5, 6))`` and
  ``Rand3DElastic(sigma_range=(5, 8), magnitude_range=(100, 200))`` (the settings of MONAI's
  2D / 3D transform tutorials), ``prob=1``;
* drdm ``RandomDiffeomorphic`` (its defaults: ``transform_2d`` / ``reference_3d``, steps 20..48;
  in 2D also on ``reference_2d``, the process ``transform_2d`` integrates on a coarser grid) and,
  in 2D, ``RandomDRDM`` with the authors' cardiac checkpoint (shipped generation settings).

For each: seconds per sample (one single-channel image, the transform's own call, mean over
``--samples`` calls after one warm-up), and the field's folding ratio (``det J <= 0``), mean and
max displacement (fraction of the image size, mean over the samples) measured on the interior
(10 % border left out, where the peers pad). The peers return no field: it is read back by
transforming the image's own voxel coordinates (one channel per axis) with linear interpolation,
which reproduces a linear function exactly; drdm's transforms report theirs (the subject's
record; a trained DRDM's field depends on the image, so it is measured on the image itself).
Also the inverse's residual of drdm's transform
(``subject.apply_inverse_transform()``).

Writes ``results/transforms.md`` / ``.json`` and ``results/transforms.png`` (2D: each method's
sample with a warped grid, folding in the title).

Usage::

    python experiments/benchmarks/transforms.py [--threads 2] [--samples 6] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torchio as tio
from benchmark_utils import RESULTS_DIR, ROOT, command_line, machine_description, write_atomic
from monai.transforms import Rand2DElastic, Rand3DElastic

from drdm.data.io import load_nifti
from drdm.deform import identity_grid, jacobian_determinant, warp
from drdm.transforms import RandomDiffeomorphic, RandomDRDM
from drdm.utils.atomic import save_figure_atomic

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "drdm_reference"
VOLUME = SHARED / "acdc_patient001_frame01.nii.gz"
CHECKPOINT = SHARED / "cmr_recresacnet_reference.pth"


# ------------------------------------------------------------------------------- inputs
def image_2d(size: int) -> torch.Tensor:
    """An ACDC slice resized to ``size^2`` in 0..1 (a synthetic pattern without ../shared)."""
    if VOLUME.is_file():
        volume, _ = load_nifti(VOLUME)
        plane = torch.from_numpy(volume[..., 5])[None, None]
        plane = torch.nn.functional.interpolate(plane, size=(size, size), mode="bilinear")[0, 0]
    else:
        grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, size)] * 2, indexing="ij"))
        plane = (grid.norm(dim=0) < 0.5).float() + 0.3 * torch.sin(8 * grid[0])
    return (plane - plane.min()) / (plane.max() - plane.min())


def image_3d(size: int) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, size)] * 3, indexing="ij"))
    return ((grid.norm(dim=0) < 0.6).float() + 0.2 * torch.sin(6 * grid[0])).clamp(0, 1)


# --------------------------------------------------------------------------- the methods
def torchio_call(transform):
    """Apply a TorchIO transform to ``[C, *S]`` (2D as ``[C, W, H, 1]``); returns ``[C, *S]``."""

    def call(data: torch.Tensor) -> torch.Tensor:
        planar = data.ndim == 3
        tensor = data[..., None] if planar else data
        out = transform(tio.Subject(image=tio.ScalarImage(tensor=tensor.clone())))["image"].data
        return out[..., 0] if planar else out

    return call


class DrdmCall:
    """A drdm transform applied as the peers are; ``field(image)`` reads its exact field from
    the subject's record instead of the coordinate trick: a trained DRDM's field depends on the
    image it sees (a coordinate ramp would give another field)."""

    def __init__(self, transform) -> None:
        self.timed = torchio_call(transform)
        self.transform = transform

    def __call__(self, data: torch.Tensor) -> torch.Tensor:
        return self.timed(data)

    def field(self, image: torch.Tensor) -> torch.Tensor:
        """``[1, n, *S]`` voxels (the subject's affine is the identity: mm are voxels)."""
        planar = image.ndim == 2
        tensor = image[None, ..., None] if planar else image[None]
        self.transform.record = True
        try:
            out = self.transform(tio.Subject(image=tio.ScalarImage(tensor=tensor.clone())))
        finally:
            self.transform.record = False
        field = out["drdm"]["field_mm"]
        return (field[..., 0] if planar else field)[None].float()


def monai_call(transform):
    def call(data: torch.Tensor) -> torch.Tensor:
        out = transform(data.clone())
        return out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)

    return call


def methods(ndims: int, quick: bool) -> dict:
    if ndims == 2:
        # zeros padding: a voxel read from outside is then visible in the field measurement
        monai = Rand2DElastic(
            spacing=(30, 30), magnitude_range=(5, 6), prob=1.0, padding_mode="zeros"
        )
        monai.set_random_state(0)
        found = {
            "TorchIO RandomElasticDeformation": torchio_call(tio.RandomElasticDeformation()),
            "MONAI Rand2DElastic": monai_call(monai),
            "drdm RandomDiffeomorphic": DrdmCall(RandomDiffeomorphic(record=False)),
            # the process it approximates at a tenth of the cost (4x finer integration grid)
            "drdm RandomDiffeomorphic (reference_2d)": DrdmCall(
                RandomDiffeomorphic(deformation="reference_2d", record=False)
            ),
        }
        if CHECKPOINT.is_file() and not quick:
            drdm = RandomDRDM(str(CHECKPOINT), record=False)
            found["drdm RandomDRDM (authors' checkpoint)"] = DrdmCall(drdm)
        return found
    monai = Rand3DElastic(
        sigma_range=(5, 8), magnitude_range=(100, 200), prob=1.0, padding_mode="zeros"
    )
    monai.set_random_state(0)
    return {
        "TorchIO RandomElasticDeformation": torchio_call(tio.RandomElasticDeformation()),
        "MONAI Rand3DElastic": monai_call(monai),
        "drdm RandomDiffeomorphic": DrdmCall(RandomDiffeomorphic(record=False)),
    }


def interior(shape) -> tuple[slice, ...]:
    return tuple(slice(n // 10, n - n // 10) for n in shape)


# positions are read back from coordinates offset by this much: a padded voxel (0) stands out
OFFSET = 1000.0


def field_statistics(call, image: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The field of one call on ``image`` and its interior statistics.

    Peers: read from the transformed coordinates; voxels whose position fell outside the image
    (padded) carry no field there. drdm: the exact field of its record. Either way voxels whose
    position lies outside the image are left out of the statistics and counted as ``outside``.
    """
    shape = tuple(image.shape)
    grid = identity_grid(shape)
    if isinstance(call, DrdmCall):
        displacement = call.field(image)
        moved = grid + displacement[0]
        inside = (moved >= 0) & (moved <= torch.tensor(shape).view(-1, *[1] * len(shape)) - 1)
        inside = inside.all(dim=0)
    else:
        moved = call(grid + OFFSET)
        inside = (moved > OFFSET - 0.5).all(dim=0) & (moved < OFFSET + max(shape)).all(dim=0)
        displacement = torch.where(inside, moved - OFFSET - grid, torch.zeros_like(grid))[None]
    inner = interior(shape)
    valid = inside[inner]
    determinant = jacobian_determinant(displacement)[0][inner][valid]
    length = displacement[0].norm(dim=0)[inner][valid]
    size = float(np.mean(shape))
    return {
        "folding": float((determinant <= 0).float().mean()),
        "mean_fraction": float(length.mean()) / size,
        "max_fraction": float(length.max()) / size,
        "outside": 1.0 - float(valid.float().mean()),
    }, displacement


def measure(name: str, call, image: torch.Tensor, samples: int) -> dict:
    call(image[None])  # warm-up (first-call allocations, a checkpoint's loading)
    seconds = []
    for _ in range(samples):
        start = time.perf_counter()
        call(image[None])
        seconds.append(time.perf_counter() - start)
    statistics = [field_statistics(call, image)[0] for _ in range(samples)]
    row = {
        "method": name,
        "seconds": float(np.mean(seconds)),
        "seconds_std": float(np.std(seconds)),
    }
    for key in ("folding", "mean_fraction", "max_fraction", "outside"):
        row[key] = float(np.mean([s[key] for s in statistics]))
    print(
        f"  {name}: {row['seconds']:.3f} s, folding {100 * row['folding']:.3f} %, mean "
        f"{row['mean_fraction']:.4f}, max {row['max_fraction']:.4f}",
        flush=True,
    )
    return row


def inverse_residual(image: torch.Tensor, samples: int) -> dict:
    """drdm's inverse: residual (voxels) and the image error after forward + inverse."""
    residuals, errors = [], []
    planar = image.ndim == 2
    tensor = (image[None, ..., None] if planar else image[None]).clone()
    for _ in range(samples):
        subject = tio.Subject(image=tio.ScalarImage(tensor=tensor.clone()))
        deformed = RandomDiffeomorphic()(subject)
        back = deformed.apply_inverse_transform()
        residuals.append(back["drdm"]["inverse_residual_mean"])
        inner = interior(tuple(image.shape))
        data = back["image"].data[0][..., 0] if planar else back["image"].data[0]
        errors.append(float((data - image)[inner].abs().mean()))
    return {
        "residual_mean_voxels": float(np.mean(residuals)),
        "image_error": float(np.mean(errors)),
    }


# ------------------------------------------------------------------------------- report
def report(data: dict, path: Path) -> None:
    lines = [
        "# drdm's transforms against the peers' random elastic deformations",
        "",
        f"Command: `{data['command']}`. Machine: {data['machine']}. Wall time "
        f"{data['wall_minutes']:.1f} min.",
        "",
        "Per sample: seconds for one single-channel image (mean over the samples after a "
        "warm-up); folding (`det J <= 0`), mean and max displacement as a fraction of the image "
        "size, on the interior (10 % border left out) and where the position read lies in the "
        "image (*read from outside*: the share of interior voxels whose content came from outside "
        "the image, i.e. padding). Peers' settings: TorchIO defaults; MONAI "
        "as in its 2D / 3D transform tutorials. drdm: `RandomDiffeomorphic()` defaults "
        "(`transform_2d` / `reference_3d`, steps 20..48).",
        "",
    ]
    for case in data["cases"]:
        lines += [
            f"## {case['name']}",
            "",
            "| method | s / sample | x fastest peer | folding | mean disp | max disp | "
            "read from outside |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        peers = [r["seconds"] for r in case["rows"] if not r["method"].startswith("drdm")]
        for row in case["rows"]:
            lines.append(
                f"| {row['method']} | {row['seconds']:.3f} | {min(peers) / row['seconds']:.2f} | "
                f"{100 * row['folding']:.3f} % | {row['mean_fraction']:.4f} | "
                f"{row['max_fraction']:.4f} | {100 * row['outside']:.2f} % |"
            )
        inverse = case["inverse"]
        lines += [
            "",
            f"drdm's inverse (`subject.apply_inverse_transform()`): residual "
            f"{inverse['residual_mean_voxels']:.2e} voxels (mean `|v + u o (id + v)|`), image "
            f"error after forward + inverse {inverse['image_error']:.4f} (intensities 0..1, "
            "interior).",
            "",
        ]
    lines.append("Figure: `transforms.png` (2D samples with a warped grid; folding in the titles).")
    write_atomic(path, "\n".join(lines) + "\n")


def figure(image: torch.Tensor, calls: dict, path: Path) -> None:
    shape = tuple(image.shape)
    grid = torch.zeros(shape)
    grid[::16, :] = 1
    grid[:, ::16] = 1
    panels = [("input", image, grid, None)]
    for name, call in calls.items():
        torch.manual_seed(1)
        statistics, displacement = field_statistics(call, image)
        warped = warp(image[None, None], displacement)[0, 0]
        lines = warp(grid[None, None], displacement)[0, 0]
        panels.append((name, warped, lines, statistics))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, (name, picture, lines, statistics) in zip(axes, panels, strict=True):
        ax.imshow(picture.T, cmap="gray", origin="lower")
        ax.imshow(np.ma.masked_less(lines.T.numpy(), 0.3), cmap="autumn", alpha=0.6, origin="lower")
        title = name.replace(" (", "\n(")
        for library in ("drdm", "TorchIO", "MONAI"):
            title = title.replace(f"{library} ", f"{library}\n")
        if statistics is not None:
            folding, mean = 100 * statistics["folding"], statistics["mean_fraction"]
            title += f"\nfolding {folding:.2f} %, mean {mean:.3f}"
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="64^2 / 32^3, 2 samples (smoke)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "transforms.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    sizes = (64, 32) if args.quick else (256, 128)
    samples = 2 if args.quick else args.samples
    cases = []
    for ndims, size in zip((2, 3), sizes, strict=True):
        image = image_2d(size) if ndims == 2 else image_3d(size)
        name = f"{ndims}D {size}^{ndims}"
        print(name, flush=True)
        calls = methods(ndims, args.quick)
        rows = [measure(method, call, image, samples) for method, call in calls.items()]
        cases.append({"name": name, "rows": rows, "inverse": inverse_residual(image, samples)})
        if ndims == 2:
            figure(image, calls, args.output.with_suffix(".png"))
    data = {
        "command": command_line("transforms.py", argv),
        "machine": machine_description(),
        "wall_minutes": (time.perf_counter() - started) / 60,
        "cases": cases,
    }
    write_atomic(args.output.with_suffix(".json"), json.dumps(data, indent=2) + "\n")
    report(data, args.output)


if __name__ == "__main__":
    main()
