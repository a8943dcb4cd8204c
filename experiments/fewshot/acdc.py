"""Few-shot segmentation on real cardiac MRI with the authors' DRDM: the paper's Table 2 at its
smallest (one ACDC volume, 1 or 2 labelled slices), with paired statistics over seeds.

One command (defaults: the shared ACDC volume and the authors' 2D cardiac checkpoint)::

    python experiments/fewshot/acdc.py [--seeds 0,1,2,3,4,5,6,7] [--n-labelled 1,2]
        [--strategies none,affine_elastic,bigaug,drdm_forward,drdm_offline] [--samples 32]
        [--epochs 100] [--jobs 2] [--output experiments/fewshot/results_acdc] [-- OVERRIDES ...]

1. **Slices.** Every labelled slice of the volume (``<volume>_gt``: 1 RV, 2 MYO, 3 LV) is
   resized to ``--size`` (bilinear; labels nearest), scaled to 0..1 and written as its own 2D
   NIfTI pair (the affine follows the resize) under ``--work``/slices: each slice is one subject
   and one group of ``conf/data/acdc_slices.yaml``.
2. **DRDM pairs.** ``src/augment.py`` with the DRDM checkpoint generates ``--samples`` samples per
   slice of the training pool (slices ``--pool``), the shipped generation settings (t0 from 48,
   rising by 2 every 2 samples), image and label warped by one field.
3. **Runs.** For every ``n`` of ``--n-labelled`` and every seed, one ``src/train.py -m
   experiment=acdc_slices_fewshot augmentation=<strategies>`` sweep (``--jobs`` at a time, one
   thread each): the labelled slices are fixed by (n, seed) in a balanced design (n = 1: pool
   slice ``seed mod len(pool)``; n = 2: the pairs of pool slices in turn), so every strategy of a
   seed trains on the same slices from the same initial weights. Validation slice ``s05`` chooses
   the checkpoint; test slices ``s02, s04, s06, s08`` are the same for every run.
   ``drdm_offline`` appends the DRDM pairs of the run's labelled slices only.
4. **Table.** ``experiments/fewshot/aggregate.py`` writes ``table.md`` (Dice, sensitivity,
   precision per structure and mean, HD95; paired differences per seed against ``none`` and
   DRDM against BigAug with bootstrap intervals and Wilcoxon p), ``runs.csv``, ``summary.csv``,
   ``plot.png``; ``run_info.md`` holds the commands, the machine and the wall times.

A re-run with the same ``--work`` resumes: finished slices, samples and sweeps are kept; a
strategy added later (``--strategies X --sweeps sweeps_X``) joins the same table.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from aggregate import RESULTS_FILE, aggregate, write_text_atomic  # noqa: E402
from run import QUIET, TRAIN, machine, run, shown  # noqa: E402

from drdm.data.io import load_nifti, save_nifti  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "drdm_reference"
AUGMENT = ROOT / "src" / "augment.py"
EXPERIMENT = "acdc_slices_fewshot"
STRATEGIES = "none,affine_elastic,bigaug,drdm_forward,drdm_offline"


def slice_stem(volume: Path, index: int) -> str:
    """``acdc_patient001_frame01.nii.gz``, 3 -> ``patient001_frame01_s03`` (the data's group)."""
    name = volume.name.split(".nii")[0]
    return f"{name.removeprefix('acdc_')}_s{index:02d}"


def prepare_slices(volume: Path, label: Path, folder: Path, size: int) -> list[str]:
    """Write every labelled slice (along the third voxel axis) as a ``size`` x ``size`` pair.

    Image: bilinear resize (``align_corners``), then min-max to 0..1 per slice (the range the
    DRDM samples and the networks use); label: nearest. The 2D affine keeps the slice's world
    position; its in-plane spacing grows by ``(n - 1) / (size - 1)``. Returns the stems written
    (or already there), in slice order.
    """
    # the project's reader: ACDC's sform has unit voxel sizes, its pixdim the true spacing
    image, volume_affine = load_nifti(volume)
    labels, _ = load_nifti(label, dtype=np.int16)
    if image.ndim != 3 or image.shape != labels.shape:
        raise ValueError(
            f"{volume} {image.shape} and {label} {labels.shape}: one 3D volume and its labels"
        )
    stems = []
    for index in range(image.shape[2]):
        if not (labels[..., index] > 0).any():
            continue
        stem = slice_stem(volume, index)
        stems.append(stem)
        if (folder / f"{stem}.nii.gz").is_file() and (folder / f"{stem}_gt.nii.gz").is_file():
            continue
        plane = torch.from_numpy(image[..., index])[None, None]
        resized = F.interpolate(plane, size=(size, size), mode="bilinear", align_corners=True)
        low, high = resized.min(), resized.max()
        resized = ((resized - low) / (high - low).clamp_min(1e-8))[0, 0]
        mask = torch.from_numpy(labels[..., index])[None, None].float()
        resized_label = F.interpolate(mask, size=(size, size), mode="nearest")[0, 0]
        affine = volume_affine.copy()
        affine[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, index]) + affine[:3, 3]
        for axis, count in enumerate(image.shape[:2]):
            affine[:3, axis] *= (count - 1) / (size - 1)
        save_nifti(folder / f"{stem}_gt.nii.gz", resized_label.numpy(), affine, dtype=np.int16)
        save_nifti(folder / f"{stem}.nii.gz", resized.numpy(), affine, dtype=np.float32)
    if not stems:
        raise ValueError(f"{label} has no labelled slice")
    return stems


