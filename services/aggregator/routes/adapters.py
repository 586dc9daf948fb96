"""Published adapters and their versions, with presigned download URLs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status

from services.aggregator import crud
from services.aggregator.views import adapter_download, version_out
from tessera.federation import personal_adapter_name
from tessera.models import Adapter, AdapterKind, AdapterVersion, Role
from tessera.schemas import AdapterDownload, AdapterOut, RowId
from tessera.service.auth import GeneratorDep, Principal, PrincipalDep
from tessera.service.deps import SessionDep, SettingsDep, StoreDep

router = APIRouter(tags=["adapters"])

AdapterName = Annotated[
    str,
    Path(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9:._-]*$",
        description="global, cluster:N or personal:N",
    ),
]
"""An adapter name in a path: a malformed one is a 422 before any database sees it."""


def _check_readable(principal: Principal, adapter: Adapter) -> None:
    """A device reads the global and cluster adapters, and its own personal one only."""
    if (
        principal.role == Role.DEVICE
        and adapter.kind == AdapterKind.PERSONAL
        and adapter.name != personal_adapter_name(principal.client_id or 0)
    ):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, detail="a device can only read its own personal adapter"
        )


def _download(
    found: tuple[Adapter, AdapterVersion] | None,
    missing: str,
    principal: Principal,
    store: StoreDep,
    settings: SettingsDep,
) -> AdapterDownload:
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=missing)
    _check_readable(principal, found[0])
    return adapter_download(*found, store=store, expires_s=settings.presign_expiry_s)


@router.get("/v1/adapters", summary="Every adapter with its latest version")
def list_adapters(_reader: GeneratorDep, session: SessionDep) -> list[AdapterOut]:
    return [
        AdapterOut(
            name=adapter.name,
            kind=adapter.kind,
            cluster_label=adapter.cluster_label,
            client_id=adapter.client_id,
            versions=versions,
            latest=None if latest is None else version_out(adapter, latest),
        )
        for adapter, latest, versions in crud.list_adapters(session=session)
    ]


@router.get(
    "/v1/adapters/{name}/versions/latest",
    summary="The latest version of an adapter, with a download URL",
    responses={404: {"description": "no such adapter, or nothing published yet"}},
)
def latest_adapter_version(
    name: AdapterName,
    principal: PrincipalDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
) -> AdapterDownload:
    return _download(
        crud.latest_version(session=session, name=name),
        "no such adapter, or no version of it is published yet",
        principal,
        store,
        settings,
    )


@router.get(
    "/v1/adapter-versions/{version_id}",
    summary="One adapter version, with a download URL",
    responses={404: {"description": "no such version"}},
)
def get_adapter_version(
    version_id: RowId,
    principal: PrincipalDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
) -> AdapterDownload:
    return _download(
        crud.get_version(session=session, version_id=version_id),
        "no such adapter version",
        principal,
        store,
        settings,
    )
