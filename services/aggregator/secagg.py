"""Secure rounds on the aggregator: one group per cluster, moved through the protocol's phases.

A secure round (`method: secure`) has one `SecAggGroup` per cluster of its clustering with
members, made on the first request about the round. A group moves keys -> shares -> masked ->
unmasking -> ready when every device still in it has answered the phase, or when `phase_s` has
passed without an answer and at least `threshold` devices have answered; with fewer it fails,
with the counts as its reason. Phases move through a conditional UPDATE, so of racing requests
and replicas one wins.
When every group has finished, the round closes: aggregating (the worker unmasks each ready
group's sum) if any group is ready, else failed with each group's reason. Requests advance their
own round's groups; the round loop advances every secure round, so a cluster whose devices all
went away still finishes.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from services.aggregator import crud
from services.aggregator.closing import EnqueueError, close_round
from tessera.federation import RoundConfig, cluster_adapter_name
from tessera.models import (
    Adapter,
    AdapterVersion,
    Assignment,
    Round,
    RoundState,
    SecAggGroup,
    SecAggMember,
    SecAggPhase,
    utcnow,
)
from tessera.schemas import as_utc
from tessera.storage import ObjectStore

log = logging.getLogger(__name__)

FINISHED = (SecAggPhase.READY, SecAggPhase.FAILED)
_NEXT = {
    SecAggPhase.KEYS: SecAggPhase.SHARES,
    SecAggPhase.SHARES: SecAggPhase.MASKED,
    SecAggPhase.MASKED: SecAggPhase.UNMASKING,
    SecAggPhase.UNMASKING: SecAggPhase.READY,
}
_WHAT = {
    SecAggPhase.KEYS: "sent keys",
    SecAggPhase.SHARES: "sent shares",
    SecAggPhase.MASKED: "sent masked inputs",
    SecAggPhase.UNMASKING: "answered the unmasking",
}
MAX_SEED = 2**62
MIN_THRESHOLD = 2


def is_secure(round_: Round) -> bool:
    return bool(round_.config.get("method") == "secure")


def device_label(*, session: Session, round_: Round, client_id: int) -> int | None:
    """The device's cluster in the round's clustering (None: not in it)."""
    if round_.clustering_id is None:
        return None
    return session.scalar(
        select(Assignment.label).where(
            Assignment.clustering_id == round_.clustering_id, Assignment.client_id == client_id
        )
    )


def ensure_groups(*, session: Session, round_: Round) -> list[SecAggGroup]:
    """The round's groups, made (and committed) for every cluster with members if missing."""
    groups = _groups(session, round_.id)
    if groups or round_.clustering_id is None or round_.state != RoundState.COLLECTING:
        return groups
    config = RoundConfig.model_validate(round_.config)
    members = crud.cluster_members(session=session, clustering_id=round_.clustering_id)
    # every seed looked up before the first row is added: a query would flush the added rows,
    # and the flush, not the commit, would then meet a concurrent request's groups
    seeds = {label: _a_seed(session, label, config) for label, count in members.items() if count}
    now = utcnow()
    for label, seed in sorted(seeds.items()):
        session.add(
            SecAggGroup(
                round_id=round_.id,
                label=label,
                a_seed=seed,
                phase=SecAggPhase.KEYS,
                expected=members[label],
                waiting_since=now,
            )
        )
    try:
        session.commit()
    except IntegrityError:
        session.rollback()  # another request made them
    return _groups(session, round_.id)


def _groups(session: Session, round_id: int) -> list[SecAggGroup]:
    return list(
        session.scalars(
            select(SecAggGroup).where(SecAggGroup.round_id == round_id).order_by(SecAggGroup.label)
        )
    )


def _a_seed(session: Session, label: int, config: RoundConfig) -> int:
    """The seed of the cluster's latest secure adapter at this rank (its devices then train on
    from its B), else a fresh one."""
    metrics = session.scalar(
        select(AdapterVersion.metrics)
        .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
        .where(Adapter.name == cluster_adapter_name(label))
        .order_by(AdapterVersion.version.desc())
        .limit(1)
    )
    if (
        metrics
        and metrics.get("method") == "secure"
        and metrics.get("rank") == config.rank
        and isinstance(metrics.get("a_seed"), int)
    ):
        seed: int = metrics["a_seed"]
        return seed
    return secrets.randbelow(MAX_SEED)


