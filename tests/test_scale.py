"""Scale-out: hardware configs, batch / LR scaling, per-rank seeding, DDP on CPU (gloo), Hydra
multirun, the submitit launcher and the Optuna sweeper, through real processes and real Hydra.

The DDP run and the submitit job start real Python processes (tens of seconds on a busy machine);
the multirun and the Optuna sweep run ``src/train.py`` in this process.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from helpers.overrides import CPU_DDP, TINY_REGISTRATION
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import OmegaConf, open_dict

from drdm.apps.train import (
    check_launch,
    count_devices,
    effective_batch_size,
    lr_scale_factor,
    optimized_metric,
    rank_seed,
    scale_batch_and_lr,
)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
TRAIN_SCRIPT = REPO / "src" / "train.py"
# a tiny DRDM run on the embedded 64 x 64 data: one epoch of one or two batches
TINY = [
    "~experiment",  # not the first run: tiny nets, no packaged weights
    "model.net.channels=[4,8,8]",
    "model.net.recursions=1",
    "torch_threads=1",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "data.batch_size=2",
    "model.figure_every_n_epochs=0",
    "logger=csv",
    "callbacks.rich_progress_bar=null",
    "callbacks.rich_model_summary=null",
]


def compose_train(overrides: list[str], output_dir: Path | None = None):
    """Compose conf/train.yaml with the hydra node (as ``src/train.py`` sees it)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.job.num = 0
    return cfg


def run_train_in_process(monkeypatch, root: Path, arguments: list[str]) -> None:
    """``python src/train.py ARGUMENTS`` inside this process, outputs under ``root/logs``."""
    GlobalHydra.instance().clear()
    monkeypatch.setenv("DRDM_ROOT", str(root))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", [str(TRAIN_SCRIPT), *arguments])
    runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")
    GlobalHydra.instance().clear()


def subprocess_env(root: Path) -> dict[str, str]:
    return dict(
        os.environ,
        DRDM_ROOT=str(root),
        OMP_NUM_THREADS="1",
        WANDB_MODE="offline",
        HYDRA_FULL_ERROR="1",
        # the child imports RankRecorder from this file
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    )


