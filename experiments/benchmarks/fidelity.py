"""Benchmark: drdm's generation against the authors' own code, side by side in one run.

Not a test. The reference distribution is the authors' ``DeformDDPM.diff_recover`` (their code,
imported from ``../shared/reference/def_diff_rec``; their forward process, their 80-call chain,
their 2D cardiac checkpoint, their ``config_cmr.yaml`` settings). On ``--slices`` of the shared
ACDC volume (each slice resized to 256 x 256, intensities 0..1, labels nearest), every row draws
``--samples`` samples per slice with ``t0`` from 48 rising by 2 every two samples (the authors'
augmentation settings), and per sample the report gives: mean and max displacement (fraction of
the image side), image NCC and label Dice (RV, MYO, LV; the original label warped by the sample's
field with nearest neighbour) of sample against original, folding (``det J <= 0``) and seconds.

Rows: the authors' code; drdm's full chain with the authors' numerics (the defaults for their
``.pth``: each displacement component bounded to ``±(size - 1)`` voxels, the accumulated field
composed with zero padding, the network input re-warped bicubically); with
``--former-numerics`` the same chain with drdm's numerics before they were adopted (sampling
positions clamped into the image, border padding, bilinear input); the shipped few-step default
(``DRDM.load`` with
``conf/augment.yaml``'s settings); and each ``--also`` schedule (``generation.py``'s syntax).

A row **passes** when (1) per slice, a two-sided Mann-Whitney U test of each statistic against
the authors' samples gives p >= 0.05 on at least 90 % of the slice x statistic tests, (2) its
pooled mean displacement lies within ±10 % of the authors', and (3) its mean folding is <= the
authors' or < 1 %.

The distribution part runs on ``--device`` (a GPU makes it minutes instead of an hour; TF32 is
off so the float arithmetic is fp32 as on a CPU). The speed part times ``--speed-samples`` samples
of one slice per row on the CPU with ``--threads`` threads, the authors' code first: their time per
sample is the baseline of every speed-up.

Usage::

    python experiments/benchmarks/fidelity.py [--device cuda] [--threads 2] [--slices 2,5,8]
        [--samples 16] [--also T:16:once@0+repair,...] [--speed-samples 2] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from benchmark_utils import RESULTS_DIR, ROOT, command_line, machine_description, markdown_table
from generation import (
    DEFAULT_CHECKPOINT,
    DEFAULT_VOLUME,
    augment_options,
    load_slices,
    ncc,
    parse_schedule,
)

from drdm.deform import folding_ratio, warp
from drdm.generation import DRDM, generation_settings
from drdm.generation.chain import minmax_normalise
from drdm.generation.sampler import t0_schedule
from drdm.metrics.overlap import dice_score
from drdm.utils.atomic import write_text_atomic

REFERENCE_CODE = Path(
    os.environ.get("DRDM_REFERENCE_CODE", ROOT.parent / "shared" / "reference" / "def_diff_rec")
)
SIZE = 256
STRUCTURES = {1: "RV", 2: "MYO", 3: "LV"}
STATISTICS = (
    "mean_displacement",
    "max_displacement",
    "ncc",
    "dice_RV",
    "dice_MYO",
    "dice_LV",
    "folding",
)
FULL_CHAIN = {"start_step": "T", "sampling_steps": "all", "margin": 0, "fold_repair": False}
FORMER_NUMERICS = {"compose_padding": "border", "chain_interpolation": "bilinear"}
AUTHORS = "authors' code (DeformDDPM.diff_recover, 80 calls)"
FULL_CHAIN_ROW = "drdm full chain, authors' numerics (80 calls)"
SHIPPED_ROW = "drdm shipped default"


# ---------------------------------------------------------------------------------- models
def authors_model(checkpoint: Path, device: str):
    """The authors' ``DeformDDPM`` with their network and weights, as ``config_cmr.yaml``."""
    if not (REFERENCE_CODE / "Diffusion" / "diffuser.py").is_file():
        raise FileNotFoundError(f"the authors' code is not at {REFERENCE_CODE}")
    sys.path.insert(0, str(REFERENCE_CODE))
    try:
        from Diffusion.diffuser import DeformDDPM
        from Diffusion.networks import RecResACNet
    finally:
        sys.path.remove(str(REFERENCE_CODE))
    network = RecResACNet(n_steps=80, time_emb_dim=100, ndims=2, num_input_chn=1)
    network.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return DeformDDPM(
        network=network.eval(),
        n_steps=80,
        device=device,
        image_chw=(1, SIZE, SIZE),
        batch_size=1,
        img_pad_mode="zeros",
        ddf_pad_mode="border",
        padding_mode="zeros",
        v_scale=4e-5,
        resample_mode="bicubic",
    )


