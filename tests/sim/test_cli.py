"""`tessera simulate`'s options, without starting a stack."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from tessera.sim.cli import simulate_cmd


def test_simulate_without_a_model_folder_reaches_its_own_checks() -> None:
    # the model folder is optional (default: TESSERA_BASE_MODEL): leaving it out must not fail
    # as a folder named "" that does not exist
    result = CliRunner().invoke(simulate_cmd, ["--mode", "buffered", "--method", "secure"])
    assert result.exit_code == 2
    assert "--mode buffered runs method exact or fedavg" in result.output
    assert "does not exist" not in result.output


def test_simulate_refuses_a_model_folder_that_does_not_exist(tmp_path: Path) -> None:
    result = CliRunner().invoke(simulate_cmd, ["--model", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "does not exist" in result.output
