"""The evidence script runs end to end and writes its report (tiny settings; numbers in docs/)."""

from __future__ import annotations

import json
from pathlib import Path

from tessera.lora.evidence import main

TINY = ["--steps", "2", "--checkpoints", "1", "--batch-size", "2", "--images", "4", "--n", "3",
        "--sample-steps", "2", "--threads", "1", "--no-progress"]  # fmt: skip


def test_evidence_script_writes_json_markdown_grid_and_adapters(tmp_path: Path) -> None:
    main(["--styles", "night", "stripes", "outline", *TINY, "--out", str(tmp_path)])

    result = json.loads((tmp_path / "lora_evidence.json").read_text())
    assert set(result["styles"]) == {"night", "stripes", "outline"}
    assert set(result["styles"]["night"]["training"]["curve"]) == {"1", "2"}
    pairs = {tuple(p["styles"]): p for p in result["pairs"]}
    assert set(pairs) == {("night", "stripes"), ("night", "outline"), ("stripes", "outline")}
    assert pairs[("night", "outline")]["conflicting"] == ["stroke"]
    assert set(pairs[("night", "outline")]["rows"]) == {
        "night alone", "1/1", "outline alone", "0.5/0.5"
    }  # fmt: skip
    assert set(pairs[("night", "stripes")]["rows"]) == {
        "night alone", "1/0.5", "1/1", "0.5/1", "stripes alone", "0.5/0.5"
    }  # fmt: skip
    for row in pairs[("night", "stripes")]["rows"].values():
        assert 0 <= row["carries_both"] <= min(row["carries_first"], row["carries_second"])
    page = (tmp_path / "lora_evidence.md").read_text()
    assert "| night + outline | stroke |" in page and "| stripes |" in page
    assert (tmp_path / "lora_evidence.png").stat().st_size > 1000
    assert (tmp_path / "lora_evidence_night.safetensors").stat().st_size > 100_000

    again = tmp_path / "again"
    again.mkdir()
    main(["--styles", "night", "stripes", "outline", "--adapters", str(tmp_path), *TINY,
          "--out", str(again)])  # fmt: skip
    reused = json.loads((again / "lora_evidence.json").read_text())
    assert reused["adapters_reused"]
    assert reused["styles"]["night"]["training"] == result["styles"]["night"]["training"]
