"""Federated rounds: opening, progress towards quorum, closing early, cancelling, retrying.

A round collects updates until quorum (see `closing.RoundProgress.quorum_met`) or its deadline,
then the worker aggregates it: collecting -> aggregating -> published (or failed). An operator
may cancel a collecting round, exclude one device's update from it, and retry or fail an
aggregating one (`stuck`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, status
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.aggregator import crud
from services.aggregator.closing import EnqueueError, close_if_due, close_round
from services.aggregator.privacy import BudgetError, Policy, check_budget, round_config
from services.aggregator.stuck import fail_round, retry_round
from services.aggregator.views import round_out
from tessera.federation import RoundConfig
from tessera.models import Role, Round, RoundState, utcnow
from tessera.schemas import ExclusionCreate, RoundOut, RowId
from tessera.service.auth import OperatorDep, Principal, require_role
from tessera.service.deps import CeleryDep, SessionDep, SettingsDep

router = APIRouter(prefix="/v1/rounds", tags=["rounds"])

OperatorOrDeviceDep = Annotated[Principal, require_role(Role.OPERATOR, Role.DEVICE)]


def _policy(settings: SettingsDep) -> Policy:
    return Policy.of(settings)


PolicyDep = Annotated[Policy, Depends(_policy)]


def get_round(session: Session, round_id: int) -> Round:
    round_ = session.get(Round, round_id)
    if round_ is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such round")
    return round_


def not_collecting(round_: Round) -> HTTPException:
    return HTTPException(
        status.HTTP_409_CONFLICT,
        detail=f"round {round_.number} is {round_.state.value}, not collecting",
    )


def _enqueue_failed(_error: EnqueueError) -> HTTPException:
    # The queue's own error is logged where it happened; the client learns what to do.
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        detail="the job queue is unavailable; the round is still collecting, retry",
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Open the next round",
    responses={
        409: {
            "description": "a round is already collecting, or the federation's privacy budget "
            "refuses it (spent, or the round is not private)"
        }
    },
)
def open_round(
    config: RoundConfig,
    _operator: OperatorDep,
    session: SessionDep,
    celery: CeleryDep,
    policy: PolicyDep,
) -> RoundOut:
    try:
        config = round_config(config, policy=policy)
        check_budget(session=session, policy=policy, noise_multiplier=config.noise_multiplier)
    except ValidationError as error:  # the federation's noise on a round that cannot take it
        reasons = "; ".join(str(e["msg"]) for e in error.errors(include_input=False))
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail="this federation's rounds are private (TESSERA_DP_NOISE_MULTIPLIER): " + reasons,
        ) from error
    except BudgetError as error:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(error)) from error
    current = crud.collecting_round(session=session)
    if current is not None:
        close_if_due(session=session, celery=celery, round_=current)
    try:
        round_ = crud.create_round(session=session, config=config, now=utcnow())
        session.commit()
    except (crud.RoundConflictError, IntegrityError) as error:
        session.rollback()
        detail = str(error) if isinstance(error, crud.RoundConflictError) else "a round was opened"
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"{detail}: close or cancel it before opening another",
        ) from error
    return round_out(session=session, round_=round_, policy=policy)


@router.get("", summary="Rounds, newest first")
def list_rounds(
    _operator: OperatorDep,
    session: SessionDep,
    policy: PolicyDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[RoundOut]:
    return [
        round_out(session=session, round_=round_, policy=policy)
        for round_ in crud.list_rounds(session=session, limit=limit)
    ]


@router.get(
    "/current",
    summary="The newest round, whatever its state",
    responses={404: {"description": "no round was ever opened"}},
)
def current_round(
    caller: OperatorOrDeviceDep, session: SessionDep, celery: CeleryDep, policy: PolicyDep
) -> RoundOut:
    round_ = crud.latest_round(session=session)
    if round_ is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no round has been opened yet")
    close_if_due(session=session, celery=celery, round_=round_)
    return round_out(session=session, round_=round_, device_id=_device_id(caller), policy=policy)


@router.get("/{round_id}", summary="One round and its progress towards quorum")
def read_round(
    round_id: RowId,
    caller: OperatorOrDeviceDep,
    session: SessionDep,
    celery: CeleryDep,
    policy: PolicyDep,
) -> RoundOut:
    round_ = get_round(session, round_id)
    close_if_due(session=session, celery=celery, round_=round_)
    return round_out(session=session, round_=round_, device_id=_device_id(caller), policy=policy)


def _device_id(caller: Principal) -> int | None:
    """A device's own id, so that it sees only its own exclusion; None for an operator."""
    return caller.client_id if caller.role == Role.DEVICE else None


