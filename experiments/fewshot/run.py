"""Few-shot segmentation sweep on the embedded default data, CPU-sized, with its results table.

One command::

    python experiments/fewshot/run.py [--drdm-ckpt PATH | --train-drdm]
        [--strategies none,bigaug,drdm_cpu] [--n-labelled 1,5] [--seeds 0,1,2] [--epochs 40]
        [--output DIR] [-- HYDRA_OVERRIDES ...]

1. The ``drdm*`` strategies use the packaged DRDM (``drdm.pretrained``, trained on the embedded
   data's training slabs: the few-shot validation and test slabs never seen), or
   ``--drdm-ckpt PATH`` (needed for experiments on other data); ``--train-drdm`` trains a small
   one first (``src/train.py``, ``--drdm-epochs`` epochs, the experiment's validation / test
   groups held out).
2. Runs the Hydra multirun sweep ``src/train.py -m experiment=default_fewshot
   augmentation=<strategies> data.n_labelled=<n> seed=<seeds>`` in a subprocess (1 torch thread
   per job), each job testing its best checkpoint on the fixed test slabs.
3. Aggregates the runs' ``test_metrics.json`` (``experiments/fewshot/aggregate.py``) into
   ``table.md``, ``runs.csv``, ``summary.csv`` and ``plot.png`` in ``--output``, and writes
   ``run_info.md`` there with the exact commands, the machine and the wall times.

Run folders go under ``logs/fewshot_drdm/`` and ``logs/fewshot/sweeps/`` (git-ignored).
Everything after ``--`` is passed to every sweep job (e.g. ``-- trainer.max_epochs=5``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TRAIN = ROOT / "src" / "train.py"
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "benchmarks"))  # machine.py: what a result ran on

from aggregate import aggregate, write_text_atomic  # noqa: E402
from machine import machine_description  # noqa: E402

# quiet, single-threaded jobs: the rich progress bar floods a log file and threads oversubscribe
# a shared CPU
QUIET = ["~callbacks.rich_progress_bar", "+trainer.enable_progress_bar=false"]


def split_overrides(experiment: str) -> list[str]:
    """The experiment's fixed validation and test groups as ``data.split`` overrides.

    The DRDM is trained with them so that it never sees the few-shot test images, not even for
    choosing its checkpoint.
    """
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        config = compose("train", overrides=[f"experiment={experiment}"])
    overrides = []
    for key in ("val_ids", "test_ids"):
        groups = config.data.split.get(key)
        if not groups:
            raise ValueError(
                f"experiment={experiment} must fix data.split.{key} (the few-shot test set)"
            )
        overrides.append(f"data.split.{key}=[{','.join(str(g) for g in groups)}]")
    return overrides


def drdm_command(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """``src/train.py`` command that trains the small DRDM (embedded data) used for augmentation.

    Same data and split as the few-shot experiment; only the training groups' images are used.
    """
    return [
        sys.executable,
        str(TRAIN),
        "logger=csv",
        "task_name=fewshot_drdm",
        f"torch_threads={args.threads}",
        f"seed={args.drdm_seed}",
        f"trainer.max_epochs={args.drdm_epochs}",
        f"model.figure_every_n_epochs={max(args.drdm_epochs // 3, 1)}",
        f"model.net.channels={args.drdm_channels}",
        "model.net.recursions=1",
        f"model.optimizer.lr={args.drdm_lr}",
        *split_overrides(args.experiment),
        f"hydra.run.dir={run_dir}",
        *QUIET,
    ]


def sweep_command(args: argparse.Namespace, checkpoint: str | None, sweep_dir: Path) -> list[str]:
    """``src/train.py -m`` command of the few-shot sweep."""
    command = [
        sys.executable,
        str(TRAIN),
        "-m",
        f"experiment={args.experiment}",
        # the first swept key varies slowest: every strategy and n_labelled of seed 0 finish
        # before seed 1 starts, so an interrupted sweep still aggregates into a full table
        f"seed={args.seeds}",
        f"data.n_labelled={args.n_labelled}",
        f"augmentation={args.strategies}",
        f"torch_threads={args.threads}",
        f"trainer.max_epochs={args.epochs}",
        f"hydra.sweep.dir={sweep_dir}",
        *QUIET,
    ]
    if checkpoint is not None:
        command.append(f"drdm_checkpoint={checkpoint}")
    return command + list(args.overrides)


def find_checkpoint(run_dir: Path) -> Path:
    """The best checkpoint of a DRDM run (lowest val/loss kept), else ``last.ckpt``."""
    folder = run_dir / "checkpoints"
    best = sorted(p for p in folder.glob("epoch*.ckpt"))
    candidates = sorted(best, key=_checkpoint_loss) or sorted(folder.glob("last.ckpt"))
    if not candidates:
        raise FileNotFoundError(f"the DRDM run wrote no checkpoint in {folder}")
    return candidates[0]


def _checkpoint_loss(path: Path) -> float:
    """``val/loss`` from a name like ``epoch0012-loss3865.2485.ckpt`` (inf if absent)."""
    stem = path.stem
    try:
        return float(stem.split("-loss", 1)[1])
    except (IndexError, ValueError):
        return float("inf")


def machine() -> str:
    return machine_description()


def shown(command: list[str]) -> str:
    """A command as text without this machine's paths (interpreter, checkout)."""
    words = ["python" if word == sys.executable else word for word in command]
    # the checkout first, then what lies beside it (../shared)
    text = shlex.join(words).replace(f"{ROOT}{os.sep}", "")
    return text.replace(f"{ROOT.parent}{os.sep}", f"..{os.sep}")


