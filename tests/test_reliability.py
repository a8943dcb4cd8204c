"""Faults and bad input: nothing a user owns is lost, nothing is silently wrong, kills resume.

Real processes, real files: ``src/augment.py`` and ``src/train.py`` are killed with SIGKILL and
resumed; every bad input is refused with a message that names the file, key or value, before
any sample is generated and without leaving folders behind.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers.augment_inputs import SIZE, write_inputs
from helpers.augment_inputs import blob_volume as _blob_volume
from helpers.augment_inputs import output_files as _files
from test_train import compose_train

from drdm.apps.augment import ResumeMismatch, augment
from drdm.apps.train import train
from drdm.data.io import save_nifti
from drdm.generation import SHIPPED_DEFAULTS
from drdm.pretrained import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]


def _snapshot(folder: Path, skip: Path | None = None) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder`` (dot-files included)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and (skip is None or skip not in p.parents)
    }


def _script_env(**extra: str) -> dict[str, str]:
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        **extra,
    )


# ----------------------------------------------------------------------------- the writer


def test_the_writer_removes_only_its_own_leftover_temporaries(checkpoint, tmp_path):
    inputs = write_inputs(tmp_path / "inputs")
    output = tmp_path / "out"
    users = {
        ".notes": "my notes",
        ".gitignore": "*.nii.gz\n",
        "image/.keep": "",
        "image/.slice_0.nii.gz.backup": "an older tool's temporary-looking file",
        "field/.hidden_settings": "x",
    }
    for name, text in users.items():
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        (output / name).write_text(text)
    ours = [  # what a killed atomic write of this writer leaves behind
        output / "image" / ".slice_0.nii.gz.drdm-tmp-a1b2c3d4.nii.gz",
        output / ".manifest.csv.drdm-tmp-zz_9.csv",
    ]
    for stale in ours:
        stale.write_bytes(b"half written")
    augment(checkpoint, inputs, output, num_samples=1, seed=1, device="cpu", progress=False)
    for name, text in users.items():
        assert (output / name).read_text() == text, name
    assert not any(stale.exists() for stale in ours)
    assert (output / "run.json").is_file() and (output / "image" / "slice_0.nii.gz").is_file()


def test_an_output_dir_that_is_an_input_folder_is_refused_and_a_nested_one_touches_nothing(
    checkpoint, tmp_path
):
    inputs = write_inputs(tmp_path / "inputs")
    (inputs / ".notes").write_text("mine")
    (inputs / "notes.txt").write_text("mine too")
    before = _snapshot(inputs)
    for output in (inputs, inputs / "labels", inputs.parent / "in" / ".." / "inputs"):
        with pytest.raises(ValueError, match="choose an output_dir outside the input folders"):
            augment(checkpoint, inputs, output, num_samples=1, device="cpu", progress=False)
    assert _snapshot(inputs) == before  # nothing written, nothing removed

    nested = inputs / "augmented"
    first = augment(checkpoint, inputs, nested, num_samples=1, device="cpu", progress=False)
    assert first["inputs"] == 2 and first["generated"] == 2
    assert _snapshot(inputs, skip=nested) == before
    # the outputs are not read as inputs by the next run
    again = augment(checkpoint, inputs, nested, num_samples=1, device="cpu", progress=False)
    assert again == {"inputs": 2, "generated": 0, "skipped": 2}


def test_inputs_whose_outputs_would_collide_are_refused_naming_both(checkpoint, tmp_path):
    folder = tmp_path / "inputs"
    image, _ = _blob_volume((SIZE, SIZE), seed=3)
    save_nifti(folder / "x.nii", image, np.eye(4))
    save_nifti(folder / "x.nii.gz", image + 1, np.eye(4))
    with pytest.raises(ValueError, match=r"x\.nii .*x\.nii\.gz|x\.nii\.gz .*x\.nii\b"):
        augment(checkpoint, folder, tmp_path / "out", num_samples=1, device="cpu")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- resume identity


def test_a_resume_must_be_the_same_run_or_an_explicit_overwrite(checkpoint, tmp_path):
    inputs = write_inputs(tmp_path / "inputs")
    output = tmp_path / "out"

    def run(folder=output, **options):
        arguments = {"num_samples": 1, "seed": 11, "device": "cpu", "progress": False}
        return augment(checkpoint_path, inputs, folder, **{**arguments, **options})

    checkpoint_path = checkpoint
    assert run()["generated"] == 2
    record = json.loads((output / "run.json").read_text())
    assert record["seed"] == 11 and len(record["checkpoint_sha256"]) == 64
    assert set(record["inputs"]) == {"slice", "stack"} and record["settings"]["timesteps"] == 20
    written = _files(output)

    with pytest.raises(ResumeMismatch, match=r"seed: 11 -> 12(.|\n)*overwrite=true"):
        run(seed=12)
    shipped = SHIPPED_DEFAULTS["sampling_steps"]  # what a checkpoint without its own gets
    with pytest.raises(ResumeMismatch, match=rf"settings\.sampling_steps: {shipped} -> 2"):
        run(drdm_options={"sampling_steps": 2})
    with pytest.raises(ResumeMismatch, match=r"t0: None -> 5"):
        run(t0=5)
    other = tmp_path / "other.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    key = next(k for k in state["state_dict"] if k.endswith("weight"))
    state["state_dict"][key] = state["state_dict"][key] + 1e-3
    torch.save(state, other)
    checkpoint_path = other
    with pytest.raises(ResumeMismatch, match="checkpoint_sha256"):
        run()
    checkpoint_path = checkpoint
    # the same run resumes; more samples add to it
    assert run()["generated"] == 0
    assert run(num_samples=2) == {"inputs": 2, "generated": 2, "skipped": 2}
    assert all(_files(output)[name] == data for name, data in written.items() if name != "manifest")

    # an input whose content changed
    original = nib.load(inputs / "slice.nii.gz")
    changed = original.get_fdata().astype(np.float32) * 0.5
    save_nifti(inputs / "slice.nii.gz", changed, original.affine)
    with pytest.raises(ResumeMismatch, match=r"inputs\.slice\.image_sha256"):
        run()

    # overwrite: the old samples go, the new run's files equal a fresh run's
    summary = run(seed=12, overwrite=True)
    assert summary == {"inputs": 2, "generated": 2, "skipped": 0}
    assert not (output / "image" / "slice_1.nii.gz").exists()  # listed by the old manifest
    fresh = tmp_path / "fresh"
    run(folder=fresh, seed=12)
    assert _files(output) == _files(fresh)
    assert {row["seed"] for row in csv.DictReader(open(output / "manifest.csv"))} == {"12"}


def test_a_folder_with_files_of_unknown_origin_is_refused(checkpoint, tmp_path):
    inputs = write_inputs(tmp_path / "inputs")
    output = tmp_path / "out"
    (output / "image").mkdir(parents=True)
    (output / "image" / "slice_0.nii.gz").write_bytes(b"someone else's sample")
    with pytest.raises(ResumeMismatch, match=r"image/slice_0\.nii\.gz but no run\.json"):
        augment(checkpoint, inputs, output, num_samples=1, device="cpu", progress=False)
    assert (output / "image" / "slice_0.nii.gz").read_bytes() == b"someone else's sample"
    summary = augment(
        checkpoint, inputs, output, num_samples=1, device="cpu", progress=False, overwrite=True
    )
    assert summary["generated"] == 2 and nib.load(output / "image" / "slice_0.nii.gz").shape


# ----------------------------------------------------------------------------- bad inputs


def _slice_case(folder: Path, image=None, label=None) -> Path:
    base, base_label = _blob_volume((SIZE, SIZE), seed=2)
    save_nifti(folder / "case.nii.gz", base if image is None else image, np.eye(4))
    save_nifti(folder / "case_gt.nii.gz", base_label if label is None else label, np.eye(4))
    return folder


def _label_with(value: float) -> np.ndarray:
    label = _blob_volume((SIZE, SIZE), seed=2)[1].astype(np.float32)
    label[3:6, 3:6] = value
    return label


def _nan_image() -> np.ndarray:
    image = _blob_volume((SIZE, SIZE), seed=2)[0]
    image[4, 4] = np.nan
    return image


BAD_AUGMENT_INPUTS = [
    # (id, image, label, options, error, message)
    ("singleton x", np.ones((1, SIZE, 3), np.float32), np.zeros((1, SIZE, 3), np.int16), {},
     ValueError, r"case\.nii\.gz: shape \[1, 32, 3\] has an in-plane axis of 1 voxel"),
    ("singleton y", np.ones((SIZE, 1, 3), np.float32), np.zeros((SIZE, 1, 3), np.int16), {},
     ValueError, r"case\.nii\.gz: shape \[32, 1, 3\] has an in-plane axis of 1 voxel"),
    ("negative label", None, _label_with(-3), {}, ValueError, r"case_gt\.nii\.gz.*found \[-3\]"),
    ("huge label", None, _label_with(100000), {}, ValueError, r"case_gt.*found \[100000\]"),
    ("label 0.4", None, _label_with(0.4), {}, ValueError, r"case_gt.*integer.*\[0\.4"),
    ("label 1.4", None, _label_with(1.4), {}, ValueError, r"case_gt.*integer.*\[1\.4"),
    ("NaN image", _nan_image(), None, {}, ValueError, r"case\.nii\.gz holds 1 non-finite"),
    ("seed abc", None, None, {"seed": "abc"}, ValueError, "seed must be an integer, got 'abc'"),
    ("slice_axis 5", None, None, {"slice_axis": 5}, ValueError, "slice_axis must be 0, 1 or 2"),
    ("num_samples 0", None, None, {"num_samples": 0}, ValueError, "num_samples must be >= 1"),
    ("t0 text", None, None, {"t0": "late"}, ValueError, "t0 must be an integer, got 'late'"),
    ("t0 too late", None, None, {"t0": 99}, ValueError, r"t0 must lie in 0 \.\. 19, got 99"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("image", "label", "options", "error", "message"),
    [case[1:] for case in BAD_AUGMENT_INPUTS],
    ids=[case[0] for case in BAD_AUGMENT_INPUTS],
)
def test_bad_augment_inputs_are_refused_early_naming_the_culprit(
    checkpoint, tmp_path, image, label, options, error, message
):
    inputs = _slice_case(tmp_path / "inputs", image, label)
    output = tmp_path / "out"
    with pytest.raises(error, match=message):
        augment(checkpoint, inputs, output, **{"num_samples": 1, "device": "cpu", **options})
    assert not output.exists()  # nothing half-made: no folders, no run record


def _run_script(script: str, arguments: list[str], cwd: Path, **env: str):
    command = [sys.executable, str(REPO / "src" / script), *arguments]
    return subprocess.run(
        command, cwd=cwd, env=_script_env(**env), capture_output=True, text=True, timeout=600
    )


def test_the_augment_script_reports_a_bad_value_in_one_line(checkpoint, tmp_path):
    inputs = _slice_case(tmp_path / "inputs")
    arguments = [f"ckpt_path={checkpoint}", f"input={inputs}", f"output_dir={tmp_path / 'out'}"]
    for override, message in (
        ("seed=abc", "augment.py: error: seed must be an integer, got 'abc'"),
        ("slice_axis=5", "augment.py: error: slice_axis must be 0, 1 or 2"),
    ):
        done = _run_script(
            "augment.py", [*arguments, override, f"hydra.run.dir={tmp_path / 'h'}"], tmp_path
        )
        assert done.returncode == 1 and message in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("trainer.max_epochs=abc", ValueError, "trainer.max_epochs must be an integer"),
        ("trainer.limit_train_batches=all", ValueError, "trainer.limit_train_batches must be"),
        ("seed=abc", ValueError, "seed must be an integer or null, got 'abc'"),
        ("ckpt_path=BAD", ValueError, r"cannot read .*bad\.ckpt as a Lightning checkpoint"),
        ("ckpt_path=MISSING", FileNotFoundError, r"ckpt_path points to no file: .*missing"),
        ("model.init_weights=BAD", ValueError, r"cannot read .*bad\.ckpt as a Lightning"),
        ("model.init_weights=BADPTH", ValueError, r"cannot read .*bad\.pth as a torch state"),
    ],
)
def test_bad_train_settings_are_refused_naming_the_key_or_file(tmp_path, override, error, message):
    (tmp_path / "bad.ckpt").write_bytes(b"not a pickle")
    (tmp_path / "bad.pth").write_bytes(b"\x80\x04not a pickle either")
    override = (
        override.replace("BADPTH", str(tmp_path / "bad.pth"))
        .replace("BAD", str(tmp_path / "bad.ckpt"))
        .replace("MISSING", str(tmp_path / "missing.ckpt"))
    )
    cfg = compose_train(tmp_path, ["logger=csv", override])
    with pytest.raises(error, match=message):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_the_train_and_eval_scripts_name_the_key_and_the_wrong_checkpoint(tmp_path):
    done = _run_script(
        "train.py",
        ["trainer.max_epochs=abc", "logger=csv", f"hydra.run.dir={tmp_path / 'train'}"],
        tmp_path,
        DRDM_ROOT=str(tmp_path),
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "train.py: error: trainer.max_epochs must be an integer or null, got 'abc'" in (
        done.stderr
    )
    assert "Traceback" not in done.stderr and "AssertionError" not in done.stderr
    (tmp_path / "bad.ckpt").write_bytes(b"garbage")
    for checkpoint, message in (
        (
            DEFAULT_MODEL,
            f"{DEFAULT_MODEL} is a DRDM checkpoint: src/eval.py evaluates registration",
        ),
        (tmp_path / "bad.ckpt", f"cannot read {tmp_path / 'bad.ckpt'} as a Lightning checkpoint"),
    ):
        done = _run_script(
            "eval.py",
            [f"checkpoint={checkpoint}", f"hydra.run.dir={tmp_path / 'eval'}"],
            tmp_path,
            DRDM_ROOT=str(tmp_path),
        )
        assert done.returncode == 1 and f"eval.py: error: {message}" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- kill and resume


@pytest.mark.slow
def test_a_killed_augment_process_resumes_to_the_uninterrupted_files(checkpoint, tmp_path):
    inputs = _slice_case(tmp_path / "inputs")
    samples = 40

    def command(output: Path) -> list[str]:
        return [
            sys.executable,
            str(REPO / "src" / "augment.py"),
            f"ckpt_path={checkpoint}",
            f"input={inputs}",
            f"output_dir={output}",
            f"num_samples={samples}",
            "generation.batch_size=1",
            "device=cpu",
            "progress=false",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ]

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        command(killed), env=_script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    manifest = killed / "manifest.csv"
    deadline = time.monotonic() + 300
    try:  # wait (on the process, not a fixed time) until the first sample is finished
        while not manifest.is_file():
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            try:
                process.wait(timeout=0.01)
            except subprocess.TimeoutExpired:
                pass
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    done_before = len(list(csv.DictReader(open(manifest))))
    assert 1 <= done_before < samples  # killed mid-run

    resumed = subprocess.run(command(killed), env=_script_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{samples - done_before} samples generated, {done_before} already done" in (
        resumed.stdout
    )
    complete = tmp_path / "complete"
    full = subprocess.run(command(complete), env=_script_env(), capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]
    assert _files(killed) == _files(complete)
    assert not [p for p in killed.rglob(".*") if p.is_file()]  # no temporaries left


TRAIN_TINY = [
    "~experiment",  # not the first run: tiny nets, no packaged weights
    "model.net.channels=[4,8,8]",
    "model.net.recursions=1",
    "torch_threads=1",
    "logger=csv",
    "trainer.max_epochs=4",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "data.batch_size=2",
    "model.figure_every_n_epochs=0",
    "callbacks.rich_progress_bar=null",
    "callbacks.rich_model_summary=null",
    "+trainer.enable_progress_bar=false",
]


def _train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(REPO / "src" / "train.py"),
        *TRAIN_TINY,
        *extra,
        f"hydra.run.dir={run_dir}",
    ]
    return subprocess.run(
        command, cwd=run_dir.parent, env=_script_env(), capture_output=True, text=True
    )


def _validation_rows(run_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        rows += [r for r in csv.DictReader(open(path)) if r.get("val/recovery_error")]
    return rows


@pytest.mark.slow
def test_a_killed_training_process_resumes_to_the_uninterrupted_weights_and_metrics(tmp_path):
    """SIGKILL mid-epoch 3 (after epoch 2's checkpoint), resume with ckpt_path=last: the final
    weights (EMA and trained), optimiser state and validation metrics equal an uninterrupted
    run's bit for bit (on this CPU)."""
    full = _train(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]

    run = tmp_path / "killed"
    killed = _train(
        run, "+callbacks.kill._target_=tests.helpers.faults.KillAtStep", "+callbacks.kill.step=5"
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4  # the end of epoch 2: step 5 never ran

    resumed = _train(run, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = torch.load(
        tmp_path / "full" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == expected["global_step"] == 8
    for part in ("state_dict", "current_model_state"):
        assert final[part].keys() == expected[part].keys()
        for key, value in expected[part].items():
            assert torch.equal(final[part][key], value), (part, key)
    for key, value in expected["optimizer_states"][0]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(final["optimizer_states"][0]["state"][key][name], tensor)
    assert final["lr_schedulers"] == expected["lr_schedulers"]
    # the resumed epochs log what the uninterrupted run logged for them
    wanted = {r["epoch"]: r["val/recovery_error"] for r in _validation_rows(tmp_path / "full")}
    got = {r["epoch"]: r["val/recovery_error"] for r in _validation_rows(run)}
    assert got == wanted and len(got) == 4
