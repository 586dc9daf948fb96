"""The federation's privacy budget: which rounds are private, each device's epsilon, refusals.

A device's epsilon composes one Gaussian mechanism per private round it uploaded to
(`tessera.privacy`, where the assumptions are). Rounds count from the upload on, whether the
update was used or excluded; a cancelled or failed round releases nothing and does not count.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from tessera import privacy
from tessera.config import Settings
from tessera.federation import RoundConfig
from tessera.models import Client, Role, Round, RoundState, Update
from tessera.schemas import DeviceEpsilon, RoundPrivacy

COUNTED_STATES = (RoundState.COLLECTING, RoundState.AGGREGATING, RoundState.PUBLISHED)
ASSUMPTIONS = (
    "each private round a device uploaded to counts in full (no amplification by sampling); "
    "neighbouring rounds differ in one device's update replaced by zero, with who took part "
    "public; cancelled and failed rounds do not count"
)


class BudgetError(Exception):
    """Opening the round would break the federation's privacy policy; the message says why."""


@dataclass(frozen=True)
class Policy:
    """The federation's privacy settings."""

    noise_multiplier: float | None
    epsilon_budget: float | None
    delta: float

    @classmethod
    def of(cls, settings: Settings) -> Policy:
        return cls(settings.dp_noise_multiplier, settings.dp_epsilon_budget, settings.dp_delta)


def round_config(config: RoundConfig, *, policy: Policy) -> RoundConfig:
    """The round's configuration with the federation's noise multiplier where it names none.

    Raises ValidationError when that makes it an invalid private round (the 422 says what the
    round lacks), and BudgetError when the federation has a budget and the round is not private.
    """
    if config.noise_multiplier is None and policy.noise_multiplier is not None:
        values = {**config.model_dump(), "noise_multiplier": policy.noise_multiplier}
        config = RoundConfig.model_validate(values)
    if policy.epsilon_budget is not None and config.noise_multiplier is None:
        raise BudgetError(
            "this federation has a privacy budget (TESSERA_DP_EPSILON_BUDGET): every round "
            "must be private; set noise_multiplier, with clip 'fixed', clip_norm, weighting "
            "'equal' and robust 'none'"
        )
    return config


def check_budget(*, session: Session, policy: Policy, noise_multiplier: float | None) -> None:
    """Raise BudgetError when one more round at `noise_multiplier` would take an enabled device
    past the federation's budget (nothing to check without a budget or without noise)."""
    budget = policy.epsilon_budget
    if budget is None or noise_multiplier is None:
        return
    enabled = session.scalars(
        select(Client.id).where(Client.role == Role.DEVICE, Client.disabled_at.is_(None))
    ).all()
    spent = spent_multipliers(session=session, client_ids=enabled)
    worst, who = 0.0, None
    for client_id in enabled:
        after = privacy.epsilon([*spent.get(client_id, []), noise_multiplier], delta=policy.delta)
        if after > worst:
            worst, who = after, client_id
    if worst > budget:
        raise BudgetError(
            f"the privacy budget is spent: one more round at noise multiplier "
            f"{noise_multiplier:g} takes device {who} to epsilon {worst:.3g} at delta "
            f"{policy.delta:g}, past the budget of {budget:g} (TESSERA_DP_EPSILON_BUDGET)"
        )


def spent_multipliers(
    *, session: Session, client_ids: Iterable[int], up_to: int | None = None
) -> dict[int, list[float]]:
    """Each device's noise multipliers, one per private round it uploaded to (round numbers
    up to `up_to` when given), in counted states only."""
    # Deduplicated here, not by SELECT DISTINCT: PostgreSQL has no equality for a json column.
    query = (
        select(Update.client_id, Round.id, Round.config)
        .join(Round, Round.id == Update.round_id)
        .where(Update.client_id.in_(list(client_ids)), Round.state.in_(COUNTED_STATES))
    )
    if up_to is not None:
        query = query.where(Round.number <= up_to)
    spent: dict[int, list[float]] = {}
    seen: set[tuple[int, int]] = set()
    for row in session.execute(query):
        if (row.client_id, row.id) in seen:
            continue
        seen.add((row.client_id, row.id))
        multiplier = row.config.get("noise_multiplier")
        if multiplier is not None:
            spent.setdefault(row.client_id, []).append(float(multiplier))
    return spent


def round_privacy(
    *, session: Session, round_: Round, policy: Policy, device_id: int | None = None
) -> RoundPrivacy | None:
    """A private round's mechanism and each of its devices' epsilon after it (a device: its own
    only); None for a round that is not private."""
    try:
        config = RoundConfig.model_validate(round_.config)
    except ValidationError:
        return None
    if config.noise_multiplier is None or config.clip_norm is None:
        return None
    query = select(Update.client_id).where(Update.round_id == round_.id).distinct()
    if device_id is not None:
        query = query.where(Update.client_id == device_id)
    members = sorted(session.scalars(query))
    spent = spent_multipliers(session=session, client_ids=members, up_to=round_.number)
    devices = [
        DeviceEpsilon(
            client_id=client_id,
            rounds=len(spent.get(client_id, [])),
            epsilon=privacy.epsilon(spent.get(client_id, []), delta=policy.delta),
        )
        for client_id in members
    ]
    return RoundPrivacy(
        noise_multiplier=config.noise_multiplier,
        clip_norm=config.clip_norm,
        delta=policy.delta,
        epsilon_budget=policy.epsilon_budget,
        max_epsilon=max((d.epsilon for d in devices), default=0.0),
        devices=devices,
        accountant=privacy.ACCOUNTANT,
        assumptions=ASSUMPTIONS,
    )
