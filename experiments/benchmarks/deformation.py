"""Benchmark of the DRDM forward process: our generator against the reference algorithm.

Not a test. For each case (2D 256^2 with batch 1 and 16, 3D 64^3 and 128^3 with batch 1) and each
step ``t`` in {1, 20, 48, 79} it times, in this process and with the same random draws:

* **ours**: ``drdm.deform.RandomDeformation`` built from ``conf/schedule/reference_2d.yaml`` /
  ``reference_3d.yaml`` (binary powers of the map on the control grid, only the kept voxels
  resampled onto the image);
* **loop**: the reference algorithm: one composition per step on the control grid for both the
  diffused and the target field, then linear upsampling of both to the full 2x grid and a centre
  crop, in the reference's units (``RandomDeformation(integrator="reference")``'s constants).

It prints and writes (``results/deformation.md``) the time ratio, folding ratio and mean / max
displacement (fraction of the image) of both, and peak memory at ``t = 79``: on CUDA from the
allocator, on CPU as the growth of the resident set of a fresh child process running that one
generation (so both methods are measured the same way).

Usage::

    python experiments/benchmarks/deformation.py [--quick] [--device cpu|cuda] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from drdm.deform import (
    RandomDeformation,
    compose,
    displacement_stats,
    folding_ratio,
)

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results" / "deformation.md"
STEPS = (1, 20, 48, 79)
CASES = {
    "2d-256-b1": dict(ndims=2, size=256, batch=1, schedule="reference_2d"),
    "2d-256-b16": dict(ndims=2, size=256, batch=16, schedule="reference_2d"),
    "3d-64-b1": dict(ndims=3, size=64, batch=1, schedule="reference_3d"),
    "3d-128-b1": dict(ndims=3, size=128, batch=1, schedule="reference_3d"),
}
QUICK_CASES = {
    "2d-64-b4": dict(ndims=2, size=64, batch=4, schedule="reference_2d"),
    "3d-32-b1": dict(ndims=3, size=32, batch=1, schedule="reference_3d"),
}


def ours_generator(case: dict) -> RandomDeformation:
    config = OmegaConf.load(ROOT / "conf" / "schedule" / f"{case['schedule']}.yaml")
    return instantiate(config)


def reference_generator(case: dict) -> RandomDeformation:
    """The reference's constants (v_scale 4e-5, integration on the control grid)."""
    return RandomDeformation(ndims=case["ndims"], integrator="reference")


def loop_on_full_grid(
    rd: RandomDeformation, shape: tuple[int, ...], t: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference algorithm: O(k) compositions, then a full 2x upsampling and a centre crop."""
    clean, perturbed = rd.velocities(t.shape[0], generator, t.device)
    diffusion_steps = rd.diffusion_steps(t).view(-1, *[1] * (rd.ndims + 1))
    recovery_steps = rd.recovery_steps(t).view(-1, *[1] * (rd.ndims + 1))
    diffused = torch.zeros_like(clean)
    target = torch.zeros_like(clean)
    for step in range(int(diffusion_steps.max())):  # k_rec <= k_diff for every t
        diffused = torch.where(diffusion_steps > step, compose(diffused, perturbed), diffused)
        target = torch.where(recovery_steps > step, compose(target, clean), target)
    mode = "bilinear" if rd.ndims == 2 else "trilinear"
    crop = (..., *[slice(n // 2, n // 2 + n) for n in shape])
    outputs = []
    for field in (diffused, target):
        full = F.interpolate(field, size=[2 * n for n in shape], mode=mode)
        # control voxels -> the reference's image units: S^2 / C^2 image voxels per control voxel
        factor = torch.tensor([n**2 / rd.control_size**2 for n in shape], device=field.device)
        outputs.append(full[crop] * factor.view(1, -1, *[1] * rd.ndims))
    return outputs[0], outputs[1]


def generate(method: str, case: dict, t_value: int, device: str):
    shape = (case["size"],) * case["ndims"]
    t = torch.full((case["batch"],), t_value, dtype=torch.long, device=device)
    generator = torch.Generator().manual_seed(0)
    if method == "ours":
        return ours_generator(case)(shape, t, generator)
    return loop_on_full_grid(reference_generator(case), shape, t, generator)


def timed(method: str, case: dict, t_value: int, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    diffused, _ = generate(method, case, t_value, device)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    stats = displacement_stats(diffused)
    return {
        "seconds": seconds,
        "folding": folding_ratio(diffused).mean().item(),
        "mean_fraction": stats["mean_fraction"].mean().item(),
        "max_fraction": stats["max_fraction"].amax().item(),
    }


def peak_memory(method: str, case_name: str, t_value: int, device: str, cases: dict) -> float:
    """Peak memory (MiB) of one generation: CUDA allocator peak, or child-process RSS growth."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        generate(method, cases[case_name], t_value, device)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    command = [sys.executable, __file__, "--memory-child", method, case_name, str(t_value)]
    if cases is QUICK_CASES:
        command.append("--quick")
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def memory_child(method: str, case_name: str, t_value: int, cases: dict) -> None:
    # warm up the libraries on a tiny case so that their one-off allocations are not counted
    generate(method, dict(cases[case_name], size=8, batch=1), 1, "cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    generate(method, cases[case_name], t_value, "cpu")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": (after - before) / 1024}))  # ru_maxrss is in KiB on Linux


