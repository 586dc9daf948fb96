"""One simulated device's round on a real architecture, with no server (local mode)."""

from __future__ import annotations

from pathlib import Path

from tessera.sim.devices import DeviceJob, run_device_round


def test_a_device_round_runs_on_an_sd1_checkpoint(tmp_path: Path, model_folder) -> None:
    job = DeviceJob(
        aggregator_url="http://127.0.0.1:9",  # never called: local mode
        token="unused",
        client_id=1,
        state_dir=str(tmp_path / "device"),
        style="stripes",
        index=0,
        seed=0,
        round_number=1,
        round_id=None,
        steps=2,
        batch_size=2,
        lr=5e-3,
        rank=4,
        samples=4,
        eval_images=2,
        eval_steps=2,
        model=str(model_folder("sd1")),
    )

    result = run_device_round(job)

    assert result.heldout_loss > 0 and result.train_loss > 0
    assert 0.0 <= result.style_share <= 1.0  # the 16x16 images, scored at the evaluator's 32x32
    assert result.bytes_up == 0 and result.bytes_down == 0
    assert (tmp_path / "device" / "personal.safetensors").exists()
