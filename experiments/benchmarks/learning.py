"""Learning-curve benchmark: how fast DRDM training reduces the recovery error, per recipe.

Not a test. Each recipe is a list of Hydra overrides of ``conf/train.yaml`` (embedded data, 2D
64 x 64, the same RecResACNet); it trains through ``drdm.apps.train.train`` (the real
Trainer, exactly what ``src/train.py`` runs) in its own process, one thread each, side by side.
Every ``--eval-every`` training samples a callback measures the recovery error
(:mod:`drdm.metrics.recovery`) of the network used for generation (the EMA copy when the recipe
keeps one) on **fixed validation fields**: the validation slices, each deformed by
``--fields-per-image`` fields of ``conf/deformation/default.yaml`` drawn once from a fixed seed at
steps spread evenly over ``0 .. T-1``, the same for every recipe. Training time excludes these
measurements.

Recipes:

* ``reference``: the authors' recipe: batch 1, Adam 1e-4 (constant), per-voxel relative error,
  no EMA, their field numerics (``deformation.integrator=reference``, ``refinement=1``) at the
  ``v_scale`` that gives drdm's displacement scale at 64 px (their unit conversion, image size
  squared over control size squared, is half the geometric one at 64 px and twice it at 256).
* ``drdm``: ``conf/train.yaml`` as shipped.

It writes ``results/learning.md`` (the curves as a table, the samples and seconds each recipe
needs to reach the error the reference recipe ends at, and their ratio), ``results/learning.png``
and ``results/learning.json``.

Usage::

    python experiments/benchmarks/learning.py [--samples N] [--eval-every N] [--quick]
        [--recipes drdm,reference] [--threads N] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from benchmark_utils import (
    RESULTS_DIR,
    ROOT,
    command_line,
    machine_description,
    markdown_table,
    write_atomic,
)

from drdm.utils.atomic import write_text_atomic

RECIPES = {
    "reference": [
        "data.batch_size=1",
        "model.optimizer.lr=1e-4",
        "model.scheduler=null",
        "model.ema_decay=null",
        "model.loss.rse_reduction=voxel",
        "deformation.integrator=reference",
        "deformation.refinement=1",
        "deformation.v_scale=1.6e-4",
    ],
    "drdm": [],
}
# what every recipe shares: no checkpoints, figures or loggers; the callback measures
COMMON = [
    "~experiment",  # each recipe from scratch, not the first run's fine-tune
    "logger=none",
    "callbacks=none",
    "model.figure_every_n_epochs=0",
    "trainer.max_epochs=-1",
    "trainer.min_epochs=0",
    "trainer.limit_train_batches=1.0",
    "trainer.limit_val_batches=0",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "+trainer.enable_checkpointing=false",
]


def fixed_validation_set(datamodule, fields_per_image: int):
    """The validation slices, each deformed by ``fields_per_image`` fields of
    ``conf/deformation/default.yaml`` (:func:`drdm.metrics.recovery.fixed_validation_fields`)."""
    from hydra.utils import instantiate

    from drdm.metrics.recovery import fixed_validation_fields
    from drdm.utils.instantiate import load_config

    schedule = instantiate(load_config(ROOT / "conf" / "deformation" / "default.yaml"))
    images = torch.cat([batch["image"] for batch in datamodule.dataloader("val", shuffle=False)])
    return fixed_validation_fields(images, schedule, fields_per_image)


class LearningCurve(L.Callback):
    """Measures the recovery error on fixed validation fields every ``eval_every`` samples.

    Writes ``{"points": [{"samples", "steps", "seconds", "recovery_error"}, ...]}`` to ``output``
    (JSON, atomically) after every measurement, so an interrupted run keeps its curve.
    """

    def __init__(
        self, output: str, eval_every: int, max_samples: int, fields_per_image: int = 4
    ) -> None:
        self.output = Path(output)
        self.eval_every = int(eval_every)
        self.max_samples = int(max_samples)
        self.fields_per_image = int(fields_per_image)
        self.points: list[dict] = []
        self.samples = 0
        self.training_seconds = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.validation = fixed_validation_set(trainer.datamodule, self.fields_per_image)
        self._measure(trainer, pl_module)
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        before = self.samples
        self.samples += int(batch["image"].shape[0]) * trainer.world_size
        done = self.samples >= self.max_samples
        if done or self.samples // self.eval_every > before // self.eval_every:
            self.training_seconds += time.perf_counter() - self.started
            self._measure(trainer, pl_module)
            self.started = time.perf_counter()
        # every recipe stops at the same number of samples, whatever its batch size
        trainer.should_stop = trainer.should_stop or done

    def _measure(self, trainer, pl_module) -> None:
        from drdm.metrics.recovery import evaluate_recovery
        from drdm.models.ema import averaged_net

        deformed, t, target = (x.to(pl_module.device) for x in self.validation)
        # the EMA's averaged copy where the run keeps one (what validation and generation use)
        measured = evaluate_recovery(averaged_net(trainer, pl_module), deformed, t, target)
        point = {
            "samples": self.samples,
            "steps": trainer.global_step,
            "seconds": round(self.training_seconds, 2),
            "recovery_error": measured["recovery_error"],
            "folding_ratio": measured["folding_ratio"],
        }
        self.points.append(point)
        print(json.dumps(point), flush=True)
        write_text_atomic(self.output, json.dumps({"points": self.points}, indent=1))


def run_recipe(args: argparse.Namespace) -> None:
    """Train one recipe in this process (the child side of :func:`main`)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from drdm.apps.train import register_resolvers, train

    register_resolvers()
    overrides = [*RECIPES[args.recipe], *COMMON, *args.override, f"torch_threads={args.threads}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    run_dir = Path(args.child_output).parent / f"run_{args.recipe}"
    batch = int(cfg.data.batch_size)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
        # an upper bound: the callback stops at --samples (the last batch of an epoch is smaller)
        cfg.trainer.max_steps = 2 * math.ceil(args.samples / batch)
        cfg.callbacks = {
            "learning_curve": {
                "_target_": "learning.LearningCurve",
                "output": args.child_output,
                "eval_every": args.eval_every,
                "max_samples": args.samples,
                "fields_per_image": args.fields_per_image,
            }
        }
    HydraConfig().set_config(cfg)
    train(cfg)


def samples_to_reach(points: list[dict], level: float, key: str) -> float | None:
    """First ``key`` value (samples or seconds) at which the curve is at or below ``level``,
    interpolated linearly between measurements; None if it never gets there."""
    if points and points[0]["recovery_error"] <= level:
        return float(points[0][key])
    for before, after in zip(points[:-1], points[1:]):
        if after["recovery_error"] <= level:
            if before["recovery_error"] <= level:
                return float(before[key])
            fraction = (before["recovery_error"] - level) / (
                before["recovery_error"] - after["recovery_error"]
            )
            return before[key] + fraction * (after[key] - before[key])
    return None


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, points in curves.items():
        error = [p["recovery_error"] for p in points]
        axes[0].plot([p["samples"] for p in points], error, marker=".", label=name)
        axes[1].plot([p["seconds"] / 60 for p in points], error, marker=".", label=name)
    for axis, label in zip(axes, ("training samples seen", "training time (CPU minutes)")):
        axis.set_xlabel(label)
        axis.set_ylabel("validation recovery error")
        axis.axhline(1.0, color="grey", lw=0.8, ls=":")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("DRDM learning curves, embedded data 64 x 64, fixed validation fields")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp.png")
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    os.replace(temporary, path)


def report(args, curves: dict[str, list[dict]], meta: dict) -> str:
    names = list(curves)
    lines = [
        "# DRDM learning-curve benchmark",
        "",
        f"Generated by `{meta['command']}` (not a test), {meta['wall_minutes']:.0f} min.",
        "",
        f"Machine: {meta['machine']} (the parent process; each recipe ran with "
        f"{args.threads} thread(s))",
        "",
        "Each recipe trains `conf/train.yaml` (embedded data, 2D 64 x 64, RecResACNet "
        "[10, 20, 40] x 2 recursions) through the real Trainer, in its own process with "
        f"{args.threads} thread(s), the recipes side by side. Every {args.eval_every} training "
        "samples the recovery error `sqrt(sum |q + d|^2 / sum |d|^2)` of the generation network "
        "(EMA copy where kept) is measured on fixed validation fields: the "
        f"validation slices x {args.fields_per_image} fields of `conf/deformation/default.yaml`, "
        "t spread over 0..79, one seed, identical for every recipe (0 = perfect, 1 = no "
        "recovery). Seconds: training time only.",
        "",
        "Recipes (Hydra overrides of `conf/train.yaml`):",
        "",
    ]
    for name in names:
        overrides = " ".join(RECIPES[name]) or "(none: the shipped defaults)"
        lines.append(f"- `{name}`: `{overrides}`")
    lines.append("")
    reference = curves.get("reference")
    if reference and len(names) > 1:
        level = min(p["recovery_error"] for p in reference[-3:])
        lines += [
            f"Target: the error the reference recipe reaches by its end, {level:.3f} "
            "(best of its last three measurements).",
            "",
        ]
        rows = []
        for name in names:
            samples = samples_to_reach(curves[name], level, "samples")
            seconds = samples_to_reach(curves[name], level, "seconds")
            ref_samples = samples_to_reach(reference, level, "samples")
            ref_seconds = samples_to_reach(reference, level, "seconds")
            rows.append(
                [
                    name,
                    f"{curves[name][-1]['recovery_error']:.3f}",
                    f"{min(p['recovery_error'] for p in curves[name]):.3f}",
                    "not reached" if samples is None else f"{samples:.0f}",
                    "" if samples is None else f"{samples / max(ref_samples, 1e-9):.2f}",
                    "not reached" if seconds is None else f"{seconds:.0f}",
                    "" if seconds is None else f"{seconds / max(ref_seconds, 1e-9):.2f}",
                ]
            )
        lines += markdown_table(
            [
                "recipe",
                "final error",
                "best error",
                "samples to target",
                "x reference",
                "seconds to target",
                "x reference",
            ],
            rows,
        )
        lines.append("")
    lines += ["## Curves", "", "![learning curves](learning.png)", ""]
    # one row per measurement: the k-th of every recipe (batches make the counts differ a little)
    rows = []
    for index in range(max(len(points) for points in curves.values())):
        row = []
        for name in names:
            points = curves[name]
            point = points[index] if index < len(points) else None
            row += (
                ["", "", "", ""]
                if point is None
                else [
                    str(point["samples"]),
                    str(point["steps"]),
                    f"{point['recovery_error']:.3f}",
                    f"{point['seconds']:.0f}",
                ]
            )
        rows.append(row)
    header = [f"{n} {what}" for n in names for what in ("samples", "steps", "error", "s")]
    lines += markdown_table(header, rows, align="r" * len(header))
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=48000, help="training samples per recipe")
    parser.add_argument("--eval-every", type=int, default=1600, help="samples between measures")
    parser.add_argument("--fields-per-image", type=int, default=4)
    parser.add_argument("--recipes", default="drdm,reference")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per recipe")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "learning.md")
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the report and figure from the results JSON of an earlier run",
    )
    # the child side: train one recipe and write its curve
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--child-output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [name for name in args.recipes.split(",") if name not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; known: {sorted(RECIPES)}")
    if args.quick:
        args.samples, args.eval_every, args.fields_per_image = 8, 4, 1
        args.override = [*args.override, "model.net.channels=[4,8,8]", "model.net.recursions=1"]
    return args


def main(argv=None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.recipe:
        run_recipe(args)
        return Path(args.child_output)
    if args.report_only:
        results = json.loads(args.output.with_suffix(".json").read_text())
        plot(results["curves"], args.output.with_suffix(".png"))
        write_atomic(args.output, report(args, results["curves"], results["meta"]))
        return args.output
    machine = machine_description()
    work = args.output.with_suffix("")
    work = work.parent / f".{work.name}_runs"
    names = args.recipes.split(",")
    started = time.perf_counter()
    children = {}
    for name in names:
        child = work / f"{name}.json"
        command = [sys.executable, str(Path(__file__).resolve()), *argv, "--recipe", name]
        command += ["--child-output", str(child)]
        environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        work.mkdir(parents=True, exist_ok=True)
        log = open(work / f"{name}.log", "w")  # noqa: SIM115 (closed after the wait below)
        children[name] = (subprocess.Popen(command, stdout=log, stderr=log, env=environment), log)
    for name, (process, log) in children.items():
        if process.wait() != 0:
            raise RuntimeError(f"recipe {name} failed: see {work / (name + '.log')}")
        log.close()
    curves = {name: json.loads((work / f"{name}.json").read_text())["points"] for name in names}
    meta = {
        "command": command_line("learning.py", argv),
        "machine": machine,
        "wall_minutes": round((time.perf_counter() - started) / 60, 1),
    }
    write_atomic(args.output.with_suffix(".json"), json.dumps({"meta": meta, "curves": curves}))
    plot(curves, args.output.with_suffix(".png"))
    text = report(args, curves, meta)
    print(text)
    write_atomic(args.output, text)
    return args.output


if __name__ == "__main__":
    main()
