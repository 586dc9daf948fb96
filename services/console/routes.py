"""The console's pages: sign-in, overview, rounds, clusters. Actions reuse the API's handlers,
so a refusal shows the same 4xx message the API gives."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Form, HTTPException, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from services.aggregator import crud
from services.aggregator.privacy import Policy
from services.aggregator.routes import rounds as rounds_api
from services.aggregator.views import round_out
from services.clustering.jobs import recent_jobs
from services.console import views
from services.console.auth import CsrfOperatorDep, OperatorSessionDep
from services.console.session import (
    COOKIE_NAME,
    SESSION_LIFETIME_S,
    SIGNIN_COOKIE_NAME,
    SIGNIN_LIFETIME_S,
    ConsoleSession,
    csrf_token,
    encode_session,
    new_session,
    new_signin_nonce,
)
from tessera.federation import RoundConfig
from tessera.models import Role, RoundState, utcnow
from tessera.service.auth import Principal, principal_for_token
from tessera.service.deps import (
    CeleryDep,
    ClusteringHttpDep,
    ResourcesDep,
    SessionDep,
    SettingsDep,
)
from tessera.service.resources import Resources

log = logging.getLogger(__name__)

router = APIRouter(prefix="/console", include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
PEER_READY_TIMEOUT_S = 1.0


def _render(
    request: Request,
    template: str,
    operator: ConsoleSession | None,
    *,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    secret = request.app.state.resources.settings.token_secret.get_secret_value()
    return templates.TemplateResponse(
        request,
        template,
        {
            "operator": operator,
            "csrf": None if operator is None else csrf_token(operator.sid, token_secret=secret),
            "path": request.url.path,
            **context,
        },
        status_code=status_code,
    )


def _principal(operator: ConsoleSession) -> Principal:
    return Principal(client_id=operator.client_id, name=operator.name, role=Role.OPERATOR)


def _cookie_secure(request: Request) -> bool:
    """Whether the console's cookies are Secure: as TESSERA_CONSOLE_SECURE_COOKIE says, else
    when the request came over HTTPS (uvicorn takes the scheme from X-Forwarded-Proto only
    from a proxy in its FORWARDED_ALLOW_IPS)."""
    setting = request.app.state.resources.settings.console_secure_cookie
    return request.url.scheme == "https" if setting is None else setting


# --- sign-in ---------------------------------------------------------------------------------


def _signin_page(request: Request, *, error: str | None = None, status_code: int = 200) -> Response:
    nonce = new_signin_nonce()
    response = _render(
        request, "signin.html", None, status_code=status_code, nonce=nonce, error=error
    )
    response.set_cookie(
        SIGNIN_COOKIE_NAME,
        nonce,
        max_age=SIGNIN_LIFETIME_S,
        path="/console",
        httponly=True,
        samesite="strict",
        secure=_cookie_secure(request),
    )
    return response


@router.get("/signin")
def signin_form(request: Request) -> Response:
    return _signin_page(request)


@router.post("/signin")
def signin(
    request: Request,
    settings: SettingsDep,
    session: SessionDep,
    token: Annotated[str, Form()] = "",
    csrf: Annotated[str, Form()] = "",
) -> Response:
    """Check the operator token once; from then on the signed session cookie stands for it."""
    nonce = request.cookies.get(SIGNIN_COOKIE_NAME)
    if not nonce or not csrf or nonce != csrf:
        return _signin_page(
            request,
            error="the sign-in form expired or came from elsewhere: sign in again",
            status_code=status.HTTP_403_FORBIDDEN,
        )
    try:
        principal = principal_for_token(settings=settings, session=session, token=token.strip())
    except HTTPException:
        return _signin_page(
            request,
            error="this token is not valid (unknown, or its client is disabled)",
            status_code=status.HTTP_401_UNAUTHORIZED,
        )
    if principal.role != Role.OPERATOR:
        holder = "a service" if principal.role is None else f"a {principal.role.value}"
        return _signin_page(
            request,
            error=f"the console is for operators; this token belongs to {holder}",
            status_code=status.HTTP_403_FORBIDDEN,
        )
    console_session = new_session(client_id=principal.client_id, name=principal.name)
    log.info("console sign-in", extra={"operator": principal.name})
    response = RedirectResponse("/console/", status_code=status.HTTP_303_SEE_OTHER)
    response.set_cookie(
        COOKIE_NAME,
        encode_session(console_session, token_secret=settings.token_secret.get_secret_value()),
        max_age=SESSION_LIFETIME_S,
        path="/console",
        httponly=True,
        samesite="strict",
        secure=_cookie_secure(request),
    )
    response.delete_cookie(
        SIGNIN_COOKIE_NAME,
        path="/console",
        httponly=True,
        samesite="strict",
        secure=_cookie_secure(request),
    )
    return response


@router.post("/signout")
def signout(request: Request, _operator: CsrfOperatorDep) -> Response:
    response = RedirectResponse("/console/signin", status_code=status.HTTP_303_SEE_OTHER)
    response.delete_cookie(
        COOKIE_NAME,
        path="/console",
        httponly=True,
        samesite="strict",
        secure=_cookie_secure(request),
    )
    return response


# --- overview --------------------------------------------------------------------------------


def _readiness(request: Request, resources: Resources) -> list[dict[str, str]]:
    """Each service and what its readiness probe says (the aggregator's checks in-process)."""
    results = request.app.state.readiness(resources)  # the aggregator's /readyz checks
    failed = [
        f"{name}: {value.split(':', 1)[0]}" for name, value in results.items() if value != "ok"
    ]
    rows = [
        {
            "name": "aggregator",
            "url": resources.settings.aggregator_url,
            "state": "ready" if not failed else "unready",
            "detail": "; ".join(failed) or f"{', '.join(results)} answer",
        }
    ]
    for name, url in (
        ("clustering", resources.settings.clustering_url),
        ("inference", resources.settings.inference_url),
    ):
        try:
            response = httpx.get(f"{url}/readyz", timeout=PEER_READY_TIMEOUT_S)
            checks = response.json().get("checks", {})
            bad = [f"{k}: {v}" for k, v in checks.items() if v != "ok"]
            state = "ready" if response.status_code == 200 else "unready"
            detail = "; ".join(bad)[:200] or ", ".join(checks) + " answer"
        except (httpx.HTTPError, ValueError) as error:
            state, detail = "down", f"unreachable ({type(error).__name__})"
        rows.append({"name": name, "url": url, "state": state, "detail": detail})
    return rows


@router.get("/services")
def services(request: Request, operator: OperatorSessionDep, resources: ResourcesDep) -> Response:
    """The readiness table, loaded by the overview after the page (a Celery ping can take 1 s)."""
    return _render(request, "_services.html", operator, services=_readiness(request, resources))


@router.get("/")
def overview(request: Request, operator: OperatorSessionDep, session: SessionDep) -> Response:
    latest = crud.latest_round(session=session)
    return _render(
        request,
        "overview.html",
        operator,
        devices=views.device_counts(session=session),
        clustering=views.cluster_map(session=session),
        current=None if latest is None else round_out(session=session, round_=latest),
        events=views.recent_events(session=session),
    )


# --- rounds ----------------------------------------------------------------------------------

ROUND_FIELDS = (
    "method",
    "scope",
    "rank",
    "min_updates",
    "min_updates_per_cluster",
    "deadline_s",
    "lam",
    "temperature",
    "weighting",
    "clip",
    "clip_norm",
    "robust",
    "robust_trim",
    "robust_f",
    "noise_multiplier",
)


def _rounds_page(
    request: Request,
    operator: ConsoleSession,
    session: SessionDep,
    *,
    error: str | None = None,
    status_code: int = 200,
    form: dict[str, str] | None = None,
) -> Response:
    policy = Policy.of(request.app.state.resources.settings)
    rows = [
        round_out(session=session, round_=r, policy=policy)
        for r in crud.list_rounds(session=session, limit=20)
    ]
    current = next((r for r in rows if r.state == RoundState.COLLECTING), None)
    return _render(
        request,
        "rounds.html",
        operator,
        status_code=status_code,
        rounds=rows,
        timings={r.id: views.round_timings(r) for r in rows},
        current=current,
        error=error,
        form=form or {},
        defaults=RoundConfig(),
        privacy_default=policy.noise_multiplier,
        now=utcnow(),
    )


@router.get("/rounds")
def rounds_page(request: Request, operator: OperatorSessionDep, session: SessionDep) -> Response:
    return _rounds_page(request, operator, session)


def _validation_message(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in error.errors()
    )


@router.post("/rounds")
async def open_round(
    request: Request,
    operator: CsrfOperatorDep,
    session: SessionDep,
    celery: CeleryDep,
    policy: rounds_api.PolicyDep,
) -> Response:
    form = await request.form()
    values = {k: str(form[k]).strip() for k in ROUND_FIELDS if k in form}
    try:
        config = RoundConfig.model_validate({k: v for k, v in values.items() if v != ""})
        rounds_api.open_round(config, _principal(operator), session, celery, policy)
    except ValidationError as error:
        return _rounds_page(
            request,
            operator,
            session,
            error=_validation_message(error),
            status_code=422,
            form=values,
        )
    except HTTPException as error:
        return _rounds_page(
            request,
            operator,
            session,
            error=str(error.detail),
            status_code=error.status_code,
            form=values,
        )
    return RedirectResponse("/console/rounds", status_code=status.HTTP_303_SEE_OTHER)


@router.post("/rounds/{round_id}/close")
def close_round(
    request: Request,
    round_id: int,
    operator: CsrfOperatorDep,
    session: SessionDep,
    celery: CeleryDep,
    policy: rounds_api.PolicyDep,
) -> Response:
    try:
        rounds_api.close(round_id, _principal(operator), session, celery, policy)
    except HTTPException as error:
        return _rounds_page(
            request, operator, session, error=str(error.detail), status_code=error.status_code
        )
    return RedirectResponse("/console/rounds", status_code=status.HTTP_303_SEE_OTHER)


@router.post("/rounds/{round_id}/cancel")
def cancel_round(
    request: Request,
    round_id: int,
    operator: CsrfOperatorDep,
    session: SessionDep,
    policy: rounds_api.PolicyDep,
) -> Response:
    try:
        rounds_api.cancel(round_id, _principal(operator), session, policy)
    except HTTPException as error:
        return _rounds_page(
            request, operator, session, error=str(error.detail), status_code=error.status_code
        )
    return RedirectResponse("/console/rounds", status_code=status.HTTP_303_SEE_OTHER)


# --- clusters --------------------------------------------------------------------------------


def _clusters_page(
    request: Request,
    operator: ConsoleSession,
    session: SessionDep,
    *,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    cluster_map = views.cluster_map(session=session)
    return _render(
        request,
        "clusters.html",
        operator,
        status_code=status_code,
        map=cluster_map,
        chart=None if cluster_map is None else cluster_map.chart_data(),
        history=views.clustering_history(session=session),
        jobs=recent_jobs(session=session, limit=5),
        error=error,
    )


@router.get("/clusters")
def clusters_page(request: Request, operator: OperatorSessionDep, session: SessionDep) -> Response:
    return _clusters_page(request, operator, session)


def _api_detail(response: httpx.Response) -> str:
    """The `detail` of an API's refusal, as it came (a 422's list of errors joined)."""
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        return f"{response.status_code} {response.reason_phrase}: {response.text[:300]}"
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
    return str(detail)


@router.post("/clusters")
def recluster(
    request: Request,
    operator: CsrfOperatorDep,
    session: SessionDep,
    settings: SettingsDep,
    clustering: ClusteringHttpDep,
    method: Annotated[str, Form()] = "kmeans",
    k: Annotated[str, Form()] = "",
) -> Response:
    """Ask the clustering service to queue a re-clustering (with the operator token); the
    page then shows the job's state until a worker has run it."""
    body: dict[str, Any] = {"method": method}
    if k.strip():
        body["k"] = k.strip()
    try:
        response = clustering.post(
            "/v1/clusterings",
            json=body,
            headers={"Authorization": f"Bearer {settings.operator_token.get_secret_value()}"},
        )
    except httpx.HTTPError as error:
        url, kind = settings.clustering_url, type(error).__name__
        message = f"the clustering service at {url} did not answer ({kind})"
        return _clusters_page(request, operator, session, error=message, status_code=502)
    if not response.is_success:
        return _clusters_page(
            request,
            operator,
            session,
            error=_api_detail(response),
            status_code=response.status_code,
        )
    log.info("console re-clustering", extra={"operator": operator.name})
    session.expire_all()
    return RedirectResponse("/console/clusters", status_code=status.HTTP_303_SEE_OTHER)