def machine_description(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [
        f"CPU: {cpu}, {os.cpu_count()} logical cores visible, torch threads "
        f"{torch.get_num_threads()}",
        f"load average at start: {', '.join(f'{x:.1f}' for x in os.getloadavg())}",
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.system()}",
    ]
    if device == "cuda":
        parts.insert(0, f"GPU: {torch.cuda.get_device_name()}")
    return "; ".join(parts)


def run(cases: dict, device: str, output: Path) -> None:
    # warm-up: first calls pay for lazy initialisation
    for method in ("ours", "loop"):
        generate(method, dict(next(iter(cases.values())), size=16, batch=1), 5, device)
    rows = []
    header = (
        f"{'case':<11} {'t':>3} {'ours s':>8} {'loop s':>8} {'speed-up':>8} "
        f"{'fold ours':>9} {'fold loop':>9} {'mean ours':>9} {'mean loop':>9} "
        f"{'max ours':>8} {'max loop':>8}"
    )
    print(header)
    for name, case in cases.items():
        for t_value in STEPS:
            ours = timed("ours", case, t_value, device)
            loop = timed("loop", case, t_value, device)
            row = dict(case=name, t=t_value, ours=ours, loop=loop)
            if t_value == STEPS[-1]:
                row["memory"] = {
                    m: peak_memory(m, name, t_value, device, cases) for m in ("ours", "loop")
                }
            rows.append(row)
            print(
                f"{name:<11} {t_value:>3} {ours['seconds']:>8.3f} {loop['seconds']:>8.3f} "
                f"{loop['seconds'] / ours['seconds']:>7.1f}x "
                f"{100 * ours['folding']:>8.3f}% {100 * loop['folding']:>8.3f}% "
                f"{100 * ours['mean_fraction']:>8.2f}% {100 * loop['mean_fraction']:>8.2f}% "
                f"{100 * ours['max_fraction']:>7.1f}% {100 * loop['max_fraction']:>7.1f}%"
                + (
                    f"  peak MiB ours {row['memory']['ours']:.0f} loop {row['memory']['loop']:.0f}"
                    if "memory" in row
                    else ""
                ),
                flush=True,
            )
    write_report(rows, cases, device, output)


def write_report(rows: list, cases: dict, device: str, output: Path) -> None:
    lines = [
        "# DRDM forward-process benchmark",
        "",
        "Generated by `python experiments/benchmarks/deformation.py"
        + (" --device cuda" if device == "cuda" else "")
        + "` (not a test).",
        "",
        f"Machine: {machine_description(device)}.",
        "",
        "*ours*: `RandomDeformation` from `conf/schedule/reference_2d.yaml` (2D) or "
        "`reference_3d.yaml` (3D): binary powers of the map, only the kept voxels resampled. "
        "*loop*: the reference algorithm (one composition per step on the 64-point control grid, "
        "full 2x upsampling, centre crop, the reference's units and `v_scale = 4e-5`), run in "
        "the same process from the same random draws. Both produce the diffused and the "
        "recovery-target field. Folding: fraction of voxels with det J <= 0 (diffused field); "
        "mean / max: displacement length as a fraction of the image size (mean over the batch / "
        "max over the batch). Peak memory at t = 79: "
        + (
            "CUDA allocator peak."
            if device == "cuda"
            else "growth of the resident set of a fresh child process that runs that one "
            "generation."
        ),
        "",
        "| case | t | ours (s) | loop (s) | speed-up | folding ours | folding loop | "
        "mean ours | mean loop | max ours | max loop | peak MiB ours / loop |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ours, loop = row["ours"], row["loop"]
        memory = row.get("memory")
        lines.append(
            f"| {row['case']} | {row['t']} | {ours['seconds']:.3f} | {loop['seconds']:.3f} | "
            f"{loop['seconds'] / ours['seconds']:.1f}x | {100 * ours['folding']:.3f}% | "
            f"{100 * loop['folding']:.3f}% | {100 * ours['mean_fraction']:.2f}% | "
            f"{100 * loop['mean_fraction']:.2f}% | {100 * ours['max_fraction']:.1f}% | "
            f"{100 * loop['max_fraction']:.1f}% | "
            + (f"{memory['ours']:.0f} / {memory['loop']:.0f} |" if memory else "|")
        )
    lines += [
        "",
        "At 3D 64^3 the loop's fields are half the size of ours (as a fraction of the image): the "
        "reference's unit conversion scales them by image_size / 128; ours do not depend on the "
        "resolution (`v_scale` is a fraction of the control grid's field of view).",
        "",
    ]
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=output.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write("\n".join(lines))
    os.replace(tmp.name, output)
    print(f"wrote {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--memory-child", nargs=3, metavar=("METHOD", "CASE", "T"))
    args = parser.parse_args()
    cases = QUICK_CASES if args.quick else CASES
    if args.memory_child:
        method, case_name, t_value = args.memory_child
        memory_child(method, case_name, int(t_value), cases)
        return
    default_output = RESULTS.with_name("deformation_quick.md") if args.quick else RESULTS
    run(cases, args.device, args.output or default_output)


if __name__ == "__main__":
    main()
