"""Pydantic request and response models shared by the services, the SDK and the CLI."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints

from tessera.models import Role


class Strict(BaseModel):
    """Base for request bodies: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


ClientName = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]


class ClientCreate(Strict):
    name: ClientName
    role: Role = Role.DEVICE


class ClientPatch(Strict):
    disabled: bool


class ClientOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    role: Role
    created_at: datetime
    disabled: bool


class ClientWithToken(ClientOut):
    """Returned once, at enrolment or rotation: the token is not stored in clear anywhere."""

    token: str
