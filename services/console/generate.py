"""The console's Generate page: a mix of published adapters, a plaintext prompt that the
inference service encodes (only where TESSERA_ALLOW_PLAINTEXT_PROMPTS allows it), the job
followed live, its images fetched through the console."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.aggregator import crud
from services.console.auth import CsrfOperatorDep, OperatorSessionDep
from services.console.routes import _api_detail, _render
from tessera.config import Settings
from tessera.models import Client, Role
from tessera.service.deps import SessionDep, SettingsDep
from tessera.tokens import hash_token

router = APIRouter(prefix="/console", include_in_schema=False)
INFERENCE_TIMEOUT_S = 10.0
JOB_ID = re.compile(r"^[0-9a-f-]{36}$")
MAX_COMPARED = 9


def make_inference_http(settings: Settings) -> httpx.Client:
    """The console's client for the inference API (requests carry the operator token)."""
    return httpx.Client(base_url=settings.inference_url, timeout=INFERENCE_TIMEOUT_S)


def get_inference_http(request: Request) -> httpx.Client:
    client: httpx.Client = request.app.state.console_inference_http
    return client


InferenceHttpDep = Annotated[httpx.Client, Depends(get_inference_http)]


CONSOLE_CLIENT = "console"  # the operator's generations
GALLERY_CLIENT = "console-gallery"  # the gallery's, so that it never takes the operator's slots
_TOKEN_PURPOSES = {
    CONSOLE_CLIENT: b"tessera-console:generator",
    GALLERY_CLIENT: b"tessera-console:gallery",
}


def _console_token(settings: Settings, name: str) -> str:
    """The token of one of the console's own generation clients: derived from the token secret,
    the same in every aggregator replica, never shown or sent anywhere but the inference API."""
    secret = settings.token_secret.get_secret_value().encode()
    return hmac.new(secret, _TOKEN_PURPOSES[name], hashlib.sha256).hexdigest()


def console_client_auth(
    *, session: Session, settings: Settings, name: str = CONSOLE_CLIENT
) -> dict[str, str]:
    """Headers of the console's generation client `name` (enrolled on first use): the bootstrap
    operator cannot own generation jobs, and a signed-in operator's own token is not kept."""
    token = _console_token(settings, name)
    token_hash = hash_token(token, secret=settings.token_secret.get_secret_value())
    client = session.scalar(select(Client).where(Client.name == name))
    if client is None:
        session.add(Client(name=name, role=Role.GENERATOR, token_hash=token_hash))
        try:
            session.commit()
        except IntegrityError:  # another request (or replica) enrolled it first: the same token
            session.rollback()
        return {"Authorization": f"Bearer {token}"}
    if client.role != Role.GENERATOR or client.disabled:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"the client {name!r} is a disabled or non-generator client: "
            "the console generates as an enabled generator of that name",
        )
    elif client.token_hash != token_hash:  # the token secret was rotated
        client.token_hash = token_hash
        session.commit()
    return {"Authorization": f"Bearer {token}"}


