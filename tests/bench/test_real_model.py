"""The real-size benchmark runs end to end at a toy size and writes its report.

The same functions as the SD-1.5-sized run, on the tiny random SD-1.x folder: 2 adapters, one
repeat. Times are not asserted; what is checked is that both systems ran the same blend and
every row, the table and the plot were written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow  # the embedded stack starts and stops (about 20 s of its 50)


def test_toy_run_writes_every_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    import real_model

    real_model.main(
        [
            *("--model", str(tmp_path / "sd1"), "--size", "tiny"),
            *("--counts", "1", "2", "--diffusers-max", "1"),
            *("--switches", "3", "--repeats", "1", "--train-repeats", "1"),
            *("--cold-loads", "2", "--out", str(tmp_path / "docs")),
        ]
    )

    report = json.loads((tmp_path / "docs" / "bench_real_model.json").read_text())
    generation = report["generation"]
    assert generation["difference_to_tessera"]["diffusers_unfused"] <= 1e-2 * max(
        generation["blend_effect"], 1e-3
    )
    assert generation["blend_effect"] > 0
    assert [row["cached_adapters"] for row in report["switch"]] == [1, 2]
    assert report["switch"][0]["diffusers"]["n"] == 3
    assert report["switch"][1]["diffusers"] is None  # beyond --diffusers-max: said, not guessed
    memory = report["memory"]
    assert memory["tessera_accounted_bytes"] == memory["diffusers_accounted_bytes"]
    training = report["training"]
    assert training["tessera_lora_parameters"] == training["diffusers_lora_parameters"]
    table = (tmp_path / "docs" / "bench_real_model.md").read_text()
    assert "not measured (loaded only up to 1)" in table
    assert "GPU (fp16): not measured here" in table
    assert (tmp_path / "docs" / "bench_real_model.png").stat().st_size > 10_000
