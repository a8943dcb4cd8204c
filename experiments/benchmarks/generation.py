"""Benchmark of generation: few-step recovery chains, their quality, and the speed of the default.

Not a test. With the authors' 2D checkpoint (``--checkpoint``, default
``../shared/data/drdm_reference/cmr_recresacnet_reference.pth`` beside the repository, or
``$DRDM_REFERENCE_DIR``) and the shared ACDC volume with its labels (``--volume``; ``--slices``
picks the slices), it runs two parts in one process and writes ``results/generation.{md,json}``
and ``results/generation_samples.png``:

* **schedules** (``--part schedules``): every slice gets ``--samples`` samples (t0 48, 48, 50, 50,
  ...; same seeds for every row) from each recovery schedule in ``--schedules``. A schedule is
  ``START:CALLS[:RULE][@MARGIN][/BATCH][~PRECISION][+repair|-repair]``: the chain from ``T``
  (step T-1, the reference) or ``t0`` (t0-1), ``CALLS`` network calls (``all``: one per step),
  the rule for the skipped steps (``once``, ``repeat``, ``k_rec``, ``remaining`` or
  ``uncorrelated``, :mod:`drdm.generation.chain`), the margin, images per network call (default:
  the shipped ``batch_size``), the network's precision (``fp32`` or ``bf16``) and whether the
  final fields are smoothed where they fold (``fold_repair``); margin, precision and repair
  default to the shipped model's. Per row: network calls, samples/s, folding of the final
  fields (det J <= 0), the share of each field the repair changed, max / mean
  displacement as a fraction of the image, label Dice and image NCC of each sample against the
  original, and the distance of each final field to the same sample's field from the first
  schedule (the 80-step chain). The report picks the cheapest configuration (network calls x
  canvas pixels) whose folding stays < 1 % and whose other figures' means lie within the
  80-step chain's spread (its samples' mean +- one standard deviation), image by image.
  ``results/generation_samples.png`` shows ``--figure-samples`` samples of ``--figure-slice``
  with the first row's settings and the pick's (``--part figure`` redraws it from the JSON).
* **speed** (``--part speed``): ``--speed-samples`` samples of one slice, the authors' procedure
  (one sample at a time, 80 calls from T-1, their forward fields, no margin, the network in
  PyTorch's default NCHW layout as their code runs it; and the same on drdm's channels-last
  network) against the shipped default (``DRDM.load`` with ``conf/augment.yaml``'s
  ``generation`` options, its ``batch_size``) and each ``--speed-also`` schedule; samples/s and
  the ratios to both baselines, same run.

``--part`` re-runs one part and keeps the others' numbers from the JSON (``--report-only``:
rebuild the report). ``--quick``: a random network, T = 8, 32 px (smoke runs).

Usage::

    python experiments/benchmarks/generation.py [--part all|schedules|speed] [--threads N]
        [--slices 2,5,8] [--samples 16] [--schedules T:all@32-repair,T:8:once@0+repair,...]
        [--speed-samples 8] [--speed-also T:7:once@0+repair,...] [--figure-samples 4]
        [--figure-also T:7:once@0+repair,...]
        [--device cpu|cuda] [--quick] [--report-only]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch
from benchmark_utils import (
    RESULTS_DIR,
    ROOT,
    command_line,
    default_device,
    machine_description,
    markdown_table,
    timed,
    write_atomic,
)
from omegaconf import OmegaConf

from drdm.deform import RandomDeformation
from drdm.deform.forward import REFERENCE_V_SCALE
from drdm.generation import DRDM, generation_settings
from drdm.generation.chain import block_starts, start_steps
from drdm.metrics.overlap import dice_score
from drdm.nets import RecResACNet
from drdm.utils.atomic import write_text_atomic

REFERENCE_DIR = Path(
    os.environ.get("DRDM_REFERENCE_DIR", ROOT.parent / "shared" / "data" / "drdm_reference")
)
DEFAULT_CHECKPOINT = REFERENCE_DIR / "cmr_recresacnet_reference.pth"
DEFAULT_VOLUME = REFERENCE_DIR / "acdc_patient001_frame01.nii.gz"
DEFAULT_SCHEDULES = ",".join(
    [
        "T:all@32-repair",
        "t0:20:remaining@32-repair",
        "T:8:once@32-repair",
        "T:7:once@16-repair",
        "T:8:once@0-repair",
        *(f"T:{calls}:once@0+repair" for calls in (8, 7, 6)),
        "T:8:uncorrelated@0+repair",
        "T:8:once@16+repair",
        "T:8:once@0~bf16+repair",
    ]
)
METRICS = ("folding", "max_displacement", "mean_displacement", "dice", "ncc", "field_distance")


# ---------------------------------------------------------------------------------- inputs
def augment_options() -> dict:
    """``conf/augment.yaml``'s ``generation`` settings: what ``src/augment.py`` passes as the
    caller's (``None``: unset; :func:`drdm.generation.generation_settings` fills the rest)."""
    config = OmegaConf.load(ROOT / "conf" / "augment.yaml")
    return OmegaConf.to_container(config.generation)


