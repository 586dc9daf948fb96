"""Enrolment of devices, operators and generation clients; token rotation; disabling; removal
with everything the client left (`removal`)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from sqlalchemy.exc import IntegrityError

from services.aggregator import crud
from services.aggregator.removal import remove_client
from tessera.models import Client, Role
from tessera.schemas import (
    ClientCreate,
    ClientOut,
    ClientPatch,
    ClientRemoved,
    ClientWithToken,
    RowId,
)
from tessera.service.auth import OperatorDep, PrincipalDep
from tessera.service.deps import SessionDep, SettingsDep, StoreDep

router = APIRouter(prefix="/v1/clients", tags=["clients"])


def _get_client(session: SessionDep, client_id: int) -> Client:
    client = session.get(Client, client_id)
    if client is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such client")
    return client


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Enrol a client and return its token (shown once)",
    responses={409: {"description": "the name is taken"}},
)
def enrol_client(
    body: ClientCreate, _operator: OperatorDep, session: SessionDep, settings: SettingsDep
) -> ClientWithToken:
    try:
        client, token = crud.create_client(
            session=session,
            name=body.name,
            role=body.role,
            token_secret=settings.token_secret.get_secret_value(),
        )
        session.commit()
    except (crud.NameTakenError, IntegrityError) as error:
        session.rollback()
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail="another client already has this name"
        ) from error
    return ClientWithToken(**ClientOut.model_validate(client).model_dump(), token=token)


@router.get("", summary="List clients")
def list_clients(
    _operator: OperatorDep, session: SessionDep, role: Role | None = None
) -> list[ClientOut]:
    return [ClientOut.model_validate(c) for c in crud.list_clients(session=session, role=role)]


@router.get("/me", summary="The calling client")
def whoami(principal: PrincipalDep, session: SessionDep) -> ClientOut:
    if principal.client_id is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail="the bootstrap operator token is not an enrolled client",
        )
    return ClientOut.model_validate(_get_client(session, principal.client_id))


@router.get("/{client_id}", summary="One client")
def get_client(client_id: RowId, _operator: OperatorDep, session: SessionDep) -> ClientOut:
    return ClientOut.model_validate(_get_client(session, client_id))


@router.patch("/{client_id}", summary="Disable or re-enable a client")
def patch_client(
    client_id: RowId, body: ClientPatch, _operator: OperatorDep, session: SessionDep
) -> ClientOut:
    client = crud.set_disabled(
        session=session, client=_get_client(session, client_id), disabled=body.disabled
    )
    session.commit()
    return ClientOut.model_validate(client)


@router.post("/{client_id}/token", summary="Rotate a client's token (the new one is shown once)")
def rotate_client_token(
    client_id: RowId, _operator: OperatorDep, session: SessionDep, settings: SettingsDep
) -> ClientWithToken:
    client = _get_client(session, client_id)
    token = crud.rotate_token(
        session=session, client=client, token_secret=settings.token_secret.get_secret_value()
    )
    session.commit()
    return ClientWithToken(**ClientOut.model_validate(client).model_dump(), token=token)


@router.delete(
    "/{client_id}",
    summary="Remove a client with its task vectors, updates, assignments, adapters and jobs",
    description="Its rows and its objects in the store are deleted; what it contributed to "
    "adapters already published stays in them. On a 503 the client is left disabled: retry.",
    responses={
        404: {"description": "no such client"},
        503: {"description": "the object store is unavailable; the client is disabled, retry"},
    },
)
def remove(
    client_id: RowId, _operator: OperatorDep, session: SessionDep, store: StoreDep
) -> ClientRemoved:
    return remove_client(session=session, store=store, client=_get_client(session, client_id))
