"""Registration trained on synthetic pairs vs. real pairs, on the embedded default data (CPU).

    python experiments/registration/run.py [--drdm-ckpt path/to/drdm.ckpt | --train-drdm] [--jobs 2]

One command runs the whole comparison of ``conf/experiment/default_registration.yaml``:

1. takes the field source of ``synthetic_drdm``: the packaged DRDM (``drdm.pretrained``,
   trained on the embedded data's training slabs), ``--drdm-ckpt PATH``, or with
   ``--train-drdm`` a small DRDM trained first with ``src/train.py``;
2. trains one registration network per mode with ``src/train.py``: ``unsupervised`` (real
   inter-slab pairs only), ``synthetic_bspline`` (the MRBS baseline) and ``synthetic_drdm``, the
   two synthetic modes alone and ``+real``;
3. evaluates every best checkpoint with ``src/eval.py`` on the held-out test pairs, whose
   ground-truth field is known (a smoothed-noise family that no training mode ever sees);
4. writes ``results/table.md``, ``results/table.csv``, ``results/per_pair.csv``,
   ``results/figure.png`` and ``results/run.json`` (see ``aggregate.py``).

Runs go under ``logs/registration_experiment/<time>/`` (git-ignored); jobs run with one torch
thread each, ``--jobs`` of them at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from aggregate import aggregate  # noqa: E402

MODES = (
    "unsupervised",
    "synthetic_bspline",
    "synthetic_bspline+real",
    "synthetic_drdm",
    "synthetic_drdm+real",
)
EXPERIMENT = "default_registration"
# CPU-sized DRDM (conf/train.yaml defaults on the embedded data, a smaller single-pass net):
# a few hundred steps, cheap enough to generate the synthetic_drdm fields on CPU
DRDM_OVERRIDES = (
    "model.net.channels=[8,16,16]",
    "model.net.recursions=1",
    "data.batch_size=4",
    "model.optimizer.lr=5e-4",
    "model.figure_every_n_epochs=0",
    "logger=csv",
)


def run_name(mode: str) -> str:
    """Folder name of a mode (``+`` is not welcome in paths)."""
    return mode.replace("+", "_plus_")


def run_script(script: str, overrides: list[str], folder: Path, log_name: str) -> float:
    """Run ``src/<script>`` with Hydra ``overrides`` into ``folder``; return its wall time (s)."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(ROOT / "src" / script),
        *overrides,
        f"hydra.run.dir={folder}",
        "torch_threads=1",
    ]
    environment = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    environment.setdefault("WANDB_MODE", "offline")
    start = time.perf_counter()
    with open(folder / log_name, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        done = subprocess.run(
            command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT
        )
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed (exit {done.returncode}); see {folder / log_name}")
    return time.perf_counter() - start


def quiet_trainer() -> list[str]:
    """Overrides that keep background runs' logs readable."""
    return [
        "~callbacks.rich_progress_bar",
        "~callbacks.rich_model_summary",
        "+trainer.enable_progress_bar=false",
    ]


def train_drdm(folder: Path, epochs: int, extra: list[str]) -> tuple[Path, float]:
    """Train the DRDM used by ``synthetic_drdm``; returns ``last.ckpt`` and the wall time."""
    overrides = [
        *DRDM_OVERRIDES,
        *quiet_trainer(),
        "task_name=registration_drdm",
        f"trainer.max_epochs={epochs}",
        f"trainer.check_val_every_n_epoch={epochs}",
        *extra,
    ]
    seconds = run_script("train.py", overrides, folder, "train.log")
    checkpoint = folder / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"the DRDM run wrote no {checkpoint}")
    return checkpoint, seconds


