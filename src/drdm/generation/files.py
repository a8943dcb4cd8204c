"""The body of ``src/augment.py``: DRDM samples of NIfTI files, with labels, fields and a manifest.

For each input ``X.nii.gz`` (a file, or every NIfTI in a folder except labels) and
``k = 0 .. num_samples-1`` it writes, all with the input's affine and atomically:

* ``image/X_k.nii.gz`` -- the sample (the input warped by the field),
* ``label/X_k.nii.gz`` -- the label warped with nearest neighbour (when ``X_gt.nii.gz`` or
  ``labels/X.nii.gz`` exists beside the input),
* ``field/X_k.nii.gz`` -- the displacement mapping the input to the sample, ITK layout
  (:mod:`drdm.fields`),
* one row in ``manifest.csv`` (input, k, t0, seeds, folding ratio, max / mean displacement in mm).

A sample is finished when its files exist and its manifest row is written; a re-run generates
only the unfinished ones, and since every sample draws its field from its own seed, the files
are the same as in an uninterrupted run.
"""

from __future__ import annotations

import csv
import logging
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from drdm.data.io import check_same_geometry, load_nifti, nifti_files, nifti_stem, save_nifti_like
from drdm.deform import displacement_to_world
from drdm.fields import write_displacement_field
from drdm.generation.sampler import DRDM, mix_seed
from drdm.utils.atomic import write_csv_atomic
from drdm.utils.progress import progress_bar

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "input",
    "k",
    "t0",
    "seed",
    "sample_seed",
    "folding_ratio",
    "repaired_ratio",
    "max_displacement_mm",
    "mean_displacement_mm",
    "image",
    "label",
    "field",
)
LABEL_SUFFIX = "_gt"


@dataclass
class InputCase:
    """One input image and its optional label."""

    image: Path
    label: Path | None

    @property
    def stem(self) -> str:
        return nifti_stem(self.image)


def find_label(image: Path) -> Path | None:
    """``X_gt.nii[.gz]`` beside ``X`` or ``labels/X.nii[.gz]``; ``None`` when there is none."""
    stem = nifti_stem(image)
    for folder, name in ((image.parent, stem + LABEL_SUFFIX), (image.parent / "labels", stem)):
        for suffix in (".nii.gz", ".nii"):
            candidate = folder / (name + suffix)
            if candidate.is_file():
                return candidate
    return None


def find_inputs(path: str | Path) -> list[InputCase]:
    """A NIfTI file, or the NIfTI files of a folder (labels ``*_gt`` excluded), with labels.

    Raises:
        FileNotFoundError: ``path`` does not exist or the folder holds no NIfTI image.
    """
    path = Path(path).expanduser()
    if path.is_file():
        images = [path]
    elif path.is_dir():
        images = [p for p in nifti_files(path) if not nifti_stem(p).endswith(LABEL_SUFFIX)]
        if not images:
            raise FileNotFoundError(f"no NIfTI images (*.nii.gz, *.nii) in input folder {path}")
    else:
        raise FileNotFoundError(f"input does not exist: {path}")
    cases = []
    for image in images:
        label = find_label(image)
        if label is not None:
            check_same_geometry(image, label)
        cases.append(InputCase(image, label))
    return cases


def _write_manifest(path: Path, rows: dict[tuple[str, int], dict]) -> None:
    """Rewrite ``manifest.csv`` atomically, rows sorted by (input, k)."""
    write_csv_atomic(path, [rows[key] for key in sorted(rows)], MANIFEST_COLUMNS, "raise")


def read_manifest(path: Path) -> dict[tuple[str, int], dict]:
    """Rows of an existing ``manifest.csv`` keyed by (input stem, k); empty if absent."""
    if not path.is_file():
        return {}
    with open(path, newline="") as stream:
        return {(row["input"], int(row["k"])): row for row in csv.DictReader(stream)}


def _remove_stale_temporaries(folders: Sequence[Path]) -> None:
    """Temporary files of an interrupted run (``.<name>.*``) would otherwise stay behind."""
    for folder in folders:
        if folder.is_dir():
            for stale in folder.glob(".*"):
                if stale.is_file():
                    stale.unlink()