class RankRecorder(L.Callback):
    """Writes, per rank, the sample ids of every training batch and a checksum of the random
    field that rank's DRDM step draws for it (same generator as ``DRDMModule.training_step``)."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.rng_state = ""

    def on_train_start(self, trainer, pl_module) -> None:
        self.rng_state = hashlib.sha1(torch.random.get_rng_state().numpy().tobytes()).hexdigest()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        image = batch["image"].float()
        generator = pl_module._generator(trainer.current_epoch, batch_idx)
        jittered = pl_module._jitter(image, generator)
        t, diffused, _, _ = pl_module._forward_process(jittered, generator)
        self.records.append(
            {
                "ids": list(batch["id"]),
                "t": t.tolist(),
                "field_checksum": float(diffused.double().abs().sum()),
            }
        )

    def on_train_end(self, trainer, pl_module) -> None:
        folder = Path(trainer.default_root_dir) / "rank_records"
        folder.mkdir(parents=True, exist_ok=True)
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size}
        record.update(rng_state=self.rng_state, batches=self.records)
        (folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class TestRowsRecorder(L.Callback):
    """Writes, per rank, the registration module's per-pair test rows and logged test metrics."""

    def on_test_end(self, trainer, pl_module) -> None:
        folder = Path(trainer.default_root_dir) / "test_records"
        folder.mkdir(parents=True, exist_ok=True)
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        record = {"rows": pl_module.test_rows, "logged": logged, "world_size": trainer.world_size}
        (folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


# ------------------------------------------------------------------ batch and learning-rate rules


def test_count_devices_understands_lightning_settings():
    assert count_devices(4) == 4
    assert count_devices([0, 2]) == 2
    assert count_devices("0,1,3") == 3
    assert count_devices("2") == 2
    assert count_devices(-1) == max(torch.cuda.device_count(), 1)
    for bad in (0, -2, "gpu"):
        with pytest.raises(ValueError, match="hardware.devices"):
            count_devices(bad)


def test_effective_batch_size_and_lr_rules():
    assert effective_batch_size(8, 4, 2, 3) == 8 * 4 * 2 * 3
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        effective_batch_size(8, 1, 1, 0)
    assert lr_scale_factor("none", 64, 16) == 1.0
    assert lr_scale_factor("linear", 64, 16) == 4.0
    assert lr_scale_factor("sqrt", 64, 16) == 2.0
    with pytest.raises(ValueError, match="lr_scaling"):
        lr_scale_factor("cubic", 64, 16)


@pytest.mark.parametrize(
    ("option", "accelerator", "devices", "nodes", "strategy", "precision"),
    [
        ("cpu", "cpu", 1, 1, "auto", "32-true"),
        ("gpu", "gpu", 1, 1, "auto", "bf16-mixed"),
        ("ddp", "gpu", 4, 1, "ddp", "bf16-mixed"),
        ("multinode", "gpu", 4, 3, "ddp", "bf16-mixed"),
    ],
)
def test_hardware_is_one_override(option, accelerator, devices, nodes, strategy, precision):
    overrides = [f"hardware={option}", "data.batch_size=8", "trainer.accumulate_grad_batches=2"]
    if option in ("ddp", "multinode"):
        overrides.append("hardware.devices=4")
    if option == "multinode":
        overrides.append("hardware.num_nodes=3")
    cfg = compose_train(overrides)
    trainer = cfg.trainer
    assert (trainer.accelerator, trainer.devices, trainer.num_nodes) == (
        accelerator,
        devices,
        nodes,
    )
    assert (trainer.strategy, trainer.precision) == (strategy, precision)
    assert cfg.hardware.effective_batch_size == 8 * devices * nodes * 2


def test_lr_follows_the_effective_batch(tmp_path):
    overrides = [
        "hardware=ddp",
        "hardware.devices=4",
        "hardware.lr_scaling=linear",
        "hardware.base_batch_size=4",
        "data.batch_size=4",
        "model.optimizer.lr=1e-4",
    ]
    cfg = compose_train(overrides, tmp_path)
    scaling = scale_batch_and_lr(cfg, world_size=4)
    assert scaling["effective_batch_size"] == 16 and scaling["lr_factor"] == 4.0
    assert cfg.model.optimizer.lr == pytest.approx(4e-4)
    assert cfg.hardware.lr == pytest.approx(4e-4)

    segmentation = compose_train(
        [
            "experiment=default_fewshot",
            "hardware.lr_scaling=sqrt",
            "hardware.base_batch_size=4",
            "data.batch_size=16",
        ]
    )
    scaling = scale_batch_and_lr(segmentation, world_size=1)
    assert scaling["lr_factor"] == 2.0
    assert segmentation.model.optimizer.lr == pytest.approx(2 * 3e-3)


def test_rank_seeds_are_deterministic_and_distinct():
    seeds = [rank_seed(12345, rank) for rank in range(8)]
    assert seeds[0] == 12345 and len(set(seeds)) == 8
    assert seeds == [rank_seed(12345, rank) for rank in range(8)]


def test_script_launched_ddp_is_refused_inside_a_local_multirun(tmp_path):
    cfg = compose_train([], tmp_path)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig().set_config(cfg)
    ddp = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    with pytest.raises(ValueError, match="hydra/launcher=slurm"):
        check_launch(ddp)
    check_launch(L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False))


def test_multinode_config_picks_up_the_slurm_environment(tmp_path, monkeypatch):
    """Rank 3 of 2 nodes x 2 tasks as srun would start it: ranks come from SLURM, no relaunch."""
    slurm = {
        "SLURM_NTASKS": "4",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_JOB_NAME": "drdm",
        "SLURM_JOB_ID": "77",
        "SLURM_NODELIST": "node[1-2]",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
    }
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    # the Trainer below sets Lightning's process-wide rank (3): restore it afterwards, or every
    # later Trainer in this process would act as a non-zero rank (dummy loggers, no files)
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    overrides = [
        "hardware=multinode",
        "hardware.accelerator=cpu",
        "hardware.precision=32-true",
        "hardware.num_nodes=2",
        "hardware.devices=2",
        "hardware.lr_scaling=sqrt",
        "data.batch_size=4",
    ]
    cfg = compose_train(overrides, tmp_path)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig().set_config(cfg)
    trainer = L.Trainer(**{k: v for k, v in cfg.trainer.items() if k != "_target_"}, logger=False)
    assert type(trainer.strategy.cluster_environment).__name__ == "SLURMEnvironment"
    assert (trainer.world_size, trainer.global_rank, trainer.node_rank) == (4, 3, 1)
    check_launch(trainer)  # SLURM started the processes: allowed inside a sweep
    scaling = scale_batch_and_lr(cfg, trainer.num_devices * trainer.num_nodes)
    assert scaling["effective_batch_size"] == cfg.hardware.effective_batch_size == 16
    assert scaling["lr_factor"] == 2.0