def best_checkpoint(folder: Path) -> Path:
    """The single best checkpoint ``ModelCheckpoint`` kept (not ``last.ckpt``)."""
    found = sorted(p for p in (folder / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")
    if not found:
        raise FileNotFoundError(f"no best checkpoint under {folder / 'checkpoints'}")
    return found[-1]


def evaluate(checkpoint: Path, folder: Path, eval_extra: list[str]) -> float:
    """``src/eval.py`` of one checkpoint into ``folder``; returns the wall time (s)."""
    overrides = [f"experiment={EXPERIMENT}", f"checkpoint={checkpoint}", *eval_extra]
    return run_script("eval.py", overrides, folder, "eval.log")


def train_and_evaluate(
    mode: str, folder: Path, drdm_checkpoint: Path | None, extra: list[str], eval_extra: list[str]
) -> dict:
    """Train one mode, evaluate its best checkpoint; returns paths and wall times."""
    overrides = [
        f"experiment={EXPERIMENT}",
        f"model.mode={mode}",
        f"task_name=registration_{run_name(mode)}",
        "test=false",
        *quiet_trainer(),
    ]
    if drdm_checkpoint is not None:
        overrides.append(f"model.field_sources.synthetic_drdm.checkpoint={drdm_checkpoint}")
    train_seconds = run_script("train.py", [*overrides, *extra], folder, "train.log")
    checkpoint = best_checkpoint(folder)
    eval_seconds = evaluate(checkpoint, folder / "eval", eval_extra)
    return {
        "mode": mode,
        "checkpoint": relative(checkpoint),
        "eval_dir": relative(folder / "eval"),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
    }


def relative(path: Path) -> str:
    """``path`` relative to the checkout when inside it (results name no machine paths)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads_per_job": 1,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: logs/...)")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument(
        "--drdm-ckpt",
        default="default",
        help="DRDM of synthetic_drdm (default: the packaged model, drdm.pretrained)",
    )
    parser.add_argument(
        "--train-drdm", action="store_true", help="train a small DRDM first instead"
    )
    parser.add_argument("--drdm-epochs", type=int, default=50)
    parser.add_argument(
        "--evaluate-only",
        type=Path,
        default=None,
        metavar="RUN_JSON",
        help="re-evaluate the checkpoints of a finished run (its run.json) and re-aggregate",
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra Hydra override for every registration training (repeatable)",
    )
    parser.add_argument(
        "--drdm-override", action="append", default=[], help="extra override of the DRDM run"
    )
    parser.add_argument(
        "--eval-override", action="append", default=[], help="extra override of src/eval.py"
    )
    return parser.parse_args(argv)


def evaluate_again(args: argparse.Namespace) -> Path:
    """Re-run ``src/eval.py`` on the checkpoints a finished run recorded, and re-aggregate."""
    info = json.loads(args.evaluate_only.read_text())
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        seconds = list(
            pool.map(
                lambda run: evaluate(
                    ROOT / run["checkpoint"], ROOT / run["eval_dir"], args.eval_override
                ),
                info["runs"],
            )
        )
    for run, value in zip(info["runs"], seconds, strict=True):
        run["eval_seconds"] = round(value, 1)
    info["evaluate_only_command"] = " ".join(
        ["python", "experiments/registration/run.py", *sys.argv[1:]]
    )
    table = aggregate(info, args.results, eval_overrides=args.eval_override)
    print(f"wrote {table}")
    return table


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.evaluate_only is not None:
        return evaluate_again(args)
    started = time.perf_counter()
    out = args.out or ROOT / "logs" / "registration_experiment" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    needs_drdm = any(mode.startswith("synthetic_drdm") for mode in args.modes)
    first = [m for m in args.modes if not m.startswith("synthetic_drdm")]
    second = [m for m in args.modes if m.startswith("synthetic_drdm")]
    timings: dict[str, float] = {}
    runs: list[dict] = []

    def job(mode: str, drdm_checkpoint: Path | None) -> dict:
        folder = out / run_name(mode)
        return train_and_evaluate(mode, folder, drdm_checkpoint, args.override, args.eval_override)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        drdm_future = None
        drdm_checkpoint = None if args.train_drdm else args.drdm_ckpt
        if needs_drdm and drdm_checkpoint is not None:
            from drdm.checkpoints import resolve_checkpoint

            if not resolve_checkpoint(drdm_checkpoint).is_file():
                raise FileNotFoundError(f"--drdm-ckpt: no such file {drdm_checkpoint}")
            if drdm_checkpoint != "default":
                drdm_checkpoint = Path(drdm_checkpoint).resolve()
        if needs_drdm and drdm_checkpoint is None:
            # the DRDM trains while the modes that do not need it run
            drdm_future = pool.submit(
                train_drdm, out / "drdm", args.drdm_epochs, args.drdm_override
            )
        futures = [pool.submit(job, mode, None) for mode in first]
        if drdm_future is not None:
            drdm_checkpoint, timings["drdm_train_seconds"] = drdm_future.result()
        futures += [pool.submit(job, mode, drdm_checkpoint) for mode in second]
        runs = [future.result() for future in futures]
    for run in runs:
        print(f"{run['mode']:>24}: train {run['train_seconds']} s, eval {run['eval_seconds']} s")
    timings["total_seconds"] = round(time.perf_counter() - started, 1)
    info = {
        "command": " ".join(["python", "experiments/registration/run.py", *(argv or sys.argv[1:])]),
        "experiment": EXPERIMENT,
        "drdm_checkpoint": (
            drdm_checkpoint
            if drdm_checkpoint in (None, "default")
            else relative(Path(drdm_checkpoint))
        ),
        "run_folder": relative(out),
        "machine": machine(),
        "timings": timings,
        "runs": runs,
    }
    table = aggregate(info, args.results, eval_overrides=args.eval_override)
    print(f"wrote {table} ({timings['total_seconds']:.0f} s)")
    return table


if __name__ == "__main__":
    main()