# the authors' forward process on drdm's code (RandomDeformation's "reference" integrator at
# their v_scale), in place of drdm's calibrated one that the .pth loads with by default
AUTHORS_FORWARD = {"integrator": "reference", "v_scale": 4e-5, "refinement": 1}


def drdm_rows(
    also: list[str], former: bool, authors_forward: bool = False
) -> list[tuple[str, dict, str | None]]:
    """``(name, DRDM.load options, network displacement_limit or None)`` per drdm row."""
    shipped = generation_settings(augment_options())
    rows = [(FULL_CHAIN_ROW, dict(FULL_CHAIN), None)]
    if authors_forward:
        name = "drdm full chain, authors' numerics and forward process (80 calls)"
        rows.append((name, {**FULL_CHAIN, "deformation": AUTHORS_FORWARD}, None))
    if former:
        name = "drdm full chain, former numerics (in-image clamp, border, bilinear)"
        rows.append((name, {**FULL_CHAIN, **FORMER_NUMERICS}, "image"))
    rows.append((f"{SHIPPED_ROW} ({describe(shipped)})", shipped, None))
    for spec in also:
        row = parse_schedule(spec)
        settings = {
            key: row[key]
            for key in ("start_step", "sampling_steps", "skipped_steps", "margin", "fold_repair")
            if row[key] is not None
        }
        if row["sampling_steps"] is None:
            settings["sampling_steps"] = "all"
        rows.append((f"drdm {spec}", {**shipped, **settings}, None))
    return rows


def describe(settings: dict) -> str:
    calls = settings.get("sampling_steps")
    repair = "fold repair" if settings.get("fold_repair") else "no repair"
    start, margin = settings.get("start_step"), settings.get("margin")
    return f"{calls} calls from {start}, margin {margin}, {repair}"


def load_drdm(checkpoint: Path, options: dict, limit: str | None, device: str) -> DRDM:
    drdm = DRDM.load(checkpoint, **options).to(device)
    if limit is not None:
        drdm.net.displacement_limit = limit
    drdm.batch_size = 1  # one sample per call, as the authors' code runs
    return drdm


