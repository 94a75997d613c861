"""What a mistaken command must not cost: a bad device fails before any stage, and a forced rerun that
fails puts back the artefact it was replacing."""

from __future__ import annotations

import json

import duckdb
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
    runner, folder = _runner_with_a_finished_train_stage(tmp_path)
    runner.device = "cuda"
    with pytest.raises(StageError, match="no CUDA device"):
        runner.run(only="train", force=True)
    assert (folder / "model.safetensors").read_text() == "the weights of an hour's training"
    assert not folder.with_name(folder.name + REPLACED_SUFFIX).exists()


def _runner_with_a_finished_train_stage(tmp_path):
    runner = AuditRunner(load_spec("specs/demo.yaml"), workspace=tmp_path, console=Console(quiet=True))
    runner._hash_train = lambda: "fixed"
    runner._load_train = lambda folder, summary: None
    folder = runner._stage_folder("train", "fixed")
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text("the weights of an hour's training")
    (folder / "done.json").write_text(json.dumps({"fve_a": 0.8}))
    return runner, folder


def _unchanged(folder):
    return ((folder / "model.safetensors").read_text() == "the weights of an hour's training"
            and json.loads((folder / "done.json").read_text()) == {"fve_a": 0.8})


def test_a_forced_stage_that_fails_before_saving_anything_puts_back_what_it_replaced(tmp_path):
    runner, folder = _runner_with_a_finished_train_stage(tmp_path)

    def fails_at_once(out):
        raise RuntimeError("the device went away")

    runner._compute_train = fails_at_once
    with pytest.raises(StageError, match="artefact from before this --force run is back in place"):
        runner._stage("train", run=True, force=True)
    assert _unchanged(folder) and not folder.with_name(folder.name + REPLACED_SUFFIX).exists()

    # the stage's own error (a StageError, re-raised as it is) says so too; and Ctrl-C
    def diverges(out):
        raise StageError("train", "the loss is NaN at step 3")

    runner._compute_train = diverges
    with pytest.raises(StageError, match="(?s)the loss is NaN at step 3.*back in place"):
        runner._stage("train", run=True, force=True)
    assert _unchanged(folder)

    def interrupted(out):
        raise KeyboardInterrupt

    runner._compute_train = interrupted
    with pytest.raises(KeyboardInterrupt):
        runner._stage("train", run=True, force=True)
    assert _unchanged(folder)


def test_a_forced_stage_that_fails_after_saving_progress_keeps_both(tmp_path):
    runner, folder = _runner_with_a_finished_train_stage(tmp_path)
    aside = folder.with_name(folder.name + REPLACED_SUFFIX)

    def fails_midway(out):
        (out / "state-00000500").write_text("500 steps of the new training")
        raise RuntimeError("the device went away")

    runner._compute_train = fails_midway
    with pytest.raises(StageError, match="progress stays in .*rerun without --force to resume it"):
        runner._stage("train", run=True, force=True)
    assert (folder / "state-00000500").is_file() and not (folder / "done.json").exists()
    assert _unchanged(aside)  # the old artefact, whole, beside it

    # a rerun without --force resumes the new training; once it is done the old copy goes
    def resumes(out):
        assert (out / "state-00000500").is_file()
        (out / "model.safetensors").write_text("new weights")
        return {"fve_a": 0.9}

    runner._compute_train = resumes
    result = runner._stage("train", run=True, force=False)
    assert result.summary["fve_a"] == 0.9 and not aside.exists()


def test_a_forced_run_killed_before_it_saved_anything_is_undone_by_the_next_run(tmp_path):
    runner, folder = _runner_with_a_finished_train_stage(tmp_path)
    aside = folder.with_name(folder.name + REPLACED_SUFFIX)
    folder.rename(aside)  # what a kill -9 right after the set-aside leaves
    folder.mkdir()

    def must_not_run(out):
        raise AssertionError("the finished artefact should have been found")

    runner._compute_train = must_not_run
    result = runner._stage("train", run=True, force=False)
    assert result.cached and _unchanged(folder) and not aside.exists()

    # killed after it saved some progress: the next --force keeps the finished copy, not the partial one
    folder.rename(aside)
    folder.mkdir()
    (folder / "state-00000100").write_text("partial")

    def fails_at_once(out):
        assert not (out / "state-00000100").exists()  # a forced rerun starts afresh
        raise RuntimeError("still no device")

    runner._compute_train = fails_at_once
    with pytest.raises(StageError, match="back in place"):
        runner._stage("train", run=True, force=True)
    assert _unchanged(folder) and not aside.exists()


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


