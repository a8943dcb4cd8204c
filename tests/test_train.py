"""Training through real Hydra composition and a real Trainer (2D and 3D), and src/train.py."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from drdm.apps.train import train
from drdm.utils.instantiate import build

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def compose_train(tmp_path: Path, overrides: list[str]):
    """Compose conf/train.yaml as ``src/train.py`` would, with outputs under ``tmp_path``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.log_dir = str(tmp_path)
        cfg.hydra.runtime.output_dir = str(tmp_path)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


SMALL_NET = ["model.net.channels=[4,8,8]", "model.net.recursions=1", "torch_threads=1"]
# not the first run (conf/experiment/first_run.yaml fine-tunes the packaged model)
NO_EXPERIMENT = "~experiment"


@pytest.mark.slow
def test_fast_dev_run_2d(tmp_path):
    cfg = compose_train(
        tmp_path,
        [NO_EXPERIMENT, *SMALL_NET, "trainer.fast_dev_run=true", "logger=csv", "data.batch_size=2"],
    )
    result = train(cfg)
    assert result["trainer"].global_step == 1
    assert torch.isfinite(torch.tensor(result["metrics"]["val/loss"]))
    assert result["model"].hparams.image_size == list(cfg.data.image_size)


@pytest.mark.slow
def test_fast_dev_run_3d(tmp_path):
    cfg = compose_train(
        tmp_path,
        [
            *SMALL_NET,
            "experiment=default_3d",
            "data.image_size=[16,16,16]",
            "data.batch_size=1",
            "model.net.channels=[4,4,4]",
            "trainer.fast_dev_run=true",
            "logger=csv",
        ],
    )
    result = train(cfg)
    model = result["model"]
    assert model.hparams.ndims == 3 and model.net.ndims == 3 and model.deformation.ndims == 3
    assert result["trainer"].global_step == 1


@pytest.mark.parametrize(
    ("experiment", "ndims", "size"), [("acdc_drdm", 2, 256), ("lct_drdm", 3, 128)]
)
def test_experiments_compose_into_consistent_models(tmp_path, experiment, ndims, size):
    cfg = compose_train(tmp_path, [f"experiment={experiment}", "data.root=/nonexistent"])
    assert cfg.data.ndims == ndims and list(cfg.data.image_size) == [size] * ndims
    assert cfg.model.net.ndims == ndims and cfg.deformation.ndims == ndims
    assert cfg.task_name == experiment
    model = build(cfg.model)
    assert model.timesteps == 80 and model.hparams.image_size == [size] * ndims


def test_wandb_logger_is_offline_and_writes_under_the_run(tmp_path):
    cfg = compose_train(tmp_path, [])
    logger = build(cfg.logger.wandb)
    assert cfg.logger.wandb.offline is True
    assert Path(cfg.logger.wandb.save_dir) == tmp_path
    assert type(logger).__name__ == "WandbLogger"


@pytest.mark.slow
def test_train_script_writes_checkpoint_figure_and_logs_under_logs(tmp_path):
    """End to end: `python src/train.py` with tiny settings and the default wandb (offline)."""
    env = dict(os.environ, DRDM_ROOT=str(tmp_path), WANDB_MODE="offline", WANDB_SILENT="true")
    command = [
        sys.executable,
        str(REPO / "src" / "train.py"),
        NO_EXPERIMENT,
        *SMALL_NET,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "data.batch_size=2",
        "model.figure_t0=5",
        "task_name=e2e",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((tmp_path / "logs" / "e2e" / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "figures").glob("*.png"))
    assert list((run / "wandb").glob("offline-run-*"))
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    "group, option",
    [
        ("deformation", "default"),
        ("deformation", "default_3d"),
        ("deformation", "reference_2d"),
        ("deformation", "reference_3d"),
        ("data", "default"),
        ("data", "acdc_official"),
        ("data", "learn2reg"),
        ("data", "nifti_folder"),
    ],
)
def test_one_file_of_a_group_reads_as_hydra_composes_it(group, option):
    """``load_config`` (benchmarks, tests, the authors' checkpoint loader) merges the option's
    group-internal defaults (``base``, ...) the way Hydra does."""
    from omegaconf import OmegaConf

    from drdm.utils.instantiate import load_config

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        composed = compose("train", overrides=[f"{group}={option}", "paths.output_dir=unused"])
    read = load_config(CONF / group / f"{option}.yaml")
    assert "defaults" not in read
    assert OmegaConf.to_container(read) == OmegaConf.to_container(composed[group])


@pytest.mark.slow
def test_the_first_run_fine_tunes_the_packaged_model_and_says_where_everything_is(tmp_path):
    """`python src/train.py` with no overrides is the first run (conf/experiment/first_run.yaml);
    here with one epoch, and the summary it prints names files that exist."""
    from drdm.generation import DRDM
    from drdm.pretrained import DEFAULT_MODEL

    cfg = compose_train(tmp_path, [])
    assert cfg.model.init_weights == "default" and cfg.validate_first
    packaged = DRDM.load("default")
    assert cfg.model.figure_t0 == packaged.t0_start < cfg.model.net.timesteps
    assert cfg.model.figure_start_step == packaged.start_step
    env = dict(os.environ, DRDM_ROOT=str(tmp_path), WANDB_MODE="offline", WANDB_SILENT="true")
    command = [
        sys.executable,
        str(REPO / "src" / "train.py"),
        "torch_threads=1",
        "trainer.max_epochs=1",
        "trainer.check_val_every_n_epoch=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "~callbacks.rich_progress_bar",
        "+trainer.enable_progress_bar=false",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = done.stdout[done.stdout.index("Training finished") :]
    start, end = re.search(
        r"val/recovery_error: ([\d.]+) at the start -> ([\d.]+)", summary
    ).groups()
    # it starts from the packaged weights: already recovering (1 = nothing recovered)
    assert float(start) < 0.95 and float(end) < 0.95, summary
    named = dict(re.findall(r"^  (best checkpoint|last checkpoint|validation figures): (\S+)",
                            summary, re.M))  # fmt: skip
    assert set(named) == {"best checkpoint", "last checkpoint", "validation figures"}, summary
    assert all(Path(path).exists() for path in named.values()), named
    assert list(Path(named["validation figures"]).glob("*.png"))
    sync = re.search(r"wandb sync (\S+)", summary).group(1)
    assert Path(sync).is_dir()
    assert f"python src/augment.py ckpt_path={named['best checkpoint']}" in summary
    assert str(DEFAULT_MODEL) not in summary  # the user's own checkpoint is the next step's
