"""The whole loop over the real queue: uploads reach quorum, a worker publishes, devices see it."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from services.aggregator.main import create_app
from tessera.config import Settings
from tessera.lora import LoraSpec
from tests.helpers import bearer, enrol
from tests.services.aggregator.factories import make_clustering
from tests.services.aggregator.helpers import lora_file, open_round, upload


@pytest.mark.usefixtures("worker")
def test_uploads_to_quorum_end_in_published_adapters(
    base_settings: Settings, settings: Settings, spec: LoraSpec, session: Session
) -> None:
    # The session's worker listens on the session's Redis database, not this folder's own.
    app = create_app(settings.model_copy(update={"redis_url": base_settings.redis_url}))
    operator_token = settings.operator_token.get_secret_value()
    operator = bearer(operator_token)
    with TestClient(app) as client:
        devices = [enrol(client, operator_token, f"edge-{i}") for i in range(3)]
        make_clustering(session, {d["id"]: i % 2 for i, d in enumerate(devices)})
        round_ = open_round(client, operator, min_updates=3, rank=4)
        for seed, d in enumerate(devices):
            sent = upload(client, d["token"], round_["id"], d["id"], lora_file(spec, seed))
            assert sent.is_success, sent.text

        state, read = "aggregating", {}
        give_up = time.monotonic() + 60
        while state == "aggregating" and time.monotonic() < give_up:
            time.sleep(0.2)
            read = client.get(f"/v1/rounds/{round_['id']}", headers=operator).json()
            state = read["state"]
        assignment = client.get(
            "/v1/devices/me/assignment", headers=bearer(devices[1]["token"])
        ).json()

    assert state == "published", read
    assert {v["name"] for v in read["published"]} == {"global", "cluster:0", "cluster:1"}
    assert assignment["start_adapter"]["name"] == "cluster:1"
    assert assignment["start_adapter"]["round_id"] == round_["id"]