def labelled_slices(pool: list[str], n: int, seed: int) -> list[str]:
    """The training slices of (n, seed): the ``n``-subsets of the pool in turn (balanced)."""
    subsets = list(itertools.combinations(pool, n))
    if not subsets:
        raise ValueError(f"--n-labelled {n} is larger than the pool ({len(pool)} slices)")
    return list(subsets[seed % len(subsets)])


def augment_command(args: argparse.Namespace, pool_dir: Path, pairs_dir: Path) -> list[str]:
    return [
        sys.executable,
        str(AUGMENT),
        f"ckpt_path={args.checkpoint}",
        f"input={pool_dir}",
        f"output_dir={pairs_dir}",
        f"num_samples={args.samples}",
        f"seed={args.drdm_seed}",
        "device=cpu",
        "progress=false",
        f"hydra.run.dir={pairs_dir.parent / 'augment_log'}",
    ]


def sweep_command(
    args: argparse.Namespace, slices: Path, pairs: Path, n: int, seed: int, train: list[str]
) -> tuple[list[str], Path]:
    sweep_dir = args.work / args.sweeps / f"n{n}_seed{seed}"
    command = [
        sys.executable,
        str(TRAIN),
        "-m",
        f"experiment={EXPERIMENT}",
        f"data.root={slices}",
        f"data.image_size=[{args.size},{args.size}]",
        f"seed={seed}",
        f"data.n_labelled={n}",
        f"data.train_repeats={max(8 // n, 1)}",
        f"data.split.train_ids=[{','.join(train)}]",
        f"data.split.val_ids=[{','.join(args.val)}]",
        f"data.split.test_ids=[{','.join(args.test)}]",
        f"augmentation={args.strategies}",
        f"offline_pairs={pairs}",
        f"torch_threads={args.threads}",
        f"trainer.max_epochs={args.epochs}",
        f"hydra.sweep.dir={sweep_dir}",
        *QUIET,
        *args.overrides,
    ]
    return command, sweep_dir


def finished(sweep_dir: Path, strategies: int) -> bool:
    return len(list(sweep_dir.rglob(RESULTS_FILE))) >= strategies