def test_optimized_metric_names_what_was_logged():
    cfg = OmegaConf.create({"optimized_metric": "val/dice_mean"})
    trainer = L.Trainer(logger=False, enable_checkpointing=False)
    assert optimized_metric(cfg, {"trainer": trainer, "metrics": {"val/dice_mean": 0.5}}) == 0.5
    with pytest.raises(ValueError, match="val/loss"):
        optimized_metric(cfg, {"trainer": trainer, "metrics": {"val/loss": 1.0}})
    assert optimized_metric(OmegaConf.create({}), {"trainer": trainer, "metrics": {}}) is None


# ------------------------------------------------------------------ real runs


def run_train_script(root: Path, arguments: list[str], task: str) -> Path:
    """``python src/train.py ARGUMENTS task_name=TASK`` in a child process; its one run folder."""
    command = [sys.executable, str(TRAIN_SCRIPT), *arguments, f"task_name={task}"]
    done = subprocess.run(
        command, cwd=root, env=subprocess_env(root), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]
    runs = list((root / "logs" / task / "runs").iterdir())
    assert len(runs) == 1, runs  # under DDP the second rank writes into the first rank's folder
    return runs[0]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_trains_each_rank_on_its_own_samples(tmp_path):
    arguments = [
        *TINY,
        "trainer.limit_train_batches=2",
        *CPU_DDP,
        "hardware.lr_scaling=linear",
        "hardware.base_batch_size=2",
        "model.optimizer.lr=1e-4",
        "+callbacks.rank_record._target_=test_scale.RankRecorder",
    ]
    run = run_train_script(tmp_path, arguments, "ddp")

    records = [json.loads((run / "rank_records" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    ids = [{i for batch in r["batches"] for i in batch["ids"]} for r in records]
    assert len(ids[0]) == len(ids[1]) == 4 and not ids[0] & ids[1]
    fields = [[batch["field_checksum"] for batch in r["batches"]] for r in records]
    assert all(value > 0 for value in fields[0] + fields[1])
    assert not set(fields[0]) & set(fields[1])
    assert records[0]["rng_state"] != records[1]["rng_state"]

    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints.count("last.ckpt") == 1 and len(checkpoints) == 2, checkpoints
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2
    # linear LR scaling: effective batch 2 x 2 processes against a base batch of 2
    assert saved["hyper_parameters"]["optimizer"]["lr"] == pytest.approx(2e-4)
    assert len(list(run.glob("csv/version_*/metrics.csv"))) == 1
    # the effective values are logged with the run's hyper-parameters
    logged = yaml.safe_load(next(run.glob("csv/version_*/hparams.yaml")).read_text())
    assert logged["hardware"]["effective_batch_size"] == 4
    assert logged["hardware"]["lr"] == pytest.approx(2e-4)


@pytest.mark.slow
def test_ddp_registration_test_metrics_are_exact_and_every_rank_has_every_pair(tmp_path):
    """Two gloo processes test 4 pairs (2 each): the logged means equal the means over all
    pairs' rows (torchmetrics reduces sums, not per-rank means), on both ranks."""
    arguments = [
        *TINY_REGISTRATION,
        "model.mode=unsupervised",
        "test=true",
        "data.eval_batch_size=1",
        "data.pairs.max_pairs_eval=4",
        *CPU_DDP,
        "+callbacks.test_rows._target_=test_scale.TestRowsRecorder",
    ]
    run = run_train_script(tmp_path, arguments, "ddp_registration")
    records = [json.loads((run / "test_records" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    ids = [[row["id"] for row in r["rows"]] for r in records]
    assert len(ids[0]) == 4 and len(set(ids[0])) == 4 and sorted(ids[0]) == sorted(ids[1])
    rows = records[0]["rows"]
    for name in ("dice", "field_error", "folding_ratio"):
        values = [row[name] for row in rows if math.isfinite(row[name])]
        expected = sum(values) / len(values)
        for record in records:
            assert record["logged"][f"test/{name}"] == pytest.approx(expected, rel=1e-5), name


@pytest.mark.slow
def test_multirun_writes_one_folder_with_its_config_per_job(tmp_path, monkeypatch):
    run_train_in_process(
        monkeypatch, tmp_path, ["-m", "seed=1,2", "trainer.fast_dev_run=true", *TINY]
    )
    sweeps = list((tmp_path / "logs" / "drdm" / "multiruns").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    seeds = [yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["seed"] for job in jobs]
    assert seeds == [1, 2]


def test_slurm_launcher_writes_an_sbatch_script_with_the_configured_resources(
    tmp_path, monkeypatch
):
    """The sbatch script submitit would submit for `hydra/launcher=slurm` (no cluster needed:
    an `srun` stub on PATH only passes submitit's check that it runs on a SLURM machine)."""
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = compose_train(
        [
            "hydra/launcher=slurm",
            "hardware=multinode",
            "hardware.num_nodes=2",
            "hardware.devices=8",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.timeout_min=90",
            "hydra.launcher.account=imaging",
        ],
        tmp_path,
    )
    HydraConfig().set_config(cfg)
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.devices == 8

    stub = tmp_path / "bin" / "srun"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 1\n")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}{os.pathsep}{os.environ['PATH']}")
    # the same parameter mapping as SlurmLauncher.launch
    params = dict(launcher.params)
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=tmp_path, slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -m job", "uid")
    # one SLURM task per GPU on each node: Lightning's SLURMEnvironment then wires the ranks
    for line in (
        "--partition=gpu",
        "--time=90",
        "--account=imaging",
        "--nodes=2",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--cpus-per-task=4",
        "--job-name=drdm",
    ):
        assert f"#SBATCH {line}\n" in script, line


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_job(tmp_path, monkeypatch):
    run_train_in_process(
        monkeypatch,
        tmp_path,
        [
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=5",
            "trainer.fast_dev_run=true",
            "task_name=submitit",
            *TINY,
        ],
    )
    sweeps = list((tmp_path / "logs" / "submitit" / "multiruns").iterdir())
    job = sweeps[0] / "0"
    assert (job / ".hydra" / "config.yaml").is_file()
    assert list((sweeps[0] / ".submitit").glob("*/*_result.pkl"))


@pytest.mark.parametrize(
    ("search", "metric", "direction"),
    [
        ("drdm_optuna", "val/recovery_error", "minimize"),
        ("fewshot_optuna", "val/dice_mean", "maximize"),
    ],
)
def test_optuna_searches_compose(search, metric, direction):
    overrides = [f"hparams_search={search}"]
    if search == "fewshot_optuna":
        overrides.append("experiment=default_fewshot")
    cfg = compose_train(overrides)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.mode == RunMode.MULTIRUN
    assert cfg.optimized_metric == metric and sweeper.direction == direction
    assert cfg.callbacks.model_checkpoint.monitor == metric
    for key in sweeper.params:
        # every searched key exists in the composed config (a typo would add a new key)
        assert OmegaConf.select(cfg, key) is not None, key


@pytest.mark.slow
def test_optuna_sweep_runs_two_trials_and_reports_the_best(tmp_path, monkeypatch):
    run_train_in_process(
        monkeypatch,
        tmp_path,
        [
            "hparams_search=drdm_optuna",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2",
            "task_name=optuna",
            *TINY,
        ],
    )
    sweep = next((tmp_path / "logs" / "optuna" / "multiruns").iterdir())
    trials = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(trials) == 2
    learning_rates = [
        yaml.safe_load((t / ".hydra" / "config.yaml").read_text())["model"]["optimizer"]["lr"]
        for t in trials
    ]
    assert learning_rates[0] != learning_rates[1]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna"
    assert math.isfinite(results["best_value"]) and results["best_value"] > 0.0
    assert results["best_params"]["model.optimizer.lr"] in learning_rates
