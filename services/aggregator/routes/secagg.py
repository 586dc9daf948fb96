"""Secure aggregation over HTTP: a device's steps through its cluster's protocol in a round.

GET the state (phase, the frozen-A seed, the sets U1..U3), POST keys, POST sealed shares, GET
the shares sealed for it, PUT the masked input (uint32 little-endian), POST the reveal. Every
step checks the phase and the device's place in the sets; each answer is the new state.
The server stores public keys, sealed shares, masked inputs and the requested shares only:
never an unmasked input (see `tessera.secagg.protocol`).
"""

from __future__ import annotations

from typing import Annotated

from celery import Celery
from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.aggregator import secagg
from services.aggregator.deps import LoraSpecDep
from services.aggregator.routes.rounds import get_round
from services.aggregator.uploads import read_body
from tessera.federation import RoundConfig, masked_input_key
from tessera.lora import LoraSpec
from tessera.models import SecAggMember, SecAggPhase, SecAggShare, utcnow
from tessera.schemas import RowId
from tessera.secagg.messages import (
    DeviceProgress,
    KeysIn,
    PeerOut,
    RevealIn,
    SealedShareOut,
    SecAggStateOut,
    SharesIn,
    b64,
)
from tessera.secagg.vector import vector_length
from tessera.service.auth import DeviceDep, Principal
from tessera.service.deps import CeleryDep, SessionDep, StoreDep
from tessera.storage import ObjectStore

router = APIRouter(prefix="/v1/rounds", tags=["secure aggregation"])

_ORDER = [
    SecAggPhase.KEYS,
    SecAggPhase.SHARES,
    SecAggPhase.MASKED,
    SecAggPhase.UNMASKING,
    SecAggPhase.READY,
]
_RESPONSES: dict[int | str, dict[str, str]] = {
    403: {"description": "the device is not in a cluster of the round's clustering"},
    404: {"description": "no such round"},
    409: {"description": "not a secure round, or its cluster is in another phase"},
}


class _Context:
    """The round, its config, the device's group and membership, after advancing the round."""

    def __init__(self, session: Session, celery: Celery, round_id: int, device: Principal):
        round_ = get_round(session, round_id)
        if not secagg.is_secure(round_):
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                detail=f"round {round_.number} does not aggregate securely",
            )
        secagg.advance_round(session=session, celery=celery, round_=round_)
        client_id = device.client_id
        assert client_id is not None  # a device principal always has its id
        label = secagg.device_label(session=session, round_=round_, client_id=client_id)
        if label is None:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                detail=f"the device is not in a cluster of round {round_.number}'s clustering",
            )
        groups = secagg.ensure_groups(session=session, round_=round_)
        group = next((g for g in groups if g.label == label), None)
        if group is None:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                detail=f"round {round_.number} has no secure group for cluster {label}",
            )
        self.round = round_
        self.config = RoundConfig.model_validate(round_.config)
        self.group = group
        self.client_id = client_id
        self.member = _member(session, group.id, client_id)

    def require(self, phase: SecAggPhase) -> None:
        if self.group.phase != phase:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                detail=f"cluster {self.group.label}'s secure aggregation is in phase "
                f"{self.group.phase.value}, not {phase.value}",
            )

    def past(self, phase: SecAggPhase) -> bool:
        return self.group.phase in _ORDER and _ORDER.index(self.group.phase) > _ORDER.index(phase)


def _member(session: Session, group_id: int, client_id: int) -> SecAggMember | None:
    return session.scalar(
        select(SecAggMember).where(
            SecAggMember.group_id == group_id, SecAggMember.client_id == client_id
        )
    )


def _members(session: Session, group_id: int) -> list[SecAggMember]:
    return list(
        session.scalars(
            select(SecAggMember)
            .where(SecAggMember.group_id == group_id)
            .order_by(SecAggMember.client_id)
        )
    )