@router.post(
    "/{round_id}/close",
    summary="Stop collecting now and aggregate the updates received",
    responses={409: {"description": "the round is not collecting, or has no updates"}},
)
def close(
    round_id: RowId,
    _operator: OperatorDep,
    session: SessionDep,
    celery: CeleryDep,
    policy: PolicyDep,
) -> RoundOut:
    round_ = get_round(session, round_id)
    if round_.state != RoundState.COLLECTING:
        raise not_collecting(round_)
    if crud.count_updates(session=session, round_id=round_id) == 0:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"round {round_.number} has no updates to aggregate; cancel it instead",
        )
    try:
        if not close_round(session=session, celery=celery, round_id=round_id, why="operator"):
            session.refresh(round_)
            raise not_collecting(round_)
    except EnqueueError as error:
        raise _enqueue_failed(error) from error
    session.refresh(round_)
    return round_out(session=session, round_=round_, policy=policy)


@router.post(
    "/{round_id}/cancel",
    summary="Cancel a collecting round; its updates are never aggregated",
    responses={409: {"description": "the round is not collecting"}},
)
def cancel(
    round_id: RowId, operator: OperatorDep, session: SessionDep, policy: PolicyDep
) -> RoundOut:
    round_ = get_round(session, round_id)
    cancelled = crud.move_round(
        session=session,
        round_id=round_id,
        from_state=RoundState.COLLECTING,
        to_state=RoundState.CANCELLED,
        closed_at=utcnow(),
        error=f"cancelled by {operator.name}",
    )
    session.commit()
    session.refresh(round_)
    if not cancelled:
        raise not_collecting(round_)
    return round_out(session=session, round_=round_, policy=policy)


@router.post(
    "/{round_id}/exclusions",
    summary="Exclude a device's update from a collecting round, with a reason shown on it",
    responses={
        404: {"description": "no such round, or the device sent no update to it"},
        409: {"description": "the round is not collecting"},
    },
)
def exclude(
    round_id: RowId, body: ExclusionCreate, operator: OperatorDep, session: SessionDep
) -> RoundOut:
    round_ = get_round(session, round_id)
    if not crud.hold_collecting_round(session=session, round_id=round_id):
        session.rollback()
        raise not_collecting(round_)
    excluded = crud.exclude_update(
        session=session,
        round_id=round_id,
        client_id=body.client_id,
        reason=f"excluded by {operator.name}: {body.reason}",
    )
    if excluded is None:
        session.rollback()
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"client {body.client_id} has sent no update to round {round_.number}",
        )
    session.commit()
    session.refresh(round_)
    return round_out(session=session, round_=round_)


@router.post(
    "/{round_id}/retry",
    summary="Aggregate an aggregating or failed round again, now",
    responses={
        409: {"description": "the round is not aggregating or failed"},
        503: {"description": "the task could not be queued; the round loop queues it later"},
    },
)
def retry(
    round_id: RowId,
    _operator: OperatorDep,
    session: SessionDep,
    celery: CeleryDep,
    policy: PolicyDep,
) -> RoundOut:
    round_ = get_round(session, round_id)
    try:
        retried = retry_round(session=session, celery=celery, round_id=round_id)
    except EnqueueError as error:
        raise _enqueue_failed(error) from error
    session.refresh(round_)
    if not retried:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"round {round_.number} is {round_.state.value}; only an aggregating or "
            "failed round can be retried",
        )
    return round_out(session=session, round_=round_, policy=policy)


@router.post(
    "/{round_id}/fail",
    summary="Fail an aggregating round; nothing it would publish is announced",
    responses={409: {"description": "the round is not aggregating"}},
)
def fail(
    round_id: RowId, operator: OperatorDep, session: SessionDep, policy: PolicyDep
) -> RoundOut:
    round_ = get_round(session, round_id)
    failed = fail_round(session=session, round_id=round_id, why=f"failed by {operator.name}")
    session.refresh(round_)
    if not failed:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"round {round_.number} is {round_.state.value}, not aggregating",
        )
    return round_out(session=session, round_=round_, policy=policy)
