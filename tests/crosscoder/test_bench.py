"""Benchmarks: a fast smoke run of each command, and the on-demand ground-truth acceptance."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from audit.cli import app
from crosscoder.synthetic import ToyBenchSettings, aggregate, run_toy_benchmark


def test_toy_benchmark_command_writes_table_json_and_plot(tmp_path):
    result = CliRunner().invoke(app, ["bench", "toy", "--out", str(tmp_path), "--dict-sizes", "64",
                                      "--seeds", "1", "--steps", "60"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "results.json").read_text())
    assert {row["architecture"] for row in data["runs"]} == {"batchtopk", "dsf", "dfc"}
    assert (tmp_path / "recall.png").stat().st_size > 10_000
    assert "| DFC | 64 |" in (tmp_path / "table.md").read_text()


@pytest.mark.bench
def test_dfc_with_exclusivity_check_recovers_exclusive_concepts():
    """The acceptance claim: at D=512, DFC recalls ≥ 0.9 of exclusive concepts and the
    exclusivity check removes most of its false positives."""
    settings = ToyBenchSettings(dict_sizes=(512,), architectures=("batchtopk", "dfc"), seeds=(0, 1))
    table = {row["architecture"]: row for row in aggregate(run_toy_benchmark(settings))}
    dfc = table["dfc"]
    assert dfc["checked_exclusive_recall"] >= 0.9
    assert dfc["exclusive_recall"] > table["batchtopk"]["exclusive_recall"]
    false_positives = dfc["fp_shared"] + dfc["fp_unmatched"]
    assert dfc["checked_fp_shared"] + dfc["checked_fp_unmatched"] <= 0.1 * false_positives


@pytest.mark.bench
def test_sparse_trainer_speedup_on_cpu():
    from crosscoder.bench_train import run_train_benchmark

    result = run_train_benchmark(dict_size=8192, steps=30)
    assert abs(result["fve_gap"]) < 1e-3
    assert result["speedup"] > 1.3, result