# ---------------------------------------------------------------------------------- samples
def inputs(volume: Path, slices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Slices resized to ``256 x 256``: image ``[S, 1, 256, 256]`` in 0..1, label (nearest)."""
    images, labels, _ = load_slices(str(volume), slices)
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=True)
    images = minmax_normalise(images)
    labels = F.interpolate(labels.float(), size=(SIZE, SIZE), mode="nearest").long()
    return images, labels


def statistics_of(image, label, sample, field) -> dict[str, float]:
    """One sample: ``image``, ``label`` ``[1, 1, S, S]``, field in voxels ``[1, 2, S, S]``."""
    length = (field / SIZE).square().sum(1).sqrt()
    warped_label = warp(label, field, mode="nearest")
    dice = dice_score(warped_label, label, num_classes=4)[0]
    values = {
        "mean_displacement": float(length.mean()),
        "max_displacement": float(length.max()),
        "ncc": float(ncc(sample, image)[0]),
        "folding": float(folding_ratio(field.double())[0]),
    }
    for index, name in STRUCTURES.items():
        values[f"dice_{name}"] = float(dice[index - 1])
    return values


def synchronise(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def authors_sample(model, image, label, t0: int, seed: int, device: str):
    """One sample of ``diff_recover`` (their forward draws from the global CPU generator)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        fields, images, _ = model.diff_recover(
            image.to(device), msk_org=label.float().to(device), T=[t0, 80]
        )
    return images[0].cpu(), (fields[0] * SIZE).cpu()


def drdm_sample(drdm: DRDM, image, label, t0: int, seed: int):
    with torch.no_grad():
        out = drdm.generate(image[0, 0], label[0, 0], num_samples=1, t0=[t0], seed=seed)
    return out.image.cpu(), out.displacement.cpu()


def sample_table(args, rows, with_authors: bool = True) -> dict:
    """Every row's per-sample statistics on every slice (the distribution part)."""
    device = args.device
    if device.startswith("cuda"):
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    images, labels = inputs(args.volume, args.slices)
    t0 = t0_schedule(args.samples, 48, 2, 2)
    record: dict[str, dict] = {}
    models = [(AUTHORS, None)] if with_authors else []
    models += [(name, (options, limit)) for name, options, limit in rows]
    for name, spec in models:
        model = (
            authors_model(args.checkpoint, device)
            if spec is None
            else load_drdm(args.checkpoint, *spec, device)
        )
        per_slice = []
        for index, z in enumerate(args.slices):
            image, label = images[index : index + 1], labels[index : index + 1]
            samples = []
            for k in range(args.samples):
                seed = 1000 * z + k
                synchronise(device)
                started = time.perf_counter()
                if spec is None:
                    sample, field = authors_sample(model, image, label, t0[k], seed, device)
                else:
                    sample, field = drdm_sample(model, image, label, t0[k], seed)
                synchronise(device)
                values = statistics_of(image, label, sample, field)
                values["seconds"] = time.perf_counter() - started
                values["t0"] = t0[k]
                samples.append(values)
            per_slice.append({"slice": z, "samples": samples})
            print(f"{name}: slice {z} done", flush=True)
        record[name] = {"slices": per_slice, "options": None if spec is None else spec[0]}
    return record


def speed_table(args, rows, with_authors: bool = True) -> dict:
    """Seconds per sample on the CPU with ``--threads`` threads, the authors' code first."""
    torch.set_num_threads(args.threads)
    images, labels = inputs(args.volume, [args.speed_slice])
    t0 = t0_schedule(args.speed_samples, 48, 2, 2)
    times = {}
    models = [(AUTHORS, None)] if with_authors else []
    models += [(name, (options, limit)) for name, options, limit in rows]
    for name, spec in models:
        model = (
            authors_model(args.checkpoint, "cpu")
            if spec is None
            else load_drdm(args.checkpoint, *spec, "cpu")
        )
        seconds = []
        for k in range(args.speed_samples):
            started = time.perf_counter()
            if spec is None:
                authors_sample(model, images, labels, t0[k], k, "cpu")
            else:
                drdm_sample(model, images, labels, t0[k], k)
            seconds.append(time.perf_counter() - started)
        times[name] = seconds
        print(f"speed {name}: {statistics.mean(seconds):.2f} s/sample", flush=True)
    return {"threads": args.threads, "slice": args.speed_slice, "seconds": times}


# ---------------------------------------------------------------------------------- report
def values(record: dict, name: str, statistic: str, slice_index: int | None = None) -> list:
    slices = record[name]["slices"]
    chosen = slices if slice_index is None else [slices[slice_index]]
    return [s[statistic] for entry in chosen for s in entry["samples"]]


def verdict(record: dict, name: str) -> dict:
    """The three pass criteria of a row against the authors' samples."""
    from scipy.stats import mannwhitneyu

    tests = []
    for index, entry in enumerate(record[AUTHORS]["slices"]):
        for statistic in STATISTICS:
            theirs = values(record, AUTHORS, statistic, index)
            ours = values(record, name, statistic, index)
            if len(set(theirs + ours)) == 1:
                p = 1.0  # identical constants (e.g. no folding anywhere)
            else:
                p = float(mannwhitneyu(ours, theirs, alternative="two-sided").pvalue)
            tests.append({"slice": entry["slice"], "statistic": statistic, "p": p})
    passed = sum(t["p"] >= 0.05 for t in tests)
    theirs_mean = statistics.mean(values(record, AUTHORS, "mean_displacement"))
    ours_mean = statistics.mean(values(record, name, "mean_displacement"))
    theirs_folding = statistics.mean(values(record, AUTHORS, "folding"))
    ours_folding = statistics.mean(values(record, name, "folding"))
    ratio = ours_mean / theirs_mean
    criteria = {
        "tests_passed": passed,
        "tests": len(tests),
        "distribution": passed >= 0.9 * len(tests),
        "displacement_ratio": ratio,
        "displacement": abs(ratio - 1) <= 0.10,
        "folding": ours_folding <= theirs_folding or ours_folding < 0.01,
        "failed_tests": [t for t in tests if t["p"] < 0.05],
    }
    criteria["passes"] = (
        criteria["distribution"] and criteria["displacement"] and criteria["folding"]
    )
    return criteria


def _cell(numbers: list[float], scale: float = 1.0, digits: int = 3) -> str:
    mean = statistics.mean(numbers) * scale
    std = (statistics.stdev(numbers) if len(numbers) > 1 else 0.0) * scale
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def report(data: dict, path: Path) -> None:
    record, speed = data["samples"], data.get("speed")
    names = list(record)
    lines = [
        "# drdm generation against the authors' code",
        "",
        f"Command: `{data['command']}`",
        "",
        f"Machine: {data['machine']}. Distribution part on `{data['device']}`; speed part on the "
        f"CPU with {speed['threads'] if speed else '-'} threads. {data['samples_per_slice']} "
        f"samples per slice on slices {', '.join(map(str, data['slices']))} of "
        f"`{Path(data['volume']).name}` (resized to 256 x 256), t0 48, 48, 50, 50, ...; wall "
        f"time {data['wall_seconds'] / 60:.1f} min.",
        "",
        "## Per-sample statistics, pooled over the slices (mean ± std)",
        "",
    ]
    header = ["row", "mean disp / size", "max disp / size", "NCC", "Dice RV", "Dice MYO",
              "Dice LV", "folding %", "s / sample (CPU)", "speed-up", "passes"]  # fmt: skip
    table = []
    for name in names:
        cells = [name]
        for statistic, scale, digits in (
            ("mean_displacement", 1, 3),
            ("max_displacement", 1, 3),
            ("ncc", 1, 3),
            ("dice_RV", 1, 3),
            ("dice_MYO", 1, 3),
            ("dice_LV", 1, 3),
            ("folding", 100, 2),
        ):
            cells.append(_cell(values(record, name, statistic), scale, digits))
        seconds = speed["seconds"].get(name) if speed else None
        if seconds:
            authors = statistics.mean(speed["seconds"][AUTHORS])
            mine = statistics.mean(seconds)
            other_run = "*" if name in data.get("appended", []) else ""
            cells += [f"{mine:.2f}{other_run}", f"{authors / mine:.2f}x{other_run}"]
        else:
            cells += ["-", "-"]
        if name == AUTHORS:
            cells.append("reference")
        else:
            result = verdict(record, name)
            cells.append(
                f"{'**yes**' if result['passes'] else 'no'} ({result['tests_passed']}/"
                f"{result['tests']} tests p >= 0.05, disp {result['displacement_ratio']:.2f}x)"
            )
        table.append(cells)
    lines += markdown_table(header, table)
    lines += [
        "",
        "Pass: per slice, Mann-Whitney U of each statistic against the authors' samples with "
        "p >= 0.05 on >= 90 % of the slice x statistic tests, pooled mean displacement within "
        "±10 % of the authors', mean folding <= the authors' or < 1 %. Speed-up: the authors' "
        "seconds per sample over the row's, same CPU, same run (`*`: a row added later with "
        "`--append`, timed in another run on the same machine).",
        "",
        "## Tests that fail (p < 0.05)",
        "",
    ]
    for name in names[1:]:
        failed = verdict(record, name)["failed_tests"]
        listed = ", ".join(f"slice {t['slice']} {t['statistic']} (p={t['p']:.3g})" for t in failed)
        lines.append(f"- {name}: {listed or 'none'}")
    lines += ["", "## Per slice (mean ± std)", ""]
    per_slice_header = ["row", "slice", "mean disp / size", "NCC", "Dice LV", "folding %"]
    per_slice = []
    for name in names:
        for index, entry in enumerate(record[name]["slices"]):
            per_slice.append(
                [
                    name,
                    str(entry["slice"]),
                    _cell(values(record, name, "mean_displacement", index)),
                    _cell(values(record, name, "ncc", index)),
                    _cell(values(record, name, "dice_LV", index)),
                    _cell(values(record, name, "folding", index), 100, 2),
                ]
            )
    lines += markdown_table(per_slice_header, per_slice)
    lines.append("")
    write_text_atomic(path, "\n".join(lines))


def outline(ax, label: torch.Tensor) -> None:
    """RV red, myocardium yellow, LV cyan outlines of a ``[S, S]`` label map."""
    for value, colour in zip(STRUCTURES, ("r", "y", "c"), strict=True):
        mask = (label == value).float().T
        if mask.any():
            ax.contour(mask, levels=[0.5], colors=[colour], linewidths=0.6)


def figure(args, rows, path: Path) -> None:
    """The first ``--figure-samples`` samples of ``--speed-slice`` from the authors' code, drdm's
    full chain and the shipped default, same t0 and seeds, with the warped labels' outlines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from drdm.utils.atomic import save_figure_atomic

    images, labels = inputs(args.volume, [args.speed_slice])
    t0 = t0_schedule(args.figure_samples, 48, 2, 2)
    picked = [row for row in rows if row[0] == FULL_CHAIN_ROW or row[0].startswith(SHIPPED_ROW)]
    shown = [(AUTHORS, None)] + [(name, (options, limit)) for name, options, limit in picked]
    columns = args.figure_samples + 1
    fig, axes = plt.subplots(len(shown), columns, figsize=(2.2 * columns, 2.4 * len(shown)))
    for row, (name, spec) in enumerate(shown):
        model = (
            authors_model(args.checkpoint, args.device)
            if spec is None
            else load_drdm(args.checkpoint, *spec, args.device)
        )
        axes[row, 0].imshow(images[0, 0].T, cmap="gray", origin="lower")
        outline(axes[row, 0], labels[0, 0])
        axes[row, 0].set_title("original", fontsize=7)
        axes[row, 0].set_ylabel(name.split("(")[0].strip(), fontsize=7)
        for k in range(args.figure_samples):
            seed = 1000 * args.speed_slice + k
            if spec is None:
                sample, field = authors_sample(model, images, labels, t0[k], seed, args.device)
            else:
                sample, field = drdm_sample(model, images, labels, t0[k], seed)
            warped = warp(labels, field, mode="nearest")
            ax = axes[row, k + 1]
            ax.imshow(sample[0, 0].T, cmap="gray", origin="lower")
            outline(ax, warped[0, 0])
            fold = float(folding_ratio(field.double())[0]) * 100
            mean = float((field / SIZE).square().sum(1).sqrt().mean())
            ax.set_title(f"t0 {t0[k]}, disp {mean:.3f}, fold {fold:.1f}%", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--volume", type=Path, default=DEFAULT_VOLUME)
    parser.add_argument("--slices", default="2,5,8")
    parser.add_argument("--samples", type=int, default=16, help="samples per slice and row")
    parser.add_argument("--also", default="", help="extra drdm schedules (generation.py syntax)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the speed part")
    parser.add_argument("--speed-samples", type=int, default=2)
    parser.add_argument("--speed-slice", type=int, default=5)
    parser.add_argument("--figure-samples", type=int, default=4)
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument(
        "--authors-forward",
        action="store_true",
        help="add drdm's full chain on the authors' forward process (their integrator)",
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="run only the rows the JSON lacks and add them (their speed then is of another run)",
    )
    parser.add_argument("--figure-only", action="store_true", help="redraw the figure")
    parser.add_argument(
        "--former-numerics",
        action="store_true",
        help="add drdm's full chain with its numerics before the authors' were adopted",
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "fidelity.md")
    parser.add_argument("--report-only", action="store_true", help="rebuild the .md from the .json")
    args = parser.parse_args(argv)
    args.slices = [int(z) for z in args.slices.split(",")]
    data_path = args.output.with_suffix(".json")
    if args.report_only:
        report(json.loads(data_path.read_text()), args.output)
        return
    rows = drdm_rows(
        [s for s in args.also.split(",") if s], args.former_numerics, args.authors_forward
    )
    if args.figure_only:
        figure(args, rows, args.output.with_name("fidelity_samples.png"))
        return
    started = time.perf_counter()
    if args.append:
        data = json.loads(data_path.read_text())
        known = set(data["samples"])
        rows = [row for row in rows if row[0] not in known]
        data["appended"] = sorted({*data.get("appended", []), *(row[0] for row in rows)})
        sampled = sample_table(args, rows, with_authors=False)
        data["samples"].update(sampled)
        if data.get("speed") and not args.no_speed:
            data["speed"]["seconds"].update(speed_table(args, rows, with_authors=False)["seconds"])
        data["wall_seconds"] += time.perf_counter() - started
        write_text_atomic(data_path, json.dumps(data, indent=1) + "\n")
        report(data, args.output)
        print(args.output.read_text())
        return
    data = {
        "command": command_line("fidelity.py", sys.argv[1:] if argv is None else argv),
        "machine": machine_description(args.device),
        "device": args.device,
        "slices": args.slices,
        "samples_per_slice": args.samples,
        "volume": str(args.volume),
        "samples": sample_table(args, rows),
    }
    figure(args, rows, args.output.with_name("fidelity_samples.png"))
    data["speed"] = None

    def save() -> None:  # after each part: a run stopped in the speed part keeps the first
        data["wall_seconds"] = time.perf_counter() - started
        write_text_atomic(data_path, json.dumps(data, indent=1) + "\n")
        report(data, args.output)

    save()
    if not args.no_speed:
        data["speed"] = speed_table(args, rows)
        save()
    print(args.output.read_text())


if __name__ == "__main__":
    main()