def _state(session: Session, context: _Context, spec: LoraSpec) -> SecAggStateOut:
    group, config, member = context.group, context.config, context.member
    members = _members(session, group.id)
    peers = [m for m in members if m.share_index is not None]
    shared = [m.client_id for m in members if m.shared_at is not None]
    masked = [m.client_id for m in members if m.masked_key is not None]
    return SecAggStateOut(
        round_id=context.round.id,
        label=group.label,
        phase=group.phase,
        phase_deadline=secagg.phase_deadline(group, config),
        error=group.error,
        a_seed=group.a_seed,
        rank=config.rank,
        alpha=config.secure_alpha,
        threshold=secagg.group_threshold(group, config),
        value_range=config.secure.value_range,
        clip_norm=config.secure.clip_norm,
        weighting=config.weighting,
        sample_cap=config.secure.sample_cap,
        vector_length=vector_length(spec, rank=config.rank),
        peers=[
            PeerOut(
                client_id=m.client_id,
                index=m.share_index,
                c_public=b64(m.c_public),
                s_public=b64(m.s_public),
            )
            for m in sorted(peers, key=lambda m: m.share_index or 0)
            if m.share_index is not None
        ],
        shared=shared if context.past(SecAggPhase.SHARES) else [],
        masked=masked if context.past(SecAggPhase.MASKED) else [],
        you=DeviceProgress(
            keys=member is not None,
            shares=member is not None and member.shared_at is not None,
            masked=member is not None and member.masked_key is not None,
            revealed=member is not None and member.revealed is not None,
        ),
    )


def _after(session: Session, celery: Celery, context: _Context, spec: LoraSpec) -> SecAggStateOut:
    """Advance the round after a step, then the device's new state."""
    session.refresh(context.round)
    secagg.advance_round(session=session, celery=celery, round_=context.round)
    session.refresh(context.group)
    context.member = _member(session, context.group.id, context.client_id)
    return _state(session, context, spec)


def _held(session: Session, context: _Context, phase: SecAggPhase) -> None:
    """Take the group's lock in `phase`, or 409 (it moved since it was read)."""
    if not secagg.hold_group(session=session, group_id=context.group.id, phase=phase):
        session.rollback()
        session.refresh(context.group)
        context.require(phase)


def _context(
    round_id: RowId, device: DeviceDep, session: SessionDep, celery: CeleryDep
) -> _Context:
    return _Context(session, celery, round_id, device)


ContextDep = Annotated[_Context, Depends(_context)]


@router.get(
    "/{round_id}/secagg",
    summary="The device's view of its cluster's secure aggregation",
    responses=_RESPONSES,
)
def read_state(context: ContextDep, session: SessionDep, spec: LoraSpecDep) -> SecAggStateOut:
    return _state(session, context, spec)


@router.post(
    "/{round_id}/secagg/keys",
    summary="Advertise the device's two public keys (phase keys)",
    responses=_RESPONSES,
)
def post_keys(
    keys: KeysIn, context: ContextDep, session: SessionDep, celery: CeleryDep, spec: LoraSpecDep
) -> SecAggStateOut:
    context.require(SecAggPhase.KEYS)
    if context.member is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, detail="the device already sent its keys")
    if keys.c_public == keys.s_public:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, detail="c_public and s_public must differ"
        )
    _held(session, context, SecAggPhase.KEYS)
    session.add(
        SecAggMember(
            group_id=context.group.id,
            client_id=context.client_id,
            c_public=keys.c_public,
            s_public=keys.s_public,
        )
    )
    session.commit()
    return _after(session, celery, context, spec)


@router.post(
    "/{round_id}/secagg/shares",
    summary="Send the device's sealed shares, one for every other device of U1 (phase shares)",
    responses=_RESPONSES,
)
def post_shares(
    body: SharesIn, context: ContextDep, session: SessionDep, celery: CeleryDep, spec: LoraSpecDep
) -> SecAggStateOut:
    context.require(SecAggPhase.SHARES)
    member = context.member
    if member is None or member.share_index is None:
        raise HTTPException(status.HTTP_409_CONFLICT, detail="the device is not in U1")
    if member.shared_at is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, detail="the device already sent shares")
    others = {
        m.client_id
        for m in _members(session, context.group.id)
        if m.share_index is not None and m.client_id != context.client_id
    }
    recipients = [share.recipient_id for share in body.shares]
    if len(set(recipients)) != len(recipients) or set(recipients) != others:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"shares must go to each of the other {len(others)} devices of U1 once",
        )
    _held(session, context, SecAggPhase.SHARES)
    for share in body.shares:
        session.add(
            SecAggShare(
                group_id=context.group.id,
                sender_id=context.client_id,
                recipient_id=share.recipient_id,
                sealed=share.sealed,
            )
        )
    member.shared_at = utcnow()
    session.commit()
    return _after(session, celery, context, spec)