def hold_group(*, session: Session, group_id: int, phase: SecAggPhase) -> bool:
    """Take the group's row lock if it is in `phase` (see `crud.hold_collecting_round`), and
    restart the phase's wait: a device is answering."""
    result = session.execute(
        update(SecAggGroup)
        .where(SecAggGroup.id == group_id, SecAggGroup.phase == phase)
        .values(waiting_since=utcnow())
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def answered(session: Session, group: SecAggGroup, phase: SecAggPhase) -> tuple[int, int]:
    """(devices that answered `phase`, devices that were asked to)."""
    members = select(func.count()).where(SecAggMember.group_id == group.id)
    asked = {
        SecAggPhase.KEYS: None,
        SecAggPhase.SHARES: SecAggMember.share_index.is_not(None),
        SecAggPhase.MASKED: SecAggMember.shared_at.is_not(None),
        SecAggPhase.UNMASKING: SecAggMember.masked_key.is_not(None),
    }[phase]
    done = {
        SecAggPhase.KEYS: None,
        SecAggPhase.SHARES: SecAggMember.shared_at.is_not(None),
        SecAggPhase.MASKED: SecAggMember.masked_key.is_not(None),
        SecAggPhase.UNMASKING: SecAggMember.revealed.is_not(None),
    }[phase]
    if phase == SecAggPhase.KEYS:
        return session.scalar(members) or 0, group.expected
    assert asked is not None and done is not None
    return session.scalar(members.where(done)) or 0, session.scalar(members.where(asked)) or 0


def advance_group(*, session: Session, group: SecAggGroup, config: RoundConfig) -> bool:
    """Move the group on if its phase is complete or timed out; whether it moved. Commits."""
    phase = group.phase
    if phase in FINISHED:
        return False
    done, asked = answered(session, group, phase)
    threshold = group_threshold(group, config)
    now = utcnow()
    timed_out = as_utc(group.waiting_since) + timedelta(seconds=config.secure.phase_s) <= now
    if done < asked and not timed_out:
        return False
    if done >= threshold:
        return _move(session, group, phase, _NEXT[phase], now, config=config)
    reason = (
        f"cluster {group.label}: {done} of {asked} devices {_WHAT[phase]} in time; "
        f"the threshold is {threshold}"
    )
    return _move(session, group, phase, SecAggPhase.FAILED, now, error=reason)


def _move(
    session: Session,
    group: SecAggGroup,
    from_phase: SecAggPhase,
    to_phase: SecAggPhase,
    now: datetime,
    *,
    error: str | None = None,
    config: RoundConfig | None = None,
) -> bool:
    moved = session.execute(
        update(SecAggGroup)
        .where(SecAggGroup.id == group.id, SecAggGroup.phase == from_phase)
        .values(phase=to_phase, waiting_since=now, error=error)
        .execution_options(synchronize_session=False)
    )
    if getattr(moved, "rowcount", 0) != 1:
        session.rollback()
        return False
    if to_phase == SecAggPhase.SHARES:  # U1 is fixed: share indexes 1..n by client id
        assert config is not None
        members = list(
            session.scalars(
                select(SecAggMember)
                .where(SecAggMember.group_id == group.id)
                .order_by(SecAggMember.client_id)
            )
        )
        for index, member in enumerate(members, start=1):
            member.share_index = index
        threshold = config.secure.threshold or max(MIN_THRESHOLD, len(members) // 2 + 1)
        session.execute(
            update(SecAggGroup)
            .where(SecAggGroup.id == group.id)
            .values(threshold=threshold)
            .execution_options(synchronize_session=False)
        )
    session.commit()
    session.refresh(group)
    log.info(
        "secure group moved",
        extra={"round_id": group.round_id, "label": group.label, "phase": to_phase.value},
    )
    if error:
        log.warning("secure group failed", extra={"round_id": group.round_id, "error": error})
    return True


def group_threshold(group: SecAggGroup, config: RoundConfig) -> int:
    """t: fixed when the keys phase ends; before, the least number of keys that can go on."""
    if group.threshold is not None:
        return group.threshold
    return config.secure.threshold or MIN_THRESHOLD


def advance_round(*, session: Session, celery: Celery, round_: Round) -> None:
    """Advance every group of a collecting secure round, then close the round if all finished."""
    if round_.state != RoundState.COLLECTING or not is_secure(round_):
        return
    config = RoundConfig.model_validate(round_.config)
    groups = ensure_groups(session=session, round_=round_)
    for group in groups:
        while advance_group(session=session, group=group, config=config):
            pass
    if groups and all(group.phase in FINISHED for group in groups):
        finish_round(session=session, celery=celery, round_=round_, groups=groups)


def finish_round(
    *, session: Session, celery: Celery, round_: Round, groups: list[SecAggGroup]
) -> None:
    """Aggregate the ready groups, or fail the round when none is ready (visibly, with why)."""
    if any(group.phase == SecAggPhase.READY for group in groups):
        # On EnqueueError the round is collecting again: the round loop's next pass retries.
        with contextlib.suppress(EnqueueError):
            close_round(session=session, celery=celery, round_id=round_.id, why="secure")
    else:
        reasons = "; ".join(group.error or f"cluster {group.label} failed" for group in groups)
        crud.move_round(
            session=session,
            round_id=round_.id,
            from_state=RoundState.COLLECTING,
            to_state=RoundState.FAILED,
            closed_at=utcnow(),
            error=f"secure aggregation failed in every cluster: {reasons}"[:2000],
        )
        session.commit()
    session.refresh(round_)


def fail_unfinished(*, session: Session, round_: Round, why: str) -> list[SecAggGroup]:
    """At the round's deadline: fail every group still running; the groups (committed)."""
    groups = ensure_groups(session=session, round_=round_)
    now = utcnow()
    for group in groups:
        if group.phase not in FINISHED:
            reason = f"cluster {group.label}: {why} in phase {group.phase.value}"
            _move(session, group, group.phase, SecAggPhase.FAILED, now, error=reason)
    return groups


def advance_secure_rounds(*, sessions: sessionmaker[Session], celery: Celery) -> list[int]:
    """The round loop's pass: advance every collecting secure round; the ids it closed."""
    closed = []
    with sessions() as session:
        for round_id in crud.collecting_round_ids(session=session):
            round_ = session.get(Round, round_id)
            if round_ is None or not is_secure(round_):
                continue
            advance_round(session=session, celery=celery, round_=round_)
            if round_.state != RoundState.COLLECTING:
                closed.append(round_id)
    return closed


def phase_deadline(group: SecAggGroup, config: RoundConfig) -> datetime | None:
    if group.phase in FINISHED:
        return None
    return as_utc(group.waiting_since) + timedelta(seconds=config.secure.phase_s)


def summary(session: Session, group: SecAggGroup) -> dict[str, Any]:
    """What the round's report says about a group."""
    counts = {}
    for phase in _WHAT:
        counts[phase.value] = answered(session, group, phase)[0]
    return {"label": group.label, "phase": group.phase.value, "answered": counts}


def close_at_deadline(*, session: Session, celery: Celery, round_id: int) -> bool:
    """A secure round past its deadline: fail its unfinished groups, then finish it."""
    round_ = session.get(Round, round_id)
    if round_ is None or round_.state != RoundState.COLLECTING:
        return False
    groups = fail_unfinished(session=session, round_=round_, why="the round's deadline passed")
    if not groups:
        crud.move_round(
            session=session,
            round_id=round_id,
            from_state=RoundState.COLLECTING,
            to_state=RoundState.FAILED,
            closed_at=utcnow(),
            error="secure aggregation: the round's clustering has no cluster with members",
        )
        session.commit()
        session.refresh(round_)
    else:
        finish_round(session=session, celery=celery, round_=round_, groups=groups)
    return round_.state != RoundState.COLLECTING


def forget_failed_inputs(*, sessions: sessionmaker[Session], store: ObjectStore) -> int:
    """Delete the masked inputs of secure rounds that failed or were cancelled (a published
    round's are deleted by the worker); how many."""
    with sessions() as session:
        members = list(
            session.scalars(
                select(SecAggMember)
                .join(SecAggGroup, SecAggGroup.id == SecAggMember.group_id)
                .join(Round, Round.id == SecAggGroup.round_id)
                .where(
                    SecAggMember.masked_key.is_not(None),
                    Round.state.in_([RoundState.FAILED, RoundState.CANCELLED]),
                )
            )
        )
        for member in members:
            if member.masked_key is not None:
                store.delete(member.masked_key)
            member.masked_key = None
        session.commit()
    return len(members)
