"""Benchmark of generation: batched ``DRDM.generate`` against the reference procedure.

Not a test. With the authors' 2D checkpoint (``--checkpoint``, default
``../shared/data/drdm_reference/cmr_recresacnet_reference.pth`` beside the repository, or
``$DRDM_REFERENCE_DIR``) and one 256 x 256 cardiac slice (``--image``, default the unlabelled
slice next to it; a synthetic image when absent), it generates ``--samples`` samples (t0 schedule
48, 48, 50, 50, ...; each recovered from step T-1: 80 network calls) in one process, three ways:

* **reference**: the authors' procedure: one sample at a time (batch 1), their forward fields
  (one composition per step, their units: ``integrator="reference"``), recovery on the image
  itself (no margin), fp32;
* **ours**: ``DRDM.load(checkpoint).generate(image, num_samples=N)`` as shipped: all samples in
  network batches of ``--batch-size``, drdm's forward fields (binary powers, calibrated scale),
  recovery on a canvas with a reflected margin (``generation.margin``), fp32 (and bf16 autocast
  with ``--bf16``, the default on CUDA);
* **ours, reference procedure batched**: the reference's fields and no margin, only batched: the
  speed-up of batching alone, and a check that batching changes nothing but float rounding (the
  largest difference of its final fields to the reference's is reported; 80 network calls in a
  feedback loop amplify rounding differences between batched and single-sample convolutions).

Same network, seeds and t0 everywhere. It prints and writes ``results/generation.md``:
samples/s, seconds per sample, speed-up, peak memory, folding of the final fields. The authors'
own code took about 8.8 s per 256 x 256 sample on 2 CPU threads. ``--checkpoint none`` uses a
randomly initialised network (smoke runs).

Usage::

    python experiments/benchmarks/generation.py [--quick] [--device cpu|cuda] [--samples N]
        [--batch-size N] [--checkpoint PATH|none] [--image PATH] [--bf16] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from benchmark_utils import (
    RESULTS_DIR,
    ROOT,
    command_line,
    default_device,
    machine_description,
    markdown_table,
    memory_note,
    peak_memory,
    reset_peak_memory,
    timed,
    write_atomic,
)

from drdm.deform import RandomDeformation
from drdm.generate import DRDM
from drdm.nets import RecResACNet

REFERENCE_DIR = Path(
    os.environ.get("DRDM_REFERENCE_DIR", ROOT.parent / "shared" / "data" / "drdm_reference")
)
DEFAULT_CHECKPOINT = REFERENCE_DIR / "cmr_recresacnet_reference.pth"
DEFAULT_IMAGE = REFERENCE_DIR / "cmr_unlabelled_162867.nii.gz"
AUTHORS_SECONDS_PER_SAMPLE = 8.8  # their code, 256 x 256, 2 CPU threads


def load_models(checkpoint: str, size: int, device: str, schedule: dict) -> tuple[DRDM, DRDM]:
    """``(reference, ours)`` sharing one network: ``ours`` as shipped (``DRDM.load``), and the
    authors' procedure: their forward fields (``RandomDeformation``'s defaults with
    ``integrator="reference"``, as in ``deformation.py``) and no margin.

    ``checkpoint="none"``: a random RecResACNet; ``schedule``: overrides of both forward processes
    for smoke runs (fewer steps, a smaller grid).
    """
    if checkpoint == "none":
        torch.manual_seed(0)
        net = RecResACNet(ndims=2, timesteps=schedule.get("timesteps", 80))
        ours = DRDM(net, RandomDeformation(ndims=2, **schedule), (size, size))
    else:
        ours = DRDM.load(checkpoint)
    authors_fields = RandomDeformation(
        ndims=ours.ndims, integrator="reference", **{"timesteps": ours.timesteps, **schedule}
    )
    reference = DRDM(ours.net, authors_fields, ours.image_size, margin=0)
    return reference.to(device), ours.to(device)


def load_image(path: str, size: int) -> tuple[torch.Tensor, str]:
    """A 2D float image ``[X, Y]`` and a description of where it came from."""
    if path != "none" and Path(path).is_file():
        import nibabel as nib

        data = torch.as_tensor(nib.load(path).get_fdata(dtype="float32"))
        if data.ndim == 3:
            data = data[..., data.shape[-1] // 2]
        if data.ndim != 2:
            raise ValueError(f"{path}: expected a 2D image or a 3D volume, got {tuple(data.shape)}")
        return data, Path(path).name
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 1, 8, 8, generator=generator)
    image = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    return image[0, 0], f"synthetic {size} x {size} image"


def generate(model: DRDM, image: torch.Tensor, samples: int, batch: int, precision: str, device):
    """All samples with network batches of ``batch``; batch 1 calls ``generate`` once per
    sample (the reference procedure). Returns ``(displacements, folding ratios)``."""
    model.batch_size = batch
    autocast = (
        torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
        if precision == "bf16"
        else nullcontext()
    )
    calls = [[k] for k in range(samples)] if batch == 1 else [list(range(samples))]
    with autocast:
        outputs = [
            model.generate(image, num_samples=samples, seed=0, sample_indices=indices)
            for indices in calls
        ]
    fields = torch.cat([out.displacement.float() for out in outputs])
    return fields, torch.cat([out.folding_ratio for out in outputs])


def run(args) -> tuple[list, str]:
    device = args.device
    reference_model, ours_model = load_models(args.checkpoint, args.size, device, args.schedule)
    image, source = load_image(args.image, args.size)
    image = image.to(device)
    # a short warm-up: first calls pay for lazy initialisation
    for model in (reference_model, ours_model):
        model.batch_size = 1
        model.generate(image, num_samples=1, seed=99, t0=1)

    batch = args.batch_size or args.samples
    configs = [("reference", reference_model, 1, "fp32")]
    configs += [("ours", ours_model, batch, precision) for precision in args.precisions]
    configs += [("reference batched", reference_model, batch, "fp32")]
    rows, reference_fields, reference_rate = [], None, None
    for method, model, size, precision in configs:
        baseline = reset_peak_memory(device)
        seconds, (fields, folding) = timed(
            lambda m=model, b=size, p=precision: generate(m, image, args.samples, b, p, device),
            device,
        )
        row = dict(
            t0=model.t0_for(args.samples),
            timesteps=model.timesteps,
            method=method,
            precision=precision,
            batch=size,
            margin=model.margin,
            seconds=seconds,
            samples_per_s=args.samples / seconds,
            peak_mib=peak_memory(device) - baseline,
            folding=float(folding.float().mean()),
        )
        if method == "reference":
            reference_fields, reference_rate = fields, row["samples_per_s"]
        elif method == "reference batched":
            row["max_difference"] = (fields - reference_fields).abs().max().item()
        row["speedup"] = row["samples_per_s"] / reference_rate
        rows.append(row)
        print(
            f"{describe(row):<58} batch {row['batch']:>3}  {row['samples_per_s']:.3f} "
            f"samples/s  {seconds / args.samples:.2f} s/sample  x{row['speedup']:.2f}  "
            f"peak {row['peak_mib']:.0f} MiB  folding {100 * row['folding']:.3f}%"
            + (
                f"  max |field - reference| {row['max_difference']:.2e} voxels"
                if "max_difference" in row
                else ""
            ),
            flush=True,
        )
    return rows, source


def describe(row: dict) -> str:
    if row["method"] == "reference":
        return "reference procedure (one sample at a time)"
    if row["method"] == "reference batched":
        return "ours, reference procedure batched"
    return f"ours, `DRDM.generate` {row['precision']}"


def write_report(rows: list, args, source: str, command: str) -> None:
    table = [
        [
            describe(row),
            str(row["batch"]),
            str(row["margin"]),
            f"{row['samples_per_s']:.3f}",
            f"{1 / row['samples_per_s']:.2f}",
            f"{row['speedup']:.2f}x",
            f"{row['peak_mib']:.0f}",
            f"{100 * row['folding']:.3f}%",
            f"{row['max_difference']:.1e}" if "max_difference" in row else "",
        ]
        for row in rows
    ]
    checkpoint = (
        "a randomly initialised RecResACNet"
        if args.checkpoint == "none"
        else f"`{Path(args.checkpoint).name}`"
    )
    lines = [
        "# DRDM generation benchmark",
        "",
        f"Generated by `{command}` (not a test).",
        "",
        f"Machine: {machine_description(args.device)}.",
        "",
        f"{args.samples} samples of one {args.size} x {args.size} image ({source}) with "
        f"{checkpoint}; t0 schedule {', '.join(map(str, rows[0]['t0']))}; every sample "
        f"recovered from step {rows[0]['timesteps'] - 1} ({rows[0]['timesteps']} network calls). "
        "*reference procedure*: the authors' procedure: one sample at a time (batch 1), their "
        'forward fields (one composition per step, their units: `integrator="reference"`), '
        "recovery on the image itself; *ours*: one `DRDM.generate(image, num_samples=N)` call "
        "with the shipped defaults: batched, drdm's forward fields, recovery on a canvas with a "
        "reflected margin (*margin*, voxels per side); *ours, reference procedure batched*: the "
        "reference's fields and no margin, batched (the gain of batching alone). Same network, "
        "seeds and t0. *folding*: mean fraction of the final fields' voxels with det J <= 0; "
        "*max diff*: largest difference of the batched reference procedure's final fields to the "
        "one-at-a-time ones (voxels; the 80-step feedback loop amplifies float rounding between "
        "batched and single-sample convolutions). Speed-up: samples/s "
        f"over the reference procedure's, same run; {memory_note(args.device)}. For scale: the "
        f"authors' code took about {AUTHORS_SECONDS_PER_SAMPLE} s per 256 x 256 sample on 2 CPU "
        "threads.",
        "",
        *markdown_table(
            [
                "method",
                "batch",
                "margin",
                "samples/s",
                "s/sample",
                "speed-up",
                "peak MiB",
                "folding",
                "max diff",
            ],
            table,
            "lrrrrrrrr",
        ),
        "",
    ]
    write_atomic(args.output, "\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: random net, T = 8, 32 px, 2 samples"
    )
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="path or 'none'")
    parser.add_argument("--image", default=str(DEFAULT_IMAGE), help="NIfTI path or 'none'")
    parser.add_argument("--size", type=int, default=256, help="image size without a checkpoint")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="default: all samples")
    parser.add_argument("--bf16", action="store_true", help="add a bf16 autocast row")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.device(args.device).type == "cuda"
    args.schedule = {}
    if args.quick:  # a smoke run: random net, 8 steps, small grids
        args.checkpoint, args.image, args.size = "none", "none", 32
        args.schedule = dict(timesteps=8, control_size=16, levels=2)
    elif args.checkpoint != "none" and not Path(args.checkpoint).is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {args.checkpoint} (pass --checkpoint PATH or 'none')"
        )
    # on a CPU one 256^2 sample takes about a minute per method: keep the default run short
    args.samples = args.samples or (32 if cuda else 2)
    args.precisions = ["fp32"] + (["bf16"] if args.bf16 or cuda else [])
    name = "generation_quick.md" if args.quick else "generation.md"
    args.output = args.output or RESULTS_DIR / name
    rows, source = run(args)
    command = command_line("generation.py", argv)
    write_report(rows, args, source, command)


if __name__ == "__main__":
    main(sys.argv[1:])