def load_model(checkpoint: str, deformation: dict) -> DRDM:
    """The shipped ``DRDM.load(checkpoint, ...)``; ``"none"``: a random 32 px RecResACNet."""
    options = augment_options()
    if checkpoint == "none":
        torch.manual_seed(0)
        net = RecResACNet(ndims=2, timesteps=deformation["timesteps"])
        settings = generation_settings(options)
        return DRDM(net, RandomDeformation(ndims=2, **deformation), (32, 32), **settings)
    return DRDM.load(checkpoint, **options)


def load_slices(volume: str, slices: list[int]) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Image and label slices ``[S, 1, X, Y]`` (label: ``<volume>_gt``) and where they came from.

    ``"none"``: one synthetic 32 x 32 image with a disc label (smoke runs).
    """
    if volume == "none":
        grid = torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij"))
        disc = ((grid - 15.5).square().sum(0) < 81).long()
        image = disc.float() * 0.7 + 0.2 * torch.sin(grid[0] / 3) + 0.1
        return image[None, None], disc[None, None], "a synthetic 32 x 32 image with a disc label"
    import nibabel as nib

    path = Path(volume)
    label_path = path.with_name(path.name.replace(".nii", "_gt.nii"))
    for required in (path, label_path):
        if not required.is_file():
            raise FileNotFoundError(f"benchmark input not found: {required} (pass --volume PATH)")
    image = torch.as_tensor(nib.load(path).get_fdata(dtype="float32"))
    label = torch.as_tensor(nib.load(label_path).get_fdata(dtype="float32")).round().long()
    if image.ndim != 3 or any(not 0 <= z < image.shape[2] for z in slices):
        raise ValueError(
            f"{path}: slices {slices} must lie in a 3D volume, got {list(image.shape)}"
        )
    pick = torch.tensor(slices)
    images = image[..., pick].permute(2, 0, 1)[:, None]
    labels = label[..., pick].permute(2, 0, 1)[:, None]
    return images, labels, f"{path.name}, slices {', '.join(map(str, slices))}"


def parse_schedule(spec: str) -> dict:
    """``START:CALLS[:RULE][@MARGIN][/BATCH][~PRECISION][+repair|-repair]`` -> a row's settings
    (``None``: the model's)."""
    rest, repair = spec, None
    for flag, value in (("+repair", True), ("-repair", False)):
        if flag in rest:  # anywhere: "@0+repair/1" and "@0/1+repair" read the same
            rest, repair = rest.replace(flag, "", 1), value
    rest, _, precision = rest.partition("~")
    rest, _, batch = rest.partition("/")
    rest, _, margin = rest.partition("@")
    parts = rest.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ("T", "t0"):
        raise ValueError(
            f"schedule {spec!r}: expected START:CALLS[:RULE][@MARGIN][/BATCH][~PRECISION]"
            "[+repair|-repair], START T or t0"
        )
    return dict(
        name=spec,
        schedule=rest,
        start_step=parts[0],
        sampling_steps=None if parts[1] == "all" else int(parts[1]),
        skipped_steps=parts[2] if len(parts) == 3 else "once",
        margin=int(margin) if margin else None,
        batch=int(batch) if batch else None,
        precision=precision or None,
        fold_repair=repair,
    )


# ---------------------------------------------------------------------------------- metrics
def dice(warped: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Mean Dice over the foreground classes, per sample: ``[N, 1, *S]`` -> ``[N]`` (classes
    absent from both a sample and its warp are left out of its mean)."""
    scores = dice_score(warped, label, num_classes=int(label.max()) + 1)
    return torch.nanmean(scores, dim=1).float()


def ncc(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Global normalised cross-correlation per sample, ``[N, 1, *S]`` -> ``[N]``."""
    a = first.flatten(1) - first.flatten(1).mean(1, keepdim=True)
    b = second.flatten(1) - second.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def sample_metrics(out, images, labels, reference_field) -> dict[str, list[float]]:
    """Per-sample figures of one row (``out``: :class:`drdm.generation.Generated`)."""
    per_input = out.image.shape[0] // images.shape[0]
    originals = images.repeat_interleave(per_input, 0)
    size = torch.tensor(out.displacement.shape[2:], dtype=torch.float32).view(1, -1, 1, 1)
    fraction = (out.displacement / size).square().sum(1).sqrt().flatten(1)
    metrics = {
        "folding": out.folding_ratio,
        "repaired": out.repaired_ratio,
        "max_displacement": fraction.max(1).values,
        "mean_displacement": fraction.mean(1),
        "dice": dice(out.label, labels.repeat_interleave(per_input, 0)),
        "ncc": ncc(out.image, originals),
        "field_distance": (out.displacement - reference_field)
        .square()
        .sum(1)
        .sqrt()
        .flatten(1)
        .mean(1),
    }
    return {key: [float(v) for v in value] for key, value in metrics.items()}


def chain_calls(drdm: DRDM, t0: list[int]) -> float:
    """Mean network calls per sample of ``drdm``'s chain for these ``t0``."""
    first = start_steps(torch.tensor(t0), drdm.timesteps, drdm.start_step).tolist()
    return sum(len(block_starts(f, drdm.sampling_steps)) for f in first) / len(first)


def summarise(values: list[float]) -> tuple[float, float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    return float(tensor.mean()), float(tensor.std()) if len(values) > 1 else 0.0


# ---------------------------------------------------------------------------------- parts
SETTINGS = ("start_step", "sampling_steps", "skipped_steps", "margin", "precision", "fold_repair")
# settings a schedule may leave unset: the shipped model's
SHIPPED_SETTINGS = ("margin", "precision", "fold_repair")


def with_shipped(row: dict, drdm: DRDM) -> dict:
    """``row`` with the :data:`SHIPPED_SETTINGS` it leaves unset (``None``) taken from ``drdm``."""
    for key in SHIPPED_SETTINGS:
        row[key] = getattr(drdm, key) if row[key] is None else row[key]
    return row


def configure(drdm: DRDM, row: dict) -> DRDM:
    for key in SETTINGS:
        setattr(drdm, key, row[key])
    drdm.batch_size = row["batch"] or row["shipped_batch"]
    return drdm


def run_schedules(args) -> tuple[dict, dict]:
    """The schedules part: its JSON record."""
    drdm = load_model(args.checkpoint, args.deformation).to(args.device)
    images, labels, source = load_slices(args.volume, args.slices)
    images, labels = images.to(args.device), labels.to(args.device)
    shipped_batch = drdm.batch_size
    default = dict(
        start_step=drdm.start_step,
        sampling_steps=drdm.sampling_steps,
        skipped_steps=drdm.skipped_steps,
        margin=drdm.margin,
        precision=drdm.precision,
        fold_repair=drdm.fold_repair,
    )
    rows = [with_shipped(parse_schedule(spec), drdm) for spec in args.schedules]
    for row in rows:
        row["shipped_batch"] = shipped_batch
    # a first call pays for lazy initialisation
    configure(drdm, rows[0]).generate(images[:1], num_samples=1, seed=99, t0=1)
    reference_field = None
    for row in rows:
        configure(drdm, row)
        seconds, out = timed(
            lambda: drdm.generate(images, labels, num_samples=args.samples, seed=0), args.device
        )
        out.image, out.displacement = out.image.float(), out.displacement.float()
        if reference_field is None:
            reference_field = out.displacement
        row["t0"] = out.t0.tolist()
        row["images_per_call"] = drdm.images_per_call
        row["calls"] = chain_calls(drdm, row["t0"])
        row["samples_per_s"] = out.image.shape[0] / seconds
        row["samples"] = sample_metrics(out, images, labels, reference_field)
        mean = {key: summarise(values)[0] for key, values in row["samples"].items()}
        print(
            f"{row['name']:<28} margin {row['margin']:>3}  calls {row['calls']:5.1f}  "
            f"{row['samples_per_s']:.3f} samples/s  folding {100 * mean['folding']:.3f}%  "
            f"max {mean['max_displacement']:.3f}  Dice {mean['dice']:.3f}  NCC {mean['ncc']:.3f}  "
            f"|u - u_80| {mean['field_distance']:.2f} vx",
            flush=True,
        )
    record = dict(
        source=source,
        checkpoint=args.checkpoint_name,
        default={key: value for key, value in default.items()},
        samples_per_input=args.samples,
        slices=list(args.slices),
        image_size=list(drdm.image_size),
        rows=rows,
    )
    return record


def figure_samples(args, record: dict) -> dict:
    """The figure's samples: ``--figure-slice`` generated with the first row's settings (the
    80-step chain), the pick's and each ``--figure-also`` schedule's, same seeds (the table's
    run batched other companions with them, so these match it up to float rounding)."""
    drdm = load_model(args.checkpoint, args.deformation).to(args.device)
    image, label, _ = load_slices(args.volume, [args.figure_slice])
    chosen = pick(record)
    entries = [(record["rows"][0]["name"], record["rows"][0])]
    if chosen is not None:
        entries.append((f"{chosen['name']} (pick)", chosen))
    for spec in args.figure_also:  # other options, for the eye
        entries.append((spec, with_shipped(parse_schedule(spec), drdm)))
    shown = {}
    for name, row in entries:
        configure(drdm, {**row, "batch": None, "shipped_batch": "auto"})
        out = drdm.generate(image, label, num_samples=args.figure_samples, seed=0)
        shown[name] = (out.image.float().cpu(), out.label.cpu())
    return dict(original=(image[0], label[0]), shown=shown)


def run_speed(args) -> dict:
    """The speed part: the authors' procedure against the shipped default, same run."""
    ours = load_model(args.checkpoint, args.deformation).to(args.device)
    authors_fields = RandomDeformation(
        ndims=2,
        integrator="reference",
        **{"timesteps": ours.timesteps, "v_scale": REFERENCE_V_SCALE, **args.deformation},
    )
    # their code: one sample at a time, fp32, the network in PyTorch's default (NCHW) layout;
    # the same procedure on the channels-last network drdm runs shows what the layout alone buys
    reference = DRDM(copy.deepcopy(ours.net), authors_fields, ours.image_size, margin=0)
    reference.memory_format = torch.contiguous_format
    reference.net.to(memory_format=torch.contiguous_format)
    channels_last = DRDM(ours.net, authors_fields, ours.image_size, margin=0)
    image = load_slices(args.volume, args.slices)[0][0, 0].to(args.device)
    n = args.speed_samples
    rows = []
    configs = [("authors' procedure", reference, True)]
    configs.append(("authors' procedure, channels-last", channels_last, True))
    for model in (reference, channels_last):
        model.batch_size = 1
        model.to(args.device)
    configs.append(("shipped default", ours, False))
    for spec in args.speed_also:  # other schedules on the same network, for comparison
        other = load_model(args.checkpoint, args.deformation).to(args.device)
        row = with_shipped(parse_schedule(spec), other)
        configure(other, {**row, "shipped_batch": other.batch_size})
        configs.append((spec, other, False))
    for model in {id(c[1]): c[1] for c in configs}.values():  # lazy initialisation, untimed
        model.generate(image, num_samples=1, seed=99, t0=1)
    # Repeats alternate the configurations, so a slow spell of a shared machine hits every one;
    # each speed-up is the median over repeats of its ratio to the same repeat's baseline.
    seconds = {name: [] for name, _, _ in configs}
    outputs = {}
    for repeat in range(args.speed_repeats):
        for name, model, one_at_a_time in configs:
            calls = [[k] for k in range(n)] if one_at_a_time else [list(range(n))]

            def generate(model=model, calls=calls):
                return [
                    model.generate(image, num_samples=n, seed=0, sample_indices=k) for k in calls
                ]

            elapsed, outputs[name] = timed(generate, args.device)
            seconds[name].append(elapsed)
            print(f"repeat {repeat}: {name:<20} {n / elapsed:.3f} samples/s", flush=True)
    baseline = seconds[configs[0][0]]
    baseline_channels_last = seconds[configs[1][0]]
    for name, model, _ in configs:
        folding = torch.cat([out.folding_ratio for out in outputs[name]]).float().mean()
        t0 = [int(t) for out in outputs[name] for t in out.t0]
        ratios = [b / s for b, s in zip(baseline, seconds[name])]
        ratios_channels_last = [b / s for b, s in zip(baseline_channels_last, seconds[name])]
        rows.append(
            dict(
                name=name,
                precision="bf16" if model.network_dtype == torch.bfloat16 else "fp32",
                batch=min(model.images_per_call, n),
                margin=model.margin,
                calls=chain_calls(model, t0),
                seconds=statistics.median(seconds[name]),
                repeats=seconds[name],
                samples_per_s=n / statistics.median(seconds[name]),
                folding=float(folding),
                speedup=statistics.median(ratios),
                speedup_range=[min(ratios), max(ratios)],
                speedup_channels_last=statistics.median(ratios_channels_last),
                speedup_channels_last_range=[min(ratios_channels_last), max(ratios_channels_last)],
                fold_repair=model.fold_repair,
            )
        )
        row = rows[-1]
        print(
            f"{name:<20} {row['precision']}  batch {row['batch']:>3}  margin {model.margin:>3}  "
            f"calls {row['calls']:.0f}  {row['samples_per_s']:.3f} samples/s  "
            f"x{row['speedup']:.2f} ({min(ratios):.2f}-{max(ratios):.2f})  "
            f"folding {100 * float(folding):.3f}%",
            flush=True,
        )
    steps = ours.sampling_steps or "all"
    settings = (
        f"chain from `{ours.start_step}`, {steps} calls, `{ours.skipped_steps}`, "
        f"margin {ours.margin}, precision `{ours.precision}`, fold repair "
        f"{'on' if ours.fold_repair else 'off'}"
    )
    return dict(
        samples=n,
        repeats=args.speed_repeats,
        image_size=list(ours.image_size),
        settings=settings,
        rows=rows,
    )


# ---------------------------------------------------------------------------------- report
def within_spread(row: dict, baseline: dict) -> bool:
    """Pooled: folding < 1 % and every other figure's mean over all samples within the
    baseline's mean +- one std over all its samples (slices pooled)."""
    if summarise(row["samples"]["folding"])[0] >= 0.01:
        return False
    for key in ("max_displacement", "mean_displacement", "dice", "ncc"):
        mean, _ = summarise(row["samples"][key])
        centre, spread = summarise(baseline["samples"][key])
        if abs(mean - centre) > spread:
            return False
    return True


# figures compared image by image (the max displacement, an extreme value whose spread within
# one slice is about 0.01 of the image for the 80-step chain, is left to the pooled test)
PER_IMAGE_FIGURES = ("mean_displacement", "dice", "ncc")


def per_slice(values: list[float], per_input: int) -> list[tuple[float, float]]:
    """Mean and std of each slice's samples (``values`` slice-major, ``per_input`` per slice)."""
    return [summarise(values[i : i + per_input]) for i in range(0, len(values), per_input)]


def within_spread_per_image(row: dict, baseline: dict, per_input: int) -> bool:
    """On every slice: folding < 1 % and the means of mean displacement, Dice and NCC within
    the baseline's mean +- one std over that slice's samples."""
    if any(mean >= 0.01 for mean, _ in per_slice(row["samples"]["folding"], per_input)):
        return False
    for key in PER_IMAGE_FIGURES:
        values = per_slice(row["samples"][key], per_input)
        reference = per_slice(baseline["samples"][key], per_input)
        if any(
            abs(mean - centre) > spread for (mean, _), (centre, spread) in zip(values, reference)
        ):
            return False
    return True


def cost(row: dict, image_size: list[int]) -> float:
    """Network pixels per sample: calls x recovery canvas (the model-size image plus margin)."""
    return row["calls"] * math.prod(n + 2 * row["margin"] for n in image_size)


def pick(record: dict) -> dict | None:
    """The cheapest fp32 configuration (schedule and margin; :func:`cost`, ties by samples/s)
    that passes :func:`within_spread_per_image`, or its bf16 row (``~bf16``) if that passes
    too; rows with their own batch (``/B``) are not candidates.

    Cost, not measured samples/s, ranks the rows: rows with the same calls and margin run the
    same work, and their measured rates differ only by the machine's noise. Precision is a
    second choice, made for the picked schedule only: a bf16 row runs the same work in cheaper
    arithmetic, so it is taken when it meets the same test."""
    baseline = record["rows"][0]
    passing = [
        row
        for row in record["rows"][1:]
        if "/" not in row["name"]
        and within_spread_per_image(row, baseline, record["samples_per_input"])
    ]
    size = record["image_size"]
    fp32 = [row for row in passing if row.get("precision", "fp32") == "fp32"]
    chosen = min(fp32, key=lambda r: (cost(r, size), -r["samples_per_s"]), default=None)
    if chosen is None:
        return None
    for row in passing:
        keys = ("schedule", "margin", "start_step", "fold_repair")
        same = all(row.get(key) == chosen.get(key) for key in keys)
        if same and row.get("precision") == "bf16":
            return row
    return chosen


def _cell(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    mean, std = summarise(values)
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def schedule_lines(record: dict) -> list[str]:
    baseline = record["rows"][0]
    chosen = pick(record)
    n = record["samples_per_input"]
    table = []
    for row in record["rows"]:
        samples = row["samples"]
        mark = " **(pick)**" if row is chosen else ""
        table.append(
            [
                row["name"] + mark,
                row.get("precision", "fp32"),
                str(row["margin"]),
                "yes" if row.get("fold_repair") else "no",
                str(row["images_per_call"]),
                f"{row['calls']:.1f}",
                f"{row['samples_per_s']:.3f}",
                _cell(samples["folding"], 100, 3) + " %",
                _cell(samples.get("repaired", [0.0] * len(samples["folding"])), 100, 2) + " %",
                _cell(samples["max_displacement"]),
                _cell(samples["mean_displacement"]),
                _cell(samples["dice"]),
                _cell(samples["ncc"]),
                _cell(samples["field_distance"], 1, 2),
                "yes" if within_spread(row, baseline) else "no",
                "yes" if within_spread_per_image(row, baseline, n) else "no",
            ]
        )
    default = record["default"]
    steps = default["sampling_steps"] or "all"
    t0 = ", ".join(map(str, baseline["t0"][: record["samples_per_input"]]))
    lines = [
        "## Recovery schedules",
        "",
        f"{record['samples_per_input']} samples of each slice of {record['source']} "
        f"({len(baseline['t0'])} samples per row; t0 {t0} for each slice), with "
        f"{record['checkpoint']}; the same seeds, t0 and diffused fields "
        "in every row. Schedule `START:CALLS[:RULE]`: the chain from T-1 (`T`) or t0-1 (`t0`), "
        "network calls per sample (`all`: one per step), and how a call's prediction stands in "
        "for the steps it skips (`repeat`: applied once per skipped step; `k_rec`: rescaled to the "
        "recovery the network is trained to give over them; `drdm.generation.chain`). *margin*: "
        "voxels of reflected image around the network's input; *repair*: the final fields "
        "smoothed where they fold (`+repair`, `fold_repair` of `DRDM`, "
        "`drdm.deform.repair_folding`; `-repair`: not). Figures are mean ± std over the "
        "samples: *folding*, fraction of the final field's pixels with det J <= 0 (after the "
        "repair); *repaired*, fraction of the field's pixels the repair changed; *max / mean "
        "disp.*, displacement as a fraction of the image (per axis, then the length); *Dice*, "
        "mean over the labels (RV, myocardium, LV) of the warped label against the original; "
        "*NCC*, of the sample against the original image; *to 80-step*, mean distance (pixels) "
        "of the final field to the same sample's field from the first row. Within the first "
        "row's spread, *pooled*: folding < 1 % and the means over all samples of max / mean "
        "displacement, Dice and NCC within the first row's mean ± one std over all its samples "
        "(the slices pooled, so the spread includes how the slices differ); *per image*: on "
        "every slice, folding < 1 % and the means of mean displacement, Dice and NCC within "
        "the first row's mean ± one std over that slice's samples. *(pick)*: the "
        "cheapest fp32 row within it per image (network calls x canvas pixels; rows of equal "
        "cost differ only by timing noise; the fold repair's blurs are not counted, the speed "
        "table times them), or that schedule's bf16 row if it is within it too. "
        f"The per-image test compares the mean of {n} samples with the 80-step chain's mean of "
        f"{n}: with few samples per slice (4), a schedule with the 80-step chain's "
        "distribution fails it often by chance. `~bf16`: the network under bf16 autocast "
        "(fields composed in fp32; `precision` of `DRDM`). "
        "`@M`: margin M; `/B`: B images per network call (*batch*; default: the shipped "
        "`batch_size`), so `T:all/1` differs from `T:all` by float rounding alone: its distance "
        "is the chain's own sensitivity. The shipped default when this table was made "
        f"(`conf/augment.yaml`): chain from `{default['start_step']}`, {steps} calls, "
        f"`{default['skipped_steps']}`, margin {default['margin']}, precision "
        f"`{default.get('precision', 'fp32')}`, fold repair "
        f"{'on' if default.get('fold_repair') else 'off'}.",
        "",
        *markdown_table(
            [
                "schedule",
                "precision",
                "margin",
                "repair",
                "batch",
                "calls",
                "samples/s",
                "folding",
                "repaired",
                "max disp.",
                "mean disp.",
                "Dice",
                "NCC",
                "to 80-step",
                "pooled",
                "per image",
            ],
            table,
            "llrlrrrrrrrrrrll",
        ),
        "",
        *per_slice_lines(record),
    ]
    return lines


def per_slice_lines(record: dict) -> list[str]:
    """Dice and mean displacement per slice: how each row compares image by image."""
    n = record["samples_per_input"]
    slices = record.get("slices") or list(range(len(record["rows"][0]["t0"]) // n))

    table = []
    for row in record["rows"]:
        cells = [row["name"]]
        for key in ("dice", "mean_displacement"):
            cells += [f"{m:.3f} ± {s:.3f}" for m, s in per_slice(row["samples"][key], n)]
        cells += [f"{100 * m:.2f} %" for m, _ in per_slice(row["samples"]["folding"], n)]
        table.append(cells)
    header = ["schedule"]
    header += [f"Dice, slice {z}" for z in slices] + [f"mean disp., slice {z}" for z in slices]
    header += [f"folding, slice {z}" for z in slices]
    return [
        "Per slice (mean ± std over its samples): the table above pools the slices, so its "
        "spread includes how the slices differ; here each row meets the 80-step chain image "
        "by image.",
        "",
        *markdown_table(header, table),
        "",
    ]


def speed_lines(record: dict) -> list[str]:
    table = [
        [
            f"{row['name']} ({row['precision']})",
            str(row["batch"]),
            str(row["margin"]),
            f"{row['calls']:.0f}",
            f"{row['samples_per_s']:.3f}",
            f"{row['seconds'] / record['samples']:.2f}",
            f"{row['speedup']:.2f}x",
            "–".join(f"{r:.2f}x" for r in row.get("speedup_range", [row["speedup"]] * 2)),
            f"{row['speedup_channels_last']:.2f}x" if "speedup_channels_last" in row else "",
            "–".join(f"{r:.2f}x" for r in row.get("speedup_channels_last_range", [])),
            "yes" if row.get("fold_repair") else "no",
            f"{100 * row['folding']:.3f} %",
        ]
        for row in record["rows"]
    ]
    size = " x ".join(map(str, record["image_size"]))
    return [
        "## Speed of the shipped default",
        "",
        f"{record['samples']} samples of one slice (network size {size}). *authors' procedure*: "
        "one sample at a time, the chain from T-1 (80 calls), their forward fields "
        '(`integrator="reference"`), no margin; *shipped default*: what `src/augment.py` '
        "runs: `DRDM.load` with `conf/augment.yaml`'s `generation` and the shipped default "
        f"({record.get('settings', '')}; network batches of its `batch_size`). Same network, "
        "seeds and t0; rows named by a schedule (`--speed-also`) run it with the shipped "
        f"settings otherwise. Each configuration was timed {record.get('repeats', 1)} times, "
        "the configurations alternating; *samples/s*: from the median time; *speed-up*: the "
        "median over repeats of samples/s over the authors' procedure's in the same repeat "
        "(*range*: the smallest and largest). The authors' procedure runs the network as their "
        "code does, in PyTorch's default memory layout (NCHW); *vs channels-last*: the same "
        "ratio against their procedure on drdm's channels-last network (the layout every drdm "
        "row uses), i.e. the speed-up without the layout's share. *folding*: after the fold "
        "repair where *repair* is on.",
        "",
        *markdown_table(
            [
                "method",
                "batch",
                "margin",
                "calls",
                "samples/s",
                "s/sample",
                "speed-up",
                "range",
                "vs channels-last",
                "range ",
                "repair",
                "folding",
            ],
            table,
        ),
        "",
    ]


def write_report(data: dict, path: Path) -> None:
    lines = ["# DRDM generation benchmark", ""]
    for part in ("schedules", "speed"):
        if part in data:
            lines += [
                f"`{data[part]['command']}` (not a test).",
                "",
                f"Machine: {data[part]['machine']}.",
                "",
                *(schedule_lines if part == "schedules" else speed_lines)(data[part]),
            ]
    write_atomic(path, "\n".join(lines))


def sample_figure(shown: dict, path: Path) -> None:
    """Original and the samples of the first row (80-step chain) and the pick, label contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (image, label), rows = shown["original"], shown["shown"]
    columns = 1 + max(batch[0].shape[0] for batch in rows.values())
    figure, axes = plt.subplots(len(rows), columns, figsize=(2.2 * columns, 2.4 * len(rows)))
    axes = axes.reshape(len(rows), columns)
    for r, (name, (samples, labels)) in enumerate(rows.items()):
        panels = [("original", image, label)] + [
            (f"sample {k}", samples[k], labels[k]) for k in range(samples.shape[0])
        ]
        for c, axis in enumerate(axes[r]):
            axis.axis("off")
            if c >= len(panels):
                continue
            title, picture, contour = panels[c]
            axis.imshow(picture[0], cmap="gray")  # first axis vertical, as the other figures
            axis.contour(contour[0], levels=[0.5, 1.5, 2.5], colors=["r", "y", "c"], linewidths=0.6)
            axis.set_title(title if c else f"{name}\n{title}", fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    temporary.replace(path)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "schedules", "speed", "figure"), default="all")
    parser.add_argument(
        "--figure-slice", type=int, default=None, help="default: the middle of --slices"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: random net, T = 8, 32 px")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="path or 'none'")
    parser.add_argument("--volume", default=str(DEFAULT_VOLUME), help="NIfTI path or 'none'")
    parser.add_argument("--slices", default="2,5,8", help="slices of the volume")
    parser.add_argument("--samples", type=int, default=16, help="samples per slice (schedules)")
    parser.add_argument("--figure-samples", type=int, default=4, help="samples in the figure")
    parser.add_argument("--schedules", default=None, help=f"default: {DEFAULT_SCHEDULES}")
    parser.add_argument("--speed-samples", type=int, default=8)
    parser.add_argument(
        "--speed-repeats", type=int, default=3, help="timings per configuration, alternated"
    )
    parser.add_argument(
        "--speed-also",
        default="T:8:once@0+repair,T:8:once@32-repair,T:7:once@0+repair/2",
        help="schedules timed beside the default",
    )
    parser.add_argument("--figure-also", default="", help="schedules drawn beside the pick")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--output", type=Path, default=None, help="the .md; .json beside it")
    parser.add_argument("--report-only", action="store_true", help="rebuild from the JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.deformation = {}
    args.slices = [int(z) for z in args.slices.split(",")]
    if args.figure_slice is None:
        args.figure_slice = args.slices[len(args.slices) // 2]
    quick_schedules = ",".join(
        ["T:all@4-repair", "T:all@4/1-repair", "T:4", "T:2:repeat", "t0:2:remaining"]
        + ["t0:2:remaining~bf16", "T:2@0-repair"]
    )
    args.speed_also = [spec for spec in args.speed_also.split(",") if spec]
    args.figure_also = [spec for spec in args.figure_also.split(",") if spec]
    for spec in args.speed_also + args.figure_also:
        parse_schedule(spec)
    specs = args.schedules or (quick_schedules if args.quick else DEFAULT_SCHEDULES)
    args.schedules = specs.split(",")
    for spec in args.schedules:
        parse_schedule(spec)  # a bad one fails before any work
    if args.quick:
        args.checkpoint, args.volume, args.slices, args.figure_slice = "none", "none", [0], 0
        args.deformation = dict(timesteps=8, control_size=16, levels=2, v_scale=4e-5)
        args.samples, args.speed_samples, args.figure_samples = 2, 2, 2
        args.speed_repeats = 2
    elif args.checkpoint != "none" and not Path(args.checkpoint).is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {args.checkpoint} (pass --checkpoint PATH or 'none')"
        )
    args.checkpoint_name = (
        "a randomly initialised RecResACNet"
        if args.checkpoint == "none"
        else f"`{Path(args.checkpoint).name}`"
    )
    output = args.output or RESULTS_DIR / ("generation_quick.md" if args.quick else "generation.md")
    data_path = output.with_suffix(".json")
    data = json.loads(data_path.read_text()) if data_path.is_file() else {}
    if not args.report_only:
        stamp = dict(
            command=command_line("generation.py", argv), machine=machine_description(args.device)
        )
        if args.part in ("all", "schedules"):
            data["schedules"] = {**stamp, **run_schedules(args)}
        if args.part in ("all", "schedules", "figure"):
            if "schedules" not in data:
                raise FileNotFoundError(f"--part figure needs the schedules record in {data_path}")
            figure = figure_samples(args, data["schedules"])
            sample_figure(figure, output.with_name(output.stem + "_samples.png"))
            data["schedules"]["figure"] = {"slice": args.figure_slice, **stamp}
        if args.part in ("all", "speed"):
            data["speed"] = {**stamp, **run_speed(args)}
        write_text_atomic(data_path, json.dumps(data, indent=1))
    write_report(data, output)


if __name__ == "__main__":
    main(sys.argv[1:])
