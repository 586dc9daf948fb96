"""Secure rounds through the HTTP API: devices with the SDK, the real database, store and queue.

The unmasked cluster adapter must equal the exact aggregate of the same frozen-A adapters
(within the fixed-point rounding and the file's fp16); dropped devices must not stop the round;
too few survivors must fail it visibly; the server must never hold one device's input in clear.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.aggregator import secagg
from services.worker.rounds import aggregate_round_now
from services.worker.tasks.federation import lora_spec_of
from tessera.config import Settings
from tessera.lora import LoraAdapter, LoraSpec, adapter_from_bytes
from tessera.lora.aggregate import WeightedUpdate, aggregate_exact
from tessera.lora.bounds import ScaleRange
from tessera.models import Adapter, AdapterVersion, Round, SecAggGroup, SecAggMember, Update
from tessera.sdk.device import DeviceClient
from tessera.sdk.secure import SecureRound
from tessera.secagg.vector import FixedPoint, frozen_adapter
from tessera.service.resources import Resources
from tessera.storage import ObjectStore
from tests.helpers import bearer, enrol
from tests.services.aggregator.factories import make_clustering
from tests.services.aggregator.helpers import lora_file, open_round, upload

RANK = 4
PHASE_S = 10.0  # over any gap between two answers on a loaded machine (drops wait it out)


def _devices(
    aggregator: TestClient, operator_token: str, session: Session, count: int
) -> list[DeviceClient]:
    enrolled = [enrol(aggregator, operator_token, f"edge-{i}") for i in range(count)]
    make_clustering(session, {d["id"]: 0 for d in enrolled})
    return [
        DeviceClient(
            aggregator_url="http://testserver",
            token=d["token"],
            client_id=d["id"],
            http=aggregator,  # type: ignore[arg-type]  # Starlette's TestClient speaks httpx
        )
        for d in enrolled
    ]


def _secure_round(aggregator: TestClient, operator: dict, **secure: float) -> dict:
    """A secure round of rank RANK, threshold 3 unless `secure` says otherwise."""
    return open_round(
        aggregator, operator, method="secure", lam=0.0, rank=RANK, secure={"threshold": 3, **secure}
    )


def _trained(secure: SecureRound, seed: int) -> LoraAdapter:
    """What a device would send: the frozen A, a B of its own."""
    start = secure.start_adapter()
    generator = torch.Generator().manual_seed(seed)
    b = {
        module: torch.randn(start.pair(module)[1].shape, generator=generator) * 0.05
        for module in start.modules
    }
    a = {module: start.pair(module)[0] for module in start.modules}
    return frozen_adapter(secure.spec, a, b, rank=start.rank, alpha=start.alpha)


def _aggregate(settings: Settings, round_id: int, spec: LoraSpec) -> dict:
    resources = Resources(settings)
    try:
        return aggregate_round_now(
            round_id,
            sessions=resources.sessions,
            store=resources.store,
            redis=resources.redis,
            scales=ScaleRange(settings.min_lora_scale, settings.max_lora_scale),
            spec=spec,
        )
    finally:
        resources.close()


def _published(session: Session, store: ObjectStore, spec: LoraSpec, name: str) -> LoraAdapter:
    session.expire_all()
    key = session.scalar(
        select(AdapterVersion.object_key)
        .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
        .where(Adapter.name == name)
        .order_by(AdapterVersion.version.desc())
    )
    assert key is not None
    return adapter_from_bytes(store.get_bytes(key), spec)


def _assert_same_products(got: LoraAdapter, want: LoraAdapter) -> None:
    for module in want.modules:
        expected = want.delta(module)
        error = (got.delta(module) - expected).abs().max()
        assert error <= 2e-3 * expected.abs().max() + 1e-6, (module, float(error))


def _exact(updates: Sequence[LoraAdapter], weights: Sequence[float]) -> LoraAdapter:
    pairs = [WeightedUpdate(u, w) for u, w in zip(updates, weights, strict=True)]
    return aggregate_exact(pairs, rank=RANK, alpha=float(RANK)).adapter


def test_a_secure_round_publishes_the_exact_aggregate_and_stores_no_clear_input(
    aggregator: TestClient,
    operator: dict,
    operator_token: str,
    spec: LoraSpec,
    session: Session,
    store: ObjectStore,
    settings: Settings,
) -> None:
    devices = _devices(aggregator, operator_token, session, 4)
    round_ = _secure_round(aggregator, operator, phase_s=30)
    secure = [SecureRound(d, round_["id"], spec=spec) for d in devices]
    updates = [_trained(s, seed) for seed, s in enumerate(secure)]
    samples = [16, 32, 64, 200]  # weights min(n, 64) / 64

    for s in secure:
        s.send_keys()
    for s in secure:
        s.fetch()
        s.send_shares()
    for s, update, n in zip(secure, updates, samples, strict=True):
        s.fetch()
        s.send_masked(update, num_samples=n)
    stored = {
        s.device.client_id: store.get_bytes(key)
        for s in secure
        for key in store.list_keys(f"secagg/round-{round_['id']}/")
        if key.endswith(f"client-{s.device.client_id}.u32")
    }
    for s in secure:
        s.fetch()
        s.send_reveal()
    closed = aggregator.get(f"/v1/rounds/{round_['id']}", headers=operator).json()
    summary = _aggregate(settings, round_["id"], spec)

    assert closed["state"] == "aggregating"
    assert summary["status"] == "published", summary
    weights = [min(n, 64) / 64 for n in samples]
    _assert_same_products(_published(session, store, spec, "cluster:0"), _exact(updates, weights))
    # Only masked inputs were ever stored, each unlike the device's own encoding:
    for s, update, n in zip(secure, updates, samples, strict=True):
        clear = s.encode(update, num_samples=n)
        masked = np.frombuffer(stored[s.device.client_id], dtype="<u4")
        assert masked.shape == clear.shape and np.mean(masked == clear) < 0.01
    assert session.scalar(select(func.count()).select_from(Update)) == 0
    assert store.list_keys("updates/") == [] and store.list_keys("secagg/") == []
    for member in session.scalars(select(SecAggMember)):
        assert member.revealed is not None and member.revealed["s"] == {}  # nobody dropped
    assert lora_spec_of(settings.base_model, settings.lora_targets).modules == spec.modules


@pytest.mark.slow  # waits out three phases for the dropped devices
def test_devices_dropping_before_keys_before_masking_and_before_unmasking_leave_the_survivors_sum(
    aggregator: TestClient,
    operator: dict,
    operator_token: str,
    spec: LoraSpec,
    session: Session,
    store: ObjectStore,
    settings: Settings,
) -> None:
    devices = _devices(aggregator, operator_token, session, 6)
    round_ = _secure_round(aggregator, operator, phase_s=PHASE_S)
    secure = [SecureRound(d, round_["id"], spec=spec) for d in devices]
    updates = [_trained(s, seed) for seed, s in enumerate(secure)]
    # 0 never sends keys; 1 sends shares, then nothing; 2 sends its masked input, then nothing.
    for s in secure[1:]:
        s.send_keys()
    secure[1].wait("shares", timeout_s=30, poll_s=0.1)
    for s in secure[1:]:
        s.fetch()
        s.send_shares()
    for s, update in zip(secure[2:], updates[2:], strict=True):
        s.fetch()
        s.send_masked(update, num_samples=64)
    secure[3].wait("unmasking", timeout_s=30, poll_s=0.1)
    for s in secure[3:]:
        s.fetch()
        s.send_reveal()
    state = secure[3].wait("ready", timeout_s=30, poll_s=0.1)
    summary = _aggregate(settings, round_["id"], spec)

    assert (len(state["peers"]), state["shared"], state["masked"]) == (
        5,
        [d.client_id for d in devices[1:]],
        [d.client_id for d in devices[2:]],
    )
    assert summary["status"] == "published", summary
    (note,) = summary["clusters"]
    assert (note["advertised"], note["shared"], note["used"], note["revealed"]) == (5, 5, 4, 3)
    _assert_same_products(
        _published(session, store, spec, "cluster:0"), _exact(updates[2:], [1.0] * 4)
    )
    revealed = session.scalars(
        select(SecAggMember.revealed).where(SecAggMember.revealed.is_not(None))
    ).all()
    dropped = str(devices[1].client_id)
    for reveal in revealed:  # s of the dropped device, b of the survivors, never both of one
        assert list(reveal["s"]) == [dropped] and dropped not in reveal["b"]


@pytest.mark.slow  # waits out a phase for the dropped device
def test_too_few_survivors_fail_the_round_visibly(
    aggregator: TestClient,
    operator: dict,
    operator_token: str,
    spec: LoraSpec,
    session: Session,
) -> None:
    devices = _devices(aggregator, operator_token, session, 3)
    round_ = _secure_round(aggregator, operator, phase_s=PHASE_S)
    secure = [SecureRound(d, round_["id"], spec=spec) for d in devices]
    for s in secure:
        s.send_keys()
    for s in secure:
        s.fetch()
        s.send_shares()
    for s in secure[:2]:
        s.fetch()
        s.send_masked(_trained(s, 0), num_samples=8)

    with pytest.raises(RuntimeError, match="2 of 3 devices sent masked inputs in time"):
        secure[0].wait("unmasking", timeout_s=30, poll_s=0.1)
    seen = aggregator.get(f"/v1/rounds/{round_['id']}", headers=operator).json()

    assert seen["state"] == "failed"
    assert seen["error"] == (
        "secure aggregation failed in every cluster: cluster 0: 2 of 3 devices sent masked "
        "inputs in time; the threshold is 3"
    )


def test_secure_steps_refuse_bad_input_and_the_wrong_phase(
    aggregator: TestClient,
    operator: dict,
    operator_token: str,
    spec: LoraSpec,
    session: Session,
) -> None:
    devices = _devices(aggregator, operator_token, session, 3)
    outsider = enrol(aggregator, operator_token, "edge-outside")
    token = bearer(devices[0].token)
    refused_config = aggregator.post(
        "/v1/rounds", json={"method": "secure", "lam": 0.2}, headers=operator
    )
    round_ = _secure_round(aggregator, operator, phase_s=30)
    path = f"/v1/rounds/{round_['id']}/secagg"

    not_base64 = aggregator.post(
        f"{path}/keys", json={"c_public": "%%secret%%", "s_public": "AAAA"}, headers=token
    )
    short_key = aggregator.post(
        f"{path}/keys", json={"c_public": "AAAA", "s_public": "AAAA"}, headers=token
    )
    early_masked = aggregator.put(
        f"{path}/masked",
        content=b"\0" * 16,
        headers={**token, "Content-Type": "application/octet-stream"},
    )
    plain_update = upload(
        aggregator, devices[0].token, round_["id"], devices[0].client_id, lora_file(spec)
    )
    not_in_cluster = aggregator.get(path, headers=bearer(outsider["token"]))
    as_operator = aggregator.get(path, headers=operator)
    secure = [SecureRound(d, round_["id"], spec=spec) for d in devices]
    for s in secure:
        s.send_keys()
    again = aggregator.post(
        f"{path}/keys",
        json={"c_public": "A" * 43 + "=", "s_public": "B" * 43 + "="},
        headers=token,
    )
    incomplete = aggregator.post(f"{path}/shares", json={"shares": []}, headers=token)
    for s in secure:
        s.fetch()
        s.send_shares()
    wrong_length = aggregator.put(
        f"{path}/masked",
        content=b"\0" * 16,
        headers={**token, "Content-Type": "application/octet-stream"},
    )

    assert refused_config.status_code == 422
    assert "needs scope 'cluster', lam 0 and robust 'none'" in refused_config.text
    assert not_base64.status_code == 422 and "%%secret%%" not in not_base64.text
    assert short_key.status_code == 422, short_key.text
    assert early_masked.status_code == 409
    assert "in phase keys, not masked" in early_masked.json()["detail"]
    assert plain_update.status_code == 409 and "aggregates securely" in plain_update.text
    assert not_in_cluster.status_code == 403
    assert as_operator.status_code == 403
    assert again.status_code == 409
    assert incomplete.status_code == 422
    assert incomplete.json()["detail"] == "shares must go to each of the other 2 devices of U1 once"
    assert wrong_length.status_code == 422
    assert wrong_length.json()["detail"].startswith("a masked input is ")


def test_a_forged_input_withholds_its_cluster_with_the_reason(
    aggregator: TestClient,
    operator: dict,
    operator_token: str,
    spec: LoraSpec,
    session: Session,
    settings: Settings,
) -> None:
    devices = _devices(aggregator, operator_token, session, 3)
    round_ = _secure_round(aggregator, operator, phase_s=30, threshold=2)
    secure = [SecureRound(d, round_["id"], spec=spec) for d in devices]
    for s in secure:
        s.send_keys()
    for s in secure:
        s.fetch()
        s.send_shares()
    for s in secure[:2]:
        s.fetch()
        s.send_masked(_trained(s, 0), num_samples=8)
    forger = secure[2]
    forger.fetch()
    sealed = forger.device._call("GET", f"{forger.path}/shares").json()
    forger.participant.receive({int(x["sender_id"]): base64.b64decode(x["sealed"]) for x in sealed})
    honest = forger.encode(_trained(forger, 2), num_samples=8)
    scale = FixedPoint(1.0, count=3).scale
    honest[-1] = np.uint32(round(3.0 * scale))  # a weight of 3, past the [0, 1] a device may use
    forged = forger.participant.mask(honest, forger.state["shared"])
    forger.device._call(
        "PUT",
        f"{forger.path}/masked",
        content=forged.astype("<u4").tobytes(),
        headers={"Content-Type": "application/octet-stream"},
    )
    for s in secure:
        s.fetch()
        s.send_reveal()
    summary = _aggregate(settings, round_["id"], spec)

    assert summary["status"] == "failed"
    (note,) = summary["clusters"]
    assert note["published"] is False
    # 0.125 + 0.125 + 3 does not fit the room left for 3 inputs of weight <= 1: it wraps
    assert note["reason"].startswith("the cluster's sum is unusable: its weights sum to -2.7")
    assert note["reason"].endswith("outside (0, 3]: an input is forged")


def test_groups_made_by_a_concurrent_request_are_taken_not_a_500(
    aggregator: TestClient,
    operator: dict,
    operator_token: str,
    session: Session,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # two clusters; another request makes the round's groups between this request's look
    # (nothing yet) and its inserts: its flush must meet theirs inside the guarded commit
    enrolled = [enrol(aggregator, operator_token, f"edge-{i}") for i in range(4)]
    make_clustering(session, {d["id"]: i % 2 for i, d in enumerate(enrolled)})
    round_ = _secure_round(aggregator, operator)
    device = bearer(enrolled[0]["token"])
    assert aggregator.get(f"/v1/rounds/{round_['id']}/secagg", headers=device).status_code == 200
    groups = secagg._groups
    looks: list[int] = []

    def first_look_finds_none(s: Session, round_id: int) -> list[SecAggGroup]:
        looks.append(round_id)
        return [] if len(looks) == 1 else groups(s, round_id)

    monkeypatch.setattr(secagg, "_groups", first_look_finds_none)

    made = secagg.ensure_groups(session=session, round_=session.get(Round, round_["id"]))

    assert len(looks) == 2  # the window was taken: it looked again after its commit failed
    assert [g.label for g in made] == [0, 1]
    assert session.scalar(select(func.count()).select_from(SecAggGroup)) == 2
