"""Data lifecycle: raw updates deleted after their round, a device removed with everything it
uploaded, an operator's exclusion of one update from a collecting round."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta

import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from services.aggregator.main import create_app
from services.aggregator.retention import delete_expired_updates
from services.aggregator.rounds_loop import RoundLoop
from services.worker.rounds import aggregate_round_now
from tessera import cli
from tessera.config import Settings
from tessera.federation import personal_adapter_name, update_prefix
from tessera.lora.bounds import ScaleRange
from tessera.model.encoder import MINILM_ID
from tessera.models import (
    Adapter,
    AdapterKind,
    Assignment,
    Client,
    GenerationJob,
    JobState,
    Round,
    RoundState,
    TaskEmbedding,
    Update,
    utcnow,
)
from tessera.service.resources import Resources
from tessera.storage import ObjectStore
from tests.helpers import bearer, enrol
from tests.services.aggregator.factories import make_clustering, publish
from tests.services.aggregator.helpers import lora_file, open_round, upload
from tests.services.aggregator.test_devices import unit_vectors


@pytest.fixture
def resources(settings: Settings) -> Iterator[Resources]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a worker process
    made = Resources(settings)
    yield made
    made.close()
    torch.set_num_threads(before)


@pytest.fixture
def cli_operator(settings: Settings, operator: dict, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A CliRunner whose `tessera` commands reach this test's aggregator as the operator."""

    def operator_client(_base_url: str | None = None) -> TestClient:
        return TestClient(create_app(settings), headers=operator)

    monkeypatch.setattr(cli, "_operator_client", operator_client)
    return CliRunner()


def _publish_round(resources: Resources, settings: Settings, round_id: int) -> dict:
    return aggregate_round_now(
        round_id,
        sessions=resources.sessions,
        store=resources.store,
        redis=resources.redis,
        scales=ScaleRange(settings.min_lora_scale, settings.max_lora_scale),
    )


def _uploaded(aggregator: TestClient, devices: list[dict], round_id: int, spec: object) -> None:
    for seed, device in enumerate(devices):
        sent = upload(aggregator, device["token"], round_id, device["id"], lora_file(spec, seed))
        assert sent.status_code == 201, sent.text


def test_a_published_rounds_raw_updates_are_deleted_after_the_retention_and_its_rows_stay(
    aggregator: TestClient,
    operator: dict,
    operator_token: str,
    spec: object,
    session: Session,
    store: ObjectStore,
    settings: Settings,
    resources: Resources,
) -> None:
    devices = [enrol(aggregator, operator_token, f"edge-{i}") for i in range(2)]
    published = open_round(aggregator, operator, scope="global", min_updates=3, rank=8)
    _uploaded(aggregator, devices, published["id"], spec)
    aggregator.post(f"/v1/rounds/{published['id']}/close", headers=operator)
    assert _publish_round(resources, settings, published["id"])["status"] == "published"
    failed = open_round(aggregator, operator, scope="global", min_updates=3)
    _uploaded(aggregator, devices, failed["id"], spec)
    session.execute(
        update(Round)
        .where(Round.id == failed["id"])
        .values(state=RoundState.FAILED, closed_at=utcnow())
    )
    session.commit()
    kept_objects = {r: store.list_keys(update_prefix(r)) for r in (published["id"], failed["id"])}

    a_day = delete_expired_updates(sessions=resources.sessions, store=store, retention_days=1.0)
    two_days_on = delete_expired_updates(
        sessions=resources.sessions,
        store=store,
        retention_days=1.0,
        now=utcnow() + timedelta(days=2),
    )
    again = delete_expired_updates(
        sessions=resources.sessions,
        store=store,
        retention_days=1.0,
        now=utcnow() + timedelta(days=2),
    )
    shown = aggregator.get(f"/v1/rounds/{published['id']}", headers=operator).json()

    assert all(len(keys) == 2 for keys in kept_objects.values())
    assert a_day == [] and two_days_on == [published["id"]] and again == []
    assert store.list_keys(update_prefix(published["id"])) == []
    assert store.list_keys(update_prefix(failed["id"])) == kept_objects[failed["id"]]
    assert shown["updates"] == 2 and shown["updates_deleted_at"] is not None
    assert [v["name"] for v in shown["published"]] == ["global"]


