"""The console's Generate page: a mix of published adapters, a plaintext prompt that the
inference service encodes (only where TESSERA_ALLOW_PLAINTEXT_PROMPTS allows it), the job
followed live, its images fetched through the console."""

from __future__ import annotations

import hashlib
import hmac
import re
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


CONSOLE_CLIENT = "console"


def _console_token(settings: Settings) -> str:
    """The token of the console's own generation client: derived from the token secret, the
    same in every aggregator replica, never shown or sent anywhere but the inference API."""
    secret = settings.token_secret.get_secret_value().encode()
    return hmac.new(secret, b"tessera-console:generator", hashlib.sha256).hexdigest()


def console_client_auth(*, session: Session, settings: Settings) -> dict[str, str]:
    """Headers of the console's generation client (enrolled on first use): the bootstrap
    operator cannot own generation jobs, and a signed-in operator's own token is not kept."""
    token = _console_token(settings)
    token_hash = hash_token(token, secret=settings.token_secret.get_secret_value())
    client = session.scalar(select(Client).where(Client.name == CONSOLE_CLIENT))
    if client is None:
        session.add(Client(name=CONSOLE_CLIENT, role=Role.GENERATOR, token_hash=token_hash))
        try:
            session.commit()
        except IntegrityError:  # another request (or replica) enrolled it first: the same token
            session.rollback()
        return {"Authorization": f"Bearer {token}"}
    if client.role != Role.GENERATOR or client.disabled:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"the client {CONSOLE_CLIENT!r} is a disabled or non-generator client: "
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


@router.post("/generate")
async def generate(
    request: Request,
    operator: CsrfOperatorDep,
    session: SessionDep,
    settings: SettingsDep,
    inference: InferenceHttpDep,
) -> Response:
    """Queue the job on the inference API (and, to compare, each parent of a hybrid alone with
    the same seed); a refusal is shown as it came."""
    form = await request.form()
    try:
        mix = [
            {"adapter": key.removeprefix("weight:"), "weight": float(str(value))}
            for key, value in form.items()
            if key.startswith("weight:") and float(str(value) or 0) > 0
        ]
        steps, seed = int(str(form.get("steps") or 20)), int(str(form.get("seed") or 0))
    except ValueError:
        message = "weights, steps and seed must be numbers"
        return _page(request, operator, session, settings, error=message, status_code=422)
    mixes = [mix]
    if form.get("compare") and len(mix) >= 2:
        mixes += [[{"adapter": part["adapter"], "weight": 1.0}] for part in mix]
    prompt = str(form.get("prompt", "")).strip() or None
    try:
        headers = console_client_auth(session=session, settings=settings)
    except HTTPException as error:
        return _page(request, operator, session, settings, error=str(error.detail), status_code=409)
    job_ids = []
    for adapters in mixes:
        body = {"prompt": prompt, "adapters": adapters, "steps": steps, "seed": seed}
        try:
            response = inference.post("/v1/generations", json=body, headers=headers)
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
        job_ids.append(response.json()["id"])
    return RedirectResponse(
        f"/console/generate/{','.join(job_ids)}", status_code=status.HTTP_303_SEE_OTHER
    )


def _job(
    job_id: str, session: Session, settings: Settings, inference: httpx.Client
) -> dict[str, Any]:
    if not JOB_ID.match(job_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such job")
    headers = console_client_auth(session=session, settings=settings)
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
    jobs = [_job(job_id, session, settings, inference) for job_id in ids]
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
    job = _job(job_id, session, settings, inference)
    images = (job.get("result") or {}).get("images", [])
    url = next((image["url"] for image in images if image["index"] == index), None)
    if url is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such image (yet)")
    fetched = httpx.get(url, timeout=INFERENCE_TIMEOUT_S)
    fetched.raise_for_status()
    return Response(fetched.content, media_type="image/png")