def test_a_forced_stability_seed_that_diverges_keeps_that_seeds_old_dictionary(tmp_path):
    from crosscoder import TrainingDivergedError

    runner = AuditRunner(load_spec("specs/demo.yaml"), workspace=tmp_path, console=Console(quiet=True))
    runner._hash_train = lambda seed=None: f"seed{seed}"
    seed_folder = runner._stage_folder("train", "seed1")
    seed_folder.mkdir(parents=True)
    (seed_folder / "done.json").write_text("{}")
    (seed_folder / "model.safetensors").write_text("seed 1, trained yesterday")

    def diverges(folder, seed=None):
        raise TrainingDivergedError("the loss is NaN at step 1")

    runner._train_and_evaluate = diverges
    runner._forced = {"stability"}
    out = tmp_path / "stability"
    out.mkdir()
    runner._compute_stability(out)
    assert json.loads((out / "stability.json").read_text())["dictionaries"][0]["status"] == "diverged"
    assert (seed_folder / "model.safetensors").read_text() == "seed 1, trained yesterday"
    assert (seed_folder / "done.json").is_file() and not seed_folder.with_name(seed_folder.name + REPLACED_SUFFIX).exists()


def test_a_store_that_refuses_a_stages_rows_is_a_message_and_the_artefact_stays(tmp_path):
    runner, folder = _runner_with_a_finished_train_stage(tmp_path)

    def store_refuses(folder, summary):
        raise duckdb.BinderException('Binder Error: Table "effects" does not have a column with name "x"')

    runner._load_train = store_refuses
    with pytest.raises(StageError, match=r"its artefact is complete \(.*train-fixed\), but its rows could not be "
                                         r"written to .*audit.duckdb: BinderException: Binder Error"):
        runner._stage("train", run=True, force=False)
    assert _unchanged(folder)
    [row] = [r for r in runner.db.rows("stages", runner.run_id) if r["stage"] == "train"]
    assert row["status"] == "failed" and "rows could not be written" in row["message"]


def test_a_loader_that_cannot_read_its_artefact_is_not_blamed_on_the_store(tmp_path):
    runner, folder = _runner_with_a_finished_train_stage(tmp_path)

    def artefact_broken(folder, summary):
        raise KeyError("fve_a")

    runner._load_train = artefact_broken
    with pytest.raises(KeyError):
        runner._stage("train", run=True, force=False)


def test_a_forced_stability_stage_interrupted_mid_seed_resumes_that_seed_and_not_the_old_result(tmp_path):
    runner = AuditRunner(load_spec("specs/demo.yaml"), workspace=tmp_path, console=Console(quiet=True))
    runner._hash_train = lambda seed=None: f"seed{seed}"
    runner._hash_stability = lambda: "fixed"
    runner._load_stability = lambda folder, summary: None
    seed_folder = runner._stage_folder("train", "seed1")
    seed_folder.mkdir(parents=True)
    (seed_folder / "done.json").write_text("{}")
    stage_folder = runner._stage_folder("stability", "fixed")
    stage_folder.mkdir(parents=True)
    (stage_folder / "done.json").write_text("{}")

    def interrupted_after_saving(folder, seed=None):
        (folder / "state-00000100").write_text("100 steps")
        raise KeyboardInterrupt

    runner._train_and_evaluate = interrupted_after_saving
    runner._forced = {"stability"}
    with pytest.raises(KeyboardInterrupt):
        runner._stage("stability", run=True, force=True)
    # the stage is not taken as done again: its old result stays aside, and so does the seed's old dictionary
    assert not (stage_folder / "done.json").exists() and (seed_folder / "state-00000100").is_file()
    assert (stage_folder.with_name(stage_folder.name + REPLACED_SUFFIX) / "done.json").is_file()