def names(text: str, volume: Path) -> list[str]:
    """``"3,5"`` -> the slice stems of slices 3 and 5."""
    return [slice_stem(volume, int(index)) for index in text.split(",") if index.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volume", type=Path, default=SHARED / "acdc_patient001_frame01.nii.gz")
    parser.add_argument("--label", type=Path, default=None, help="default: <volume>_gt")
    parser.add_argument(
        "--checkpoint", default=str(SHARED / "cmr_recresacnet_reference.pth"), help="the DRDM"
    )
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--pool", default="1,3,7,9", help="slices that may be labelled")
    parser.add_argument("--val", default="5", help="validation slices (checkpoint choice)")
    parser.add_argument("--test", default="2,4,6,8", help="test slices")
    parser.add_argument("--strategies", default=STRATEGIES)
    parser.add_argument("--n-labelled", default="1,2")
    parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7")
    parser.add_argument("--samples", type=int, default=32, help="DRDM samples per pool slice")
    parser.add_argument("--drdm-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=100, help="2 steps per epoch")
    parser.add_argument("--jobs", type=int, default=2, help="sweeps run at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per sweep")
    parser.add_argument("--work", type=Path, default=ROOT / "logs" / "fewshot_acdc")
    parser.add_argument(
        "--sweeps",
        default="sweeps",
        help="sweep folder under --work (another name adds strategies to a finished study)",
    )
    parser.add_argument("--output", type=Path, default=HERE / "results_acdc")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args(argv)
    if args.label is None:
        args.label = args.volume.with_name(args.volume.name.split(".nii")[0] + "_gt.nii.gz")
    for path in (args.volume, args.label):
        if not path.is_file():
            raise SystemExit(f"acdc.py: no such file {path} (--volume / --label)")
    if not Path(args.checkpoint).is_file() and args.checkpoint != "default":
        raise SystemExit(f"acdc.py: no such checkpoint {args.checkpoint} (--checkpoint)")
    for key in ("pool", "val", "test"):
        setattr(args, key, names(getattr(args, key), args.volume))
    args.work = args.work.resolve()
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    invocation = shlex.join(["python", "experiments/fewshot/acdc.py", *(argv or sys.argv[1:])])
    lines = ["# Few-shot on ACDC slices: how these results were made", ""]
    lines += [f"- Command: `{invocation}`", f"- Started: {stamp} UTC", f"- Machine: {machine()}"]

    slices = args.work / "slices"
    stems = prepare_slices(args.volume, args.label, slices, args.size)
    unknown = sorted(set(args.pool + args.val + args.test) - set(stems))
    if unknown:
        raise SystemExit(f"acdc.py: slices {unknown} are not labelled slices of {args.volume}")
    lines.append(
        f"- Data: `{args.volume.name}`, labelled slices {len(stems)}, resized to {args.size}^2; "
        f"pool {args.pool}, validation {args.val}, test {args.test}"
    )

    pairs = args.work / "drdm_pairs" / "samples"
    if "drdm_offline" in args.strategies.split(","):
        pool_dir = args.work / "drdm_pairs" / "pool"
        pool_dir.mkdir(parents=True, exist_ok=True)
        for stem in args.pool:
            for name in (f"{stem}.nii.gz", f"{stem}_gt.nii.gz"):
                link = pool_dir / name
                if not link.exists():
                    link.symlink_to(slices / name)
        command = augment_command(args, pool_dir, pairs)
        seconds = run(command, args.work / "drdm_pairs" / "augment.log", threads=2)
        lines.append(f"- DRDM pairs ({seconds / 60:.1f} min, 2 threads): `{shown(command)}`")

    jobs = []
    for n in (int(v) for v in args.n_labelled.split(",")):
        for seed in (int(v) for v in args.seeds.split(",")):
            train = labelled_slices(args.pool, n, seed)
            jobs.append(sweep_command(args, slices, pairs, n, seed, train))
    count = len(args.strategies.split(","))
    pending = [(c, d) for c, d in jobs if not finished(d, count)]

    def one(job: tuple[list[str], Path]) -> float:
        command, sweep_dir = job
        return run(command, sweep_dir / "stdout.log")

    sweep_started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        list(pool.map(one, pending))
    minutes = (time.perf_counter() - sweep_started) / 60
    lines.append(
        f"- Sweeps ({minutes:.1f} min, {len(pending)} of {len(jobs)} run now, {args.jobs} at a "
        f"time, {args.threads} thread each); the first: `{shown(jobs[0][0])}`"
    )
    # every sweep folder of the study: strategies added later under another --sweeps name too
    result = aggregate(sorted(args.work.glob("sweeps*")), args.output)
    total = (time.perf_counter() - started) / 60
    lines.append(f"- Total wall time: {total:.1f} min for {len(result['runs'])} runs")
    lines.append(f"- Run folders: `{shown([str(args.work)])}`")
    write_text_atomic(args.output / "run_info.md", "\n".join(lines) + "\n")
    print(result["table"])
    print(f"results in {args.output}")


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    main()