def _outputs(output_dir: Path, stem: str, k: int, labelled: bool) -> dict[str, Path | None]:
    name = f"{stem}_{k}.nii.gz"
    return {
        "image": output_dir / "image" / name,
        "label": output_dir / "label" / name if labelled else None,
        "field": output_dir / "field" / name,
    }


def _finished(paths: dict[str, Path | None], row: dict | None) -> bool:
    return row is not None and all(p is None or p.is_file() for p in paths.values())


def _array_mode(array: np.ndarray, drdm: DRDM, path: Path) -> np.ndarray:
    """Squeeze a trailing singleton 4th axis and check the dimensionality against the model."""
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (drdm.ndims == 3 and array.ndim != 3):
        raise ValueError(
            f"{path}: a {drdm.ndims}D model needs a "
            f"{'3D volume' if drdm.ndims == 3 else '2D image or 3D volume'}, "
            f"got shape {list(array.shape)}"
        )
    return array


def sample_blocks(num_samples: int, samples_per_call: int) -> list[list[int]]:
    """Fixed groups of sample indices ``k`` that go through the network together.

    The recovery chain amplifies float rounding, and convolution kernels round differently for
    different batch compositions, so a sample is only reproducible bit for bit when it is
    generated with the same companions. Blocks ``[0, n), [n, 2n), ...`` are the unit of work:
    a resumed run regenerates a whole block and writes only its missing samples.
    """
    n = max(1, int(samples_per_call))
    return [list(range(start, min(start + n, num_samples))) for start in range(0, num_samples, n)]


def pending_samples(
    case: InputCase, output_dir: Path, manifest: dict[tuple[str, int], dict], num_samples: int
) -> set[int]:
    """The ``k`` of ``case`` whose files or manifest row are missing."""
    labelled = case.label is not None
    return {
        k
        for k in range(num_samples)
        if not _finished(_outputs(output_dir, case.stem, k, labelled), manifest.get((case.stem, k)))
    }


