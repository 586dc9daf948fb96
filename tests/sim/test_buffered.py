"""The simulator's buffered mode on a fresh stack of embedded servers (slow): one round in which
each cluster publishes a version every buffer_k updates, read back as bench/stragglers.py reads
it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tessera.model.base import BaseModel
from tessera.sim import Buffering, SimConfig, SimReport
from tessera.sim.stack import run_on_fresh_stack
from tessera.stack import StackInfo
from tests.helpers import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Four devices of two styles in one device process, two steps a local round: the round ends
# after rounds x devices / k = 2 versions, about as soon as every device has sent one update.
CONFIG = SimConfig(
    devices=4,
    styles=2,
    rounds=1,
    steps=2,
    batch_size=2,
    samples=4,
    eval_images=1,
    eval_steps=2,
    workers=1,
)
BUFFERING = Buffering(k=2)


def test_a_buffered_simulation_publishes_a_version_every_buffer_k_updates(
    tmp_path: Path, base_model: BaseModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    import stragglers

    seen: dict[str, Any] = {}

    def after(info: StackInfo, report: SimReport) -> None:
        url, token = info.urls["aggregator"], info.operator_token
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, timeout=30, headers=headers) as http:
            (brief,) = http.get("/v1/rounds").raise_for_status().json()
            seen["round"] = http.get(f"/v1/rounds/{brief['id']}").raise_for_status().json()
        seen["published"] = stragglers.read_versions(url, token, base_model)

    report = run_on_fresh_stack(
        CONFIG, tmp_path / "stack", log=lambda _: None, after=after, buffering=BUFFERING
    )
    round_ = seen["round"]
    heldout = stragglers.HeldOut(base_model, CONFIG, images=1)
    timeline = heldout.timeline(report, seen["published"])

    labels = {device["cluster"] for device in report.devices}
    assert None not in labels
    assert round_["config"]["mode"] == "buffered" and round_["config"]["buffer_k"] == BUFFERING.k
    assert round_["state"] == "published"
    published = round_["published"]
    assert len(published) == BUFFERING.versions_for(CONFIG) == round_["report"]["versions"]
    names = {v["name"] for v in published}
    assert names <= {f"cluster:{label}" for label in labels}  # no global adapter in a flush
    for name in names:  # a cluster's flushes are its consecutive versions
        versions = sorted(v["version"] for v in published if v["name"] == name)
        assert versions == list(range(1, len(versions) + 1))
    assert all(v["metrics"]["updates"] == BUFFERING.k for v in published)
    assert all(v["metrics"]["stale_updates"] >= 0 for v in published)
    assert round_["updates"] == BUFFERING.k * len(published)  # the rest left in a buffer
    # What the benchmark reads: every device's cluster, each device's local rounds, and one
    # point of its timeline per cluster version, in order of publication.
    assert len(report.rounds) >= 1 and report.rounds[-1].published
    assert [point["versions"] for point in timeline] == list(range(len(published) + 1))
    assert sorted(point["name"] for point in timeline[1:]) == sorted(
        f"{v['name']} v{v['version']}" for v in published
    )
    seconds = [point["seconds"] for point in timeline]
    assert seconds == sorted(seconds) and seconds[0] == 0.0 < seconds[1]
    assert all(point["loss"] > 0 for point in timeline)
