"""What a mistaken command must not cost: a bad device fails before any stage, and a forced rerun that
fails puts back the artefact it was replacing."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from audit.runner import REPLACED_SUFFIX, AuditRunner, StageError, check_device
from audit.spec import load_spec


def test_devices_are_checked_before_any_stage_runs():
    check_device(None)
    check_device("cpu")
    with pytest.raises(StageError, match="'tpu' .* is not a torch device"):
        check_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(StageError, match="this machine has no CUDA device"):
            check_device("cuda")
    else:
        with pytest.raises(StageError, match="CUDA device"):
            check_device(f"cuda:{torch.cuda.device_count()}")


def test_a_run_on_a_missing_device_touches_no_artefact(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    runner = AuditRunner(load_spec("specs/demo.yaml"), workspace=tmp_path, device="cuda",
                         console=Console(quiet=True))
    with pytest.raises(StageError, match="no CUDA device"):
        runner.run(only="train", force=True)
    assert not (tmp_path / "cache").exists()


def _runner_with_a_finished_train_stage(tmp_path):
    runner = AuditRunner(load_spec("specs/demo.yaml"), workspace=tmp_path, console=Console(quiet=True))
    runner._hash_train = lambda: "fixed"
    runner._load_train = lambda folder, summary: None
    folder = runner._stage_folder("train", "fixed")
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text("the weights of an hour's training")
    (folder / "done.json").write_text(json.dumps({"fve_a": 0.8}))
    return runner, folder


def test_a_forced_stage_that_fails_puts_back_what_it_was_replacing(tmp_path):
    runner, folder = _runner_with_a_finished_train_stage(tmp_path)

    def fails_midway(out):
        (out / "partial.safetensors").write_text("half")
        raise RuntimeError("the device went away")

    runner._compute_train = fails_midway
    with pytest.raises(StageError, match="artefact from before this --force run is back in place"):
        runner._stage("train", run=True, force=True)
    assert (folder / "model.safetensors").read_text() == "the weights of an hour's training"
    assert json.loads((folder / "done.json").read_text()) == {"fve_a": 0.8}
    assert not (folder / "partial.safetensors").exists()
    assert not folder.with_name(folder.name + REPLACED_SUFFIX).exists()

    # an interrupt (Ctrl-C) too
    def interrupted(out):
        raise KeyboardInterrupt

    runner._compute_train = interrupted
    with pytest.raises(KeyboardInterrupt):
        runner._stage("train", run=True, force=True)
    assert (folder / "model.safetensors").is_file() and (folder / "done.json").is_file()


def test_a_forced_stage_that_finishes_replaces_the_old_artefact_and_keeps_nothing_aside(tmp_path):
    runner, folder = _runner_with_a_finished_train_stage(tmp_path)

    def retrains(out):
        (out / "model.safetensors").write_text("new weights")
        return {"fve_a": 0.9}

    runner._compute_train = retrains
    result = runner._stage("train", run=True, force=True)
    assert not result.cached and result.summary["fve_a"] == 0.9
    assert (folder / "model.safetensors").read_text() == "new weights"
    assert not folder.with_name(folder.name + REPLACED_SUFFIX).exists()