def augment_case(
    drdm: DRDM,
    case: InputCase,
    output_dir: Path,
    manifest: dict[tuple[str, int], dict],
    num_samples: int,
    seed: int,
    t0=None,
    slice_axis: int = 2,
    progress=None,
    pending: set[int] | None = None,
) -> int:
    """Generate the unfinished samples of one input, block by block (:func:`sample_blocks`),
    writing each block's files before the next is generated; returns how many were written.

    ``progress``: a tqdm-style bar, advanced by one per written sample; ``pending``: the
    unfinished ``k`` when the caller already found them (:func:`pending_samples`)."""
    stem = case.stem
    labelled = case.label is not None
    if pending is None:
        pending = pending_samples(case, output_dir, manifest, num_samples)
    if not pending:
        log.info("%s: all %d samples already done", stem, num_samples)
        return 0
    if t0 is not None and not np.isscalar(t0) and len(t0) != num_samples:
        raise ValueError(f"t0 has {len(t0)} values but num_samples is {num_samples}")
    image, affine = load_nifti(case.image, dtype=np.float32)
    image = _array_mode(image, drdm, case.image)
    label = None
    label_dtype = None
    if labelled:
        label_array, _ = load_nifti(case.label, dtype=np.float32)
        label = np.rint(_array_mode(label_array, drdm, case.label)).astype(np.int64)
        label_dtype = nib.load(str(case.label)).get_data_dtype()  # written back the same way
    # one seed per input name: results do not depend on the other inputs or their order
    input_seed = mix_seed(seed, zlib.crc32(stem.encode()))
    # network rows per sample: the slices of a stack for a 2D model, else one image
    rows = image.shape[slice_axis] if image.ndim > drdm.ndims else 1
    image_tensor = torch.from_numpy(image)
    label_tensor = None if label is None else torch.from_numpy(label)

    def write(result, row: int, k: int) -> None:
        """Sample ``k`` (row ``row`` of ``result``): image, label, field, then its manifest row."""
        paths = _outputs(output_dir, stem, k, labelled)
        field = result.displacement[row].cpu().double()  # [n, *S] voxels along the array axes
        # outputs copy the input's header geometry verbatim (sform/qform, codes, pixdim)
        sample = result.image[row, 0].cpu().numpy().astype(np.float32)
        save_nifti_like(paths["image"], sample, case.image)
        if labelled:
            warped_label = result.label[row, 0].cpu().numpy()
            save_nifti_like(paths["label"], warped_label.astype(label_dtype), case.image)
        write_displacement_field(paths["field"], field.numpy(), affine, like=case.image)
        world = displacement_to_world(field[None], torch.as_tensor(affine))[0]
        length = world.square().sum(0).sqrt()
        manifest[(stem, k)] = {
            "input": stem,
            "k": k,
            "t0": int(result.t0[row]),
            "seed": seed,
            "sample_seed": mix_seed(input_seed, 0, k),
            "folding_ratio": f"{float(result.folding_ratio[row]):.6g}",
            "repaired_ratio": f"{float(result.repaired_ratio[row]):.6g}",
            "max_displacement_mm": f"{float(length.max()):.6g}",
            "mean_displacement_mm": f"{float(length.mean()):.6g}",
            "image": str(paths["image"].relative_to(output_dir)),
            "label": str(paths["label"].relative_to(output_dir)) if labelled else "",
            "field": str(paths["field"].relative_to(output_dir)),
        }
        # the row is what marks the sample finished: written only after its files
        _write_manifest(output_dir / "manifest.csv", manifest)

    written = 0
    for block in sample_blocks(num_samples, drdm.images_per_call // rows):
        if pending.isdisjoint(block):
            continue
        started = time.perf_counter()
        t0_values = None
        if t0 is not None:
            t0_values = [int(t0)] * len(block) if np.isscalar(t0) else [int(t0[k]) for k in block]
        result = drdm.generate(
            image_tensor,
            label_tensor,
            num_samples=num_samples,
            t0=t0_values,
            seed=input_seed,
            sample_indices=block,
            slice_axis=slice_axis,
        )
        done = [k for k in block if k in pending]
        for row, k in enumerate(block):
            if k in pending:
                write(result, row, k)
                written += 1
                if progress is not None:
                    progress.update(1)
        log.info(
            "%s: samples %s written in %.1f s (%d of %d pending for this input)",
            stem,
            ", ".join(map(str, done)),
            time.perf_counter() - started,
            written,
            len(pending),
        )
    return written


def augment(
    ckpt_path: str | Path,
    input: str | Path,
    output_dir: str | Path,
    num_samples: int = 8,
    seed: int = 0,
    t0=None,
    slice_axis: int = 2,
    device: str = "auto",
    use_ema: bool = True,
    drdm_options: dict | None = None,
    drdm_defaults: dict | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Generate samples for every input; returns ``{"inputs": n, "generated": m, "skipped": s}``.

    ``drdm_options``: :class:`DRDM` settings (``None``: unset); ``drdm_defaults``: settings used
    where neither they nor the checkpoint set one (``DRDM.load``'s ``fallback``). ``progress``:
    a bar over the pending samples (ETA, current input) on stderr."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    cases = find_inputs(input)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    drdm = DRDM.load(ckpt_path, use_ema=use_ema, fallback=drdm_defaults, **(drdm_options or {})).to(
        device
    )
    output_dir = Path(output_dir).expanduser()
    folders = [output_dir / name for name in ("image", "label", "field")]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries([output_dir, *folders])
    manifest = read_manifest(output_dir / "manifest.csv")
    pending = [pending_samples(case, output_dir, manifest, num_samples) for case in cases]
    generated = 0
    with progress_bar(sum(map(len, pending)), "sample", enabled=progress) as bar:
        for case, unfinished in zip(cases, pending, strict=True):
            bar.set_postfix_str(case.stem)
            generated += augment_case(
                drdm, case, output_dir, manifest, num_samples, seed, t0, slice_axis, bar, unfinished
            )
    total = len(cases) * num_samples
    log.info(
        "%d inputs: %d samples generated, %d already done", len(cases), generated, total - generated
    )
    return {"inputs": len(cases), "generated": generated, "skipped": total - generated}
