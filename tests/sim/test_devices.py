"""One simulated device's round on a real architecture, with no server (local mode)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tessera.sim.devices import DeviceJob, finish_device_round, run_device_round, simulate_compute
from tessera.sim.run import Stragglers


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
        compute_factor=1.5,
    )

    started = time.perf_counter()
    trained = run_device_round(job)
    result = finish_device_round(job, trained)  # in the caller's thread: the wait, no upload
    elapsed = time.perf_counter() - started

    assert result.heldout_loss > 0 and result.train_loss > 0
    assert 0.0 <= result.style_share <= 1.0  # the 16x16 images, scored at the evaluator's 32x32
    assert result.bytes_up == 0 and result.bytes_down == 0
    assert (tmp_path / "device" / "personal.safetensors").exists()
    assert trained.compute_seconds == trained.train_seconds and trained.adapter is not None
    assert result.compute_seconds == pytest.approx(1.5 * result.train_seconds)
    assert result.adapter is None
    assert elapsed >= result.compute_seconds


def test_a_slow_device_waits_out_its_simulated_compute_time() -> None:
    started = time.perf_counter()
    simulated = simulate_compute(0.2, factor=3.0)
    waited = time.perf_counter() - started

    assert simulated == pytest.approx(0.6)
    assert 0.4 <= waited < 0.6  # training already took its 0.2 s: only the rest is waited
    assert simulate_compute(0.2, factor=1.0) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="at least 1"):
        simulate_compute(0.2, factor=0.5)


def test_the_first_enrolled_devices_are_the_slow_ones() -> None:
    stragglers = Stragglers(devices=2, factor=4.0)

    assert [stragglers.factor_of(i) for i in range(4)] == [4.0, 4.0, 1.0, 1.0]
    assert Stragglers().factor_of(0) == 1.0
