"""The evidence script runs end to end and writes its report (tiny settings; numbers in docs/)."""

from __future__ import annotations

import json
from pathlib import Path

from tessera.lora.evidence import main


def test_evidence_script_writes_json_markdown_grid_and_adapters(tmp_path: Path) -> None:
    main(
        [
            "--styles", "dots", "stripes", "--steps", "2", "--batch-size", "2", "--images", "4",
            "--n", "3", "--sample-steps", "2", "--threads", "1", "--no-progress",
            "--out", str(tmp_path),
        ]
    )  # fmt: skip

    result = json.loads((tmp_path / "lora_evidence.json").read_text())
    assert set(result["conditions"]) == {
        "base", "dots", "stripes", "blend", "blend 0.7/0.3", "blend 0.3/0.7"
    }  # fmt: skip
    for condition in result["conditions"].values():
        assert 0 <= condition["share_dots"] <= 1 and 0 <= condition["probability_stripes"] <= 1
    assert "| blend |" in (tmp_path / "lora_evidence.md").read_text()
    assert (tmp_path / "lora_evidence.png").stat().st_size > 1000
    saved = tmp_path / "lora_evidence_dots.safetensors"
    assert saved.stat().st_size > 100_000

    again = tmp_path / "again"
    again.mkdir()
    main(
        ["--styles", "dots", "stripes", "--adapters", str(tmp_path), "--n", "3",
         "--sample-steps", "2", "--threads", "1", "--no-progress", "--out", str(again)]
    )  # fmt: skip
    reused = json.loads((again / "lora_evidence.json").read_text())
    assert reused["adapters_reused"] and reused["training"] == result["training"]
