"""Stored rows turned into the API's response models."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session

from services.aggregator import crud
from services.aggregator.closing import round_progress
from services.aggregator.privacy import Policy, round_privacy
from tessera.federation import RoundConfig
from tessera.models import Adapter, AdapterVersion, Round, utcnow
from tessera.schemas import (
    AdapterDownload,
    AdapterVersionOut,
    ExcludedUpdate,
    RoundBrief,
    RoundOut,
)
from tessera.storage import ObjectStore


def version_out(adapter: Adapter, version: AdapterVersion) -> AdapterVersionOut:
    return AdapterVersionOut(
        name=adapter.name,
        version=version.version,
        version_id=version.id,
        round_id=version.round_id,
        sha256=version.sha256,
        size_bytes=version.size_bytes,
        rank=version.rank,
        metrics=version.metrics,
        created_at=version.created_at,
    )


def adapter_download(
    adapter: Adapter, version: AdapterVersion, *, store: ObjectStore, expires_s: int
) -> AdapterDownload:
    """A version with a presigned URL (signed locally: no request to the object store)."""
    return AdapterDownload(
        **version_out(adapter, version).model_dump(),
        download_url=store.presigned_get_url(version.object_key, expires_s=expires_s),
        url_expires_at=utcnow() + timedelta(seconds=expires_s),
    )


def round_brief(round_: Round) -> RoundBrief:
    return RoundBrief(
        id=round_.id,
        number=round_.number,
        state=round_.state,
        deadline=round_.deadline,
        config=RoundConfig.model_validate(round_.config),
    )


def round_out(
    *, session: Session, round_: Round, device_id: int | None = None, policy: Policy | None = None
) -> RoundOut:
    """A round with its progress, the versions it published and the updates it excluded, and
    (with the federation's privacy `policy`) a private round's epsilon per device.

    For a device (`device_id`), only its own exclusion and epsilon, and no aggregation report.
    """
    progress = round_progress(session=session, round_=round_)
    excluded = crud.excluded_updates(session=session, round_id=round_.id, client_id=device_id)
    brief = round_brief(round_)
    return RoundOut(
        **brief.model_dump(),
        opened_at=round_.opened_at,
        closed_at=round_.closed_at,
        published_at=round_.published_at,
        clustering_id=round_.clustering_id,
        error=round_.error,
        heartbeat_at=round_.heartbeat_at,
        updates_deleted_at=round_.updates_deleted_at,
        attempts=round_.attempts,
        updates=progress.total,
        clusters=progress.clusters,
        unassigned_updates=progress.unassigned,
        quorum_met=progress.quorum_met(brief.config),
        published=[
            version_out(adapter, version)
            for adapter, version in crud.round_versions(session=session, round_id=round_.id)
        ],
        excluded=[
            ExcludedUpdate(
                update_id=row.id, client_id=row.client_id, reason=row.exclusion_reason or ""
            )
            for row in excluded
        ],
        report=round_.report if device_id is None else None,
        privacy=None
        if policy is None
        else round_privacy(session=session, round_=round_, policy=policy, device_id=device_id),
    )