def test_the_round_loop_deletes_them_at_once_by_default(
    aggregator: TestClient,
    operator: dict,
    operator_token: str,
    spec: object,
    store: ObjectStore,
    resources: Resources,
) -> None:
    devices = [enrol(aggregator, operator_token, "edge-0")]
    cancelled = open_round(aggregator, operator, min_updates=2)
    _uploaded(aggregator, devices, cancelled["id"], spec)
    collecting_before = store.list_keys(update_prefix(cancelled["id"]))
    first = RoundLoop()(resources)
    aggregator.post(f"/v1/rounds/{cancelled['id']}/cancel", headers=operator)

    passed = RoundLoop()(resources)

    assert resources.settings.update_retention_days == 0
    assert len(collecting_before) == 1 and first["updates_deleted"] == []
    assert passed["updates_deleted"] == [cancelled["id"]]
    assert store.list_keys(update_prefix(cancelled["id"])) == []


def test_an_operator_excludes_a_devices_update_from_a_collecting_round(
    aggregator: TestClient,
    operator: dict,
    operator_token: str,
    spec: object,
    settings: Settings,
    resources: Resources,
    cli_operator: CliRunner,
) -> None:
    devices = [enrol(aggregator, operator_token, f"edge-{i}") for i in range(3)]
    round_ = open_round(aggregator, operator, scope="global", min_updates=3, rank=8)
    _uploaded(aggregator, devices[:2], round_["id"], spec)
    path = f"/v1/rounds/{round_['id']}/exclusions"

    by_api = aggregator.post(
        path, json={"client_id": devices[0]["id"], "reason": "lost device"}, headers=operator
    )
    by_cli = cli_operator.invoke(
        cli.main,
        ["round", "exclude", str(round_["id"]), str(devices[1]["id"]), "--reason", "odd update"],
    )
    replaced = upload(
        aggregator, devices[0]["token"], round_["id"], devices[0]["id"], lora_file(spec, 9)
    )
    no_update = aggregator.post(
        path, json={"client_id": devices[2]["id"], "reason": "x"}, headers=operator
    )
    as_device = aggregator.post(
        path,
        json={"client_id": devices[0]["id"], "reason": "x"},
        headers=bearer(devices[0]["token"]),
    )
    bad = [
        aggregator.post(path, json=body, headers=operator).status_code
        for body in (
            {"client_id": devices[0]["id"], "reason": ""},
            {"client_id": devices[0]["id"], "reason": "a\nb"},
            {"client_id": devices[0]["id"], "reason": "r" * 301},
            {"client_id": 0, "reason": "x"},
            {"client_id": devices[0]["id"]},
        )
    ]
    seen_by_device = aggregator.get(
        f"/v1/rounds/{round_['id']}", headers=bearer(devices[0]["token"])
    ).json()
    _uploaded(aggregator, devices[2:], round_["id"], spec)  # 1 counting update: still collecting
    counting = aggregator.get(f"/v1/rounds/{round_['id']}", headers=operator).json()
    aggregator.post(f"/v1/rounds/{round_['id']}/close", headers=operator)
    summary = _publish_round(resources, settings, round_["id"])
    done = aggregator.get(f"/v1/rounds/{round_['id']}", headers=operator).json()
    late = aggregator.post(
        path, json={"client_id": devices[2]["id"], "reason": "too late"}, headers=operator
    )

    assert by_api.status_code == 200, by_api.text
    assert by_cli.exit_code == 0, by_cli.output
    reasons = {e["client_id"]: e["reason"] for e in json.loads(by_cli.stdout)["excluded"]}
    assert reasons == {
        devices[0]["id"]: "excluded by bootstrap-operator: lost device",
        devices[1]["id"]: "excluded by bootstrap-operator: odd update",
    }
    assert replaced.status_code == 409 and "excluded" in replaced.json()["detail"]
    assert no_update.status_code == 404 and as_device.status_code == 403
    assert bad == [422, 422, 422, 422, 422]
    assert [e["client_id"] for e in seen_by_device["excluded"]] == [devices[0]["id"]]
    assert counting["updates"] == 1 and counting["state"] == "collecting"
    assert summary["status"] == "published"
    assert done["report"]["clusters"][0]["used"] == 1
    assert {e["client_id"]: e["reason"] for e in done["excluded"]} == reasons
    assert late.status_code == 409