def _page(
    request: Request,
    operator: Any,
    session: SessionDep,
    settings: Settings,
    *,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    adapters = [
        (adapter, version)
        for adapter, version, _count in crud.list_adapters(session=session)
        if version is not None
    ]
    return _render(
        request,
        "generate.html",
        operator,
        status_code=status_code,
        adapters=adapters,
        plaintext=settings.allow_plaintext_prompts,
        error=error,
    )


@router.get("/generate")
def generate_page(
    request: Request, operator: OperatorSessionDep, session: SessionDep, settings: SettingsDep
) -> Response:
    return _page(request, operator, session, settings)


def _request(form: Mapping[str, Any]) -> dict[str, Any]:
    """The inference API's request body from the form (ValueError: a field is not a number).
    Ranges are the API's to check, so that its refusal is shown as it gives it."""
    body: dict[str, Any] = {
        "prompt": str(form.get("prompt", "")).strip() or None,
        "steps": int(str(form.get("steps") or 20)),
        "seed": int(str(form.get("seed") or 0)),
        "guidance": float(str(form.get("guidance") or 3.0)),
    }
    if form.get("mix") == "auto":
        body["adapters"] = "auto"
        body["top_k"] = int(str(form.get("top_k") or 2))
        body["temperature"] = float(str(form.get("temperature") or 0.1))
        return body
    body["adapters"] = [
        {"adapter": key.removeprefix("weight:"), "weight": float(str(value))}
        for key, value in form.items()
        if key.startswith("weight:") and float(str(value) or 0) > 0
    ]
    return body


@router.post("/generate")
async def generate(
    request: Request,
    operator: CsrfOperatorDep,
    session: SessionDep,
    settings: SettingsDep,
    inference: InferenceHttpDep,
) -> Response:
    """Queue the job on the inference API and, to compare a hybrid with its parents, each
    adapter it resolved to (an explicit mix's, or those `auto` routed to) alone at weight 1
    with the same seed; a refusal is shown as it came."""
    form = await request.form()
    try:
        body = _request(form)
    except ValueError:
        message = "weights, steps, seed, guidance, top k and temperature must be numbers"
        return _page(request, operator, session, settings, error=message, status_code=422)
    try:
        headers = console_client_auth(session=session, settings=settings)
    except HTTPException as error:
        return _page(request, operator, session, settings, error=str(error.detail), status_code=409)
    mixes: list[Any] = [body["adapters"]]
    job_ids: list[str] = []
    while len(job_ids) < len(mixes):
        try:
            response = inference.post(
                "/v1/generations", json={**body, "adapters": mixes[len(job_ids)]}, headers=headers
            )
        except httpx.HTTPError as error:
            url, kind = settings.inference_url, type(error).__name__
            message = f"the inference service at {url} did not answer ({kind})"
            return _page(request, operator, session, settings, error=message, status_code=502)
        if not response.is_success:
            return _page(
                request,
                operator,
                session,
                settings,
                error=_api_detail(response),
                status_code=response.status_code,
            )
        job = response.json()
        job_ids.append(job["id"])
        if form.get("compare") and len(job_ids) == 1 and len(job["adapters"]) >= 2:
            mixes += [[{"adapter": a["version_id"], "weight": 1.0}] for a in job["adapters"]]
    return RedirectResponse(
        f"/console/generate/{','.join(job_ids)}", status_code=status.HTTP_303_SEE_OTHER
    )


def fetch_job(
    job_id: str,
    session: Session,
    settings: Settings,
    inference: httpx.Client,
    *,
    client: str = CONSOLE_CLIENT,
) -> dict[str, Any]:
    """The job as the inference API shows it to the console's client `client`."""
    if not JOB_ID.match(job_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such job")
    headers = console_client_auth(session=session, settings=settings, name=client)
    try:
        response = inference.get(f"/v1/generations/{job_id}", headers=headers)
    except httpx.HTTPError as error:
        raise HTTPException(
            status.HTTP_502_BAD_GATEWAY, detail=f"the inference service did not answer ({error})"
        ) from error
    if not response.is_success:
        raise HTTPException(response.status_code, detail=_api_detail(response))
    job: dict[str, Any] = response.json()
    return job


@router.get("/generate/{job_ids}")
def job_page(
    request: Request,
    job_ids: str,
    operator: OperatorSessionDep,
    session: SessionDep,
    settings: SettingsDep,
    inference: InferenceHttpDep,
) -> Response:
    """One job, or a hybrid and its parents side by side (ids joined by commas)."""
    ids = job_ids.split(",")[:MAX_COMPARED]
    jobs = [fetch_job(job_id, session, settings, inference) for job_id in ids]
    live = any(job["state"] in ("queued", "running") for job in jobs)
    return _render(request, "job.html", operator, jobs=jobs, live=live, path_ids=job_ids)


@router.get("/generate/{job_id}/image/{index}")
def job_image(
    job_id: str,
    index: int,
    _operator: OperatorSessionDep,
    session: SessionDep,
    settings: SettingsDep,
    inference: InferenceHttpDep,
) -> Response:
    """The image through the console, so the page loads nothing from another origin."""
    return image_of(fetch_job(job_id, session, settings, inference), index)


def image_of(job: dict[str, Any], index: int) -> Response:
    """The job's image `index`, fetched from its presigned URL (404 before it exists)."""
    images = (job.get("result") or {}).get("images", [])
    url = next((image["url"] for image in images if image["index"] == index), None)
    if url is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such image (yet)")
    fetched = httpx.get(url, timeout=INFERENCE_TIMEOUT_S)
    fetched.raise_for_status()
    return Response(fetched.content, media_type="image/png")