@router.get(
    "/{round_id}/secagg/shares",
    summary="The shares that devices of U2 sealed for this device (from phase masked on)",
    responses=_RESPONSES,
)
def read_shares(context: ContextDep, session: SessionDep) -> list[SealedShareOut]:
    if not context.past(SecAggPhase.SHARES):
        context.require(SecAggPhase.MASKED)
    if context.member is None or context.member.shared_at is None:
        raise HTTPException(status.HTTP_409_CONFLICT, detail="the device is not in U2")
    rows = session.execute(
        select(SecAggShare.sender_id, SecAggShare.sealed)
        .join(
            SecAggMember,
            (SecAggMember.group_id == SecAggShare.group_id)
            & (SecAggMember.client_id == SecAggShare.sender_id),
        )
        .where(
            SecAggShare.group_id == context.group.id,
            SecAggShare.recipient_id == context.client_id,
            SecAggMember.shared_at.is_not(None),
        )
        .order_by(SecAggShare.sender_id)
    )
    return [SealedShareOut(sender_id=row.sender_id, sealed=b64(row.sealed)) for row in rows]


def _store_masked(
    session: Session, store: ObjectStore, context: _Context, data: bytes, length: int
) -> None:
    if len(data) != 4 * length:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"a masked input is {4 * length} bytes ({length} uint32, little-endian)",
        )
    key = masked_input_key(context.round.id, context.group.label, context.client_id)
    store.put_bytes(key, data)
    _held(session, context, SecAggPhase.MASKED)
    assert context.member is not None
    context.member.masked_key = key
    session.commit()


@router.put(
    "/{round_id}/secagg/masked",
    summary="Send (or send again) the device's masked input (phase masked)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
    responses={**_RESPONSES, 413: {"description": "longer than the round's masked input"}},
)
async def put_masked(
    round_id: RowId,
    request: Request,
    device: DeviceDep,
    session: SessionDep,
    celery: CeleryDep,
    store: StoreDep,
    spec: LoraSpecDep,
) -> SecAggStateOut:
    context = await run_in_threadpool(_Context, session, celery, round_id, device)
    context.require(SecAggPhase.MASKED)
    if context.member is None or context.member.shared_at is None:
        raise HTTPException(status.HTTP_409_CONFLICT, detail="the device is not in U2")
    session.rollback()  # no transaction open while the body arrives
    length = vector_length(spec, rank=context.config.rank)
    data = await read_body(request, limit=4 * length)
    await run_in_threadpool(_store_masked, session, store, context, data, length)
    return await run_in_threadpool(_after, session, celery, context, spec)


@router.post(
    "/{round_id}/secagg/unmask",
    summary="Reveal shares of b for U3 and of s for U2 minus U3 (phase unmasking)",
    responses=_RESPONSES,
)
def post_reveal(
    body: RevealIn, context: ContextDep, session: SessionDep, celery: CeleryDep, spec: LoraSpecDep
) -> SecAggStateOut:
    context.require(SecAggPhase.UNMASKING)
    member = context.member
    if member is None or member.masked_key is None:
        raise HTTPException(status.HTTP_409_CONFLICT, detail="the device is not in U3")
    if member.revealed is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, detail="the device already answered")
    members = _members(session, context.group.id)
    survivors = {m.client_id for m in members if m.masked_key is not None}
    dropped = {m.client_id for m in members if m.shared_at is not None} - survivors
    if set(body.b_shares) != survivors or set(body.s_shares) != dropped:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"need shares of b for the {len(survivors)} devices of U3 and of s for the "
            f"{len(dropped)} devices of U2 that sent no masked input, and no others",
        )
    _held(session, context, SecAggPhase.UNMASKING)
    member.revealed = {
        "b": {str(owner): b64(share) for owner, share in body.b_shares.items()},
        "s": {str(owner): b64(share) for owner, share in body.s_shares.items()},
    }
    session.commit()
    return _after(session, celery, context, spec)