def test_removing_a_device_deletes_everything_it_uploaded(
    aggregator: TestClient,
    operator: dict,
    operator_token: str,
    spec: object,
    session: Session,
    store: ObjectStore,
    cli_operator: CliRunner,
) -> None:
    gone, stays = (enrol(aggregator, operator_token, f"edge-{i}") for i in range(2))
    for device in (gone, stays):
        stored = aggregator.post(
            "/v1/devices/me/task-vectors",
            json={"encoder_id": MINILM_ID, "vectors": unit_vectors(1, device["id"])},
            headers=bearer(device["token"]),
        )
        assert stored.status_code == 201, stored.text
    make_clustering(session, {gone["id"]: 0, stays["id"]: 0})
    round_ = open_round(aggregator, operator, min_updates=3)
    _uploaded(aggregator, [gone, stays], round_["id"], spec)
    upload(aggregator, gone["token"], round_["id"], gone["id"], lora_file(spec, 5))  # replaced
    personal_key = publish(
        session,
        store,
        personal_adapter_name(gone["id"]),
        lora_file(spec, 7),
        kind=AdapterKind.PERSONAL,
        client_id=gone["id"],
    ).object_key
    image = store.put_bytes("images/job-of-gone/image-0.png", b"png").key
    session.add(
        GenerationJob(
            id="job-of-gone",
            client_id=gone["id"],
            state=JobState.SUCCEEDED,
            result={"images": [image], "latents_key": None},
        )
    )
    session.commit()
    prefix = f"{update_prefix(round_['id'])}client-{gone['id']}/"
    objects_before = store.list_keys(prefix)

    removed = cli_operator.invoke(cli.main, ["client", "remove", str(gone["id"]), "--yes"])
    again = aggregator.delete(f"/v1/clients/{gone['id']}", headers=operator)
    as_device = aggregator.delete(f"/v1/clients/{stays['id']}", headers=bearer(stays["token"]))
    with_old_token = aggregator.get("/v1/devices/me/assignment", headers=bearer(gone["token"]))
    progress = aggregator.get(f"/v1/rounds/{round_['id']}", headers=operator).json()
    session.expire_all()

    def rows(model: type, client_id: int) -> int:
        return session.scalar(select(func.count()).where(model.client_id == client_id)) or 0

    assert removed.exit_code == 0, removed.output
    assert json.loads(removed.stdout) == {
        "client_id": gone["id"],
        "task_vectors": 1,
        "updates": 1,
        "assignments": 1,
        "adapters": 1,
        "generation_jobs": 1,
        "objects": 3,
    }
    assert len(objects_before) == 1 and store.list_keys(prefix) == []
    assert not store.exists(personal_key) and not store.exists(image)
    assert session.get(Client, gone["id"]) is None
    for model in (TaskEmbedding, Update, Assignment, Adapter, GenerationJob):
        assert rows(model, gone["id"]) == 0, model
    assert [rows(m, stays["id"]) for m in (TaskEmbedding, Update, Assignment)] == [1, 1, 1]
    assert len(store.list_keys(f"{update_prefix(round_['id'])}client-{stays['id']}/")) == 1
    assert again.status_code == 404 and as_device.status_code == 403
    assert with_old_token.status_code == 401
    assert progress["updates"] == 1