def run(command: list[str], log_path: Path, threads: int = 1) -> float:
    """Run ``command`` from the repository root with ``threads`` OpenMP threads; return the wall
    seconds."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print("$", shown(command), f"  # log: {log_path}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        result = subprocess.run(
            command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT
        )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"command failed ({result.returncode}); see the end of {log_path}")
    return seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Few-shot segmentation sweep (none / BigAug / DRDM) with a results table."
    )
    parser.add_argument(
        "--drdm-ckpt",
        default="default",
        help="DRDM checkpoint of the drdm strategies (default: the packaged model)",
    )
    parser.add_argument(
        "--train-drdm",
        action="store_true",
        help="train a small DRDM first (--drdm-epochs ...) instead of using --drdm-ckpt",
    )
    parser.add_argument("--experiment", default="default_fewshot")
    parser.add_argument("--strategies", default="none,bigaug,drdm_cpu")
    parser.add_argument("--n-labelled", default="1,5")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=40, help="segmentation epochs per run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--drdm-epochs", type=int, default=60)
    parser.add_argument("--drdm-channels", default="[8,16,32]")
    parser.add_argument("--drdm-lr", type=float, default=5e-4)
    parser.add_argument("--drdm-seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=HERE / "results")
    parser.add_argument("--logs", type=Path, default=ROOT / "logs", help="where the run folders go")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every sweep job")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d_%H-%M-%S")
    started = time.perf_counter()
    invocation = shlex.join(["python", "experiments/fewshot/run.py", *(argv or sys.argv[1:])])
    lines = ["# Few-shot sweep: how these results were made", ""]
    lines += [f"- Command: `{invocation}`", f"- Started: {stamp} UTC", f"- Machine: {machine()}"]

    needs_drdm = any(name.startswith("drdm") for name in args.strategies.split(","))
    checkpoint = None
    if needs_drdm and args.train_drdm:
        drdm_dir = args.logs / "fewshot_drdm" / "runs" / stamp
        command = drdm_command(args, drdm_dir)
        seconds = run(command, drdm_dir / "stdout.log")
        checkpoint = str(find_checkpoint(drdm_dir).resolve())
        lines.append(f"- DRDM training ({seconds / 60:.1f} min): `{shown(command)}`")
    elif needs_drdm:
        from drdm.checkpoints import resolve_checkpoint

        if not resolve_checkpoint(args.drdm_ckpt).is_file():
            raise FileNotFoundError(f"--drdm-ckpt: no such file {args.drdm_ckpt}")
        # "default" stays a word: DRDM.load reads it as the packaged model
        checkpoint = args.drdm_ckpt
    if checkpoint is not None:
        lines.append(f"- DRDM checkpoint: `{shown([checkpoint])}`")

    sweep_dir = args.logs / "fewshot" / "sweeps" / stamp
    command = sweep_command(args, checkpoint, sweep_dir)
    seconds = run(command, sweep_dir / "stdout.log")
    lines.append(f"- Sweep ({seconds / 60:.1f} min): `{shown(command)}`")
    lines.append(f"- Sweep folder: `{shown([str(sweep_dir.resolve())])}`")

    result = aggregate([sweep_dir], args.output)
    total = (time.perf_counter() - started) / 60
    lines.append(f"- Total wall time: {total:.1f} min for {len(result['runs'])} runs")
    write_text_atomic(args.output / "run_info.md", "\n".join(lines) + "\n")
    print(result["table"])
    print(f"results in {args.output}")


if __name__ == "__main__":
    main()
