"""Turning a requested mix into pinned adapter versions, explicitly or by routing the prompt.

A job is pinned at submit time: it records the version id of every adapter it blends, so it
runs on exactly those versions whatever is published while it waits or runs. Weights are
rounded to WEIGHT_DECIMALS places, here and in the adapter cache's keys: mixes that differ by
less are one mix (one batch, one cached merge), and no float noise can make a cache miss.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import httpx
from sqlalchemy.orm import Session

from services.inference import crud
from tessera.config import Settings
from tessera.federation import GLOBAL_ADAPTER, cluster_adapter_name
from tessera.service.auth import service_headers
from tessera.tokens import ServiceScope

log = logging.getLogger(__name__)

NORM_TOLERANCE = 1e-3
WEIGHT_DECIMALS = 2


def quantise_weight(weight: float) -> float:
    """A mix weight rounded to WEIGHT_DECIMALS places (the nearest float to that decimal)."""
    return round(float(weight), WEIGHT_DECIMALS)


@dataclass(frozen=True)
class PinnedAdapter:
    """An adapter of a job's mix: the name asked for, the version resolved, its weight."""

    adapter: str
    version: int
    version_id: int
    weight: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PinnedAdapter:
        return cls(
            adapter=str(data["adapter"]),
            version=int(data["version"]),
            version_id=int(data["version_id"]),
            weight=float(data["weight"]),
        )


class MixError(Exception):
    """A mix that cannot be pinned; `status` is the HTTP status the API answers with."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def pin_explicit(
    *, session: Session, requested: Sequence[tuple[str, float]]
) -> list[PinnedAdapter]:
    """Each (name or version id, weight) pinned to a version; MixError(422) names an unknown one."""
    pinned = []
    for index, (ref, weight) in enumerate(requested):
        found = crud.find_version(session=session, ref=ref)
        if found is None:
            what = "version has this id" if ref.isdigit() else "adapter has this name"
            raise MixError(422, f"adapters[{index}] is unknown: no published {what}")
        name, version = found
        pinned.append(PinnedAdapter(name, version.version, version.id, quantise_weight(weight)))
    ids = [p.version_id for p in pinned]
    if len(set(ids)) != len(ids):
        raise MixError(422, "the mix names the same adapter version twice")
    if pinned and not any(p.weight > 0 for p in pinned):
        raise MixError(
            422,
            f"every adapter weight rounds to 0 (weights are rounded to {WEIGHT_DECIMALS} "
            "decimal places): give at least one a weight of 0.005 or more",
        )
    return pinned


def check_pooled(pooled: Sequence[float] | None, width: int) -> list[float]:
    """The pooled vector "auto" routing needs: present, as wide as the encoder, unit norm."""
    if pooled is None:
        raise MixError(422, 'adapters "auto" needs `pooled`: the prompt\'s pooled vector')
    if len(pooled) != width:
        raise MixError(422, f"pooled has {len(pooled)} values; the encoder gives {width}")
    norm = math.sqrt(math.fsum(v * v for v in pooled))
    if abs(norm - 1.0) > NORM_TOLERANCE:
        raise MixError(
            422,
            f"pooled is not L2-normalised: send a vector of norm 1 (within {NORM_TOLERANCE:g})",
        )
    return list(pooled)


def route(
    http: httpx.Client, settings: Settings, *, pooled: list[float], top_k: int, temperature: float
) -> tuple[int, list[tuple[int, float]]]:
    """(clustering version, [(cluster label, weight)]) from the clustering service."""
    try:
        response = http.post(
            "/v1/route",
            json={"vector": pooled, "top_k": top_k, "temperature": temperature},
            headers=service_headers(settings, ServiceScope.ROUTE),
        )
    except httpx.HTTPError as error:
        log.warning("clustering service unreachable", extra={"error": type(error).__name__})
        raise MixError(
            503, "the clustering service is unreachable; retry, or name adapters"
        ) from None
    if response.status_code == 404:
        raise MixError(409, 'adapters "auto" needs a clustering, and none exists yet')
    if response.status_code == 422:
        raise MixError(422, f"the clustering service refused the vector: {_detail(response)}")
    if not response.is_success:
        raise MixError(503, f"the clustering service answered {response.status_code}")
    body = response.json()
    weights = [(int(w["label"]), float(w["weight"])) for w in body["weights"]]
    return int(body["clustering_version"]), weights


def pin_routed(
    *, session: Session, weights: Sequence[tuple[int, float]]
) -> tuple[list[PinnedAdapter], list[int]]:
    """The routed clusters' latest adapters, weights renormalised over those that have one.

    Returns the pins and the labels left out for lack of a published adapter. With none left,
    the global adapter alone; MixError(409) when there is no adapter at all.
    """
    found = []
    missing = []
    for label, weight in weights:
        version = crud.latest_version(session=session, name=cluster_adapter_name(label))
        if version is None:
            missing.append(label)
        else:
            found.append((cluster_adapter_name(label), version, weight))
    total = sum(weight for *_, weight in found)
    if found and total > 0:
        pins = [PinnedAdapter(n, v.version, v.id, quantise_weight(w / total)) for n, v, w in found]
        if any(p.weight > 0 for p in pins):
            return pins, missing
    fallback = crud.latest_version(session=session, name=GLOBAL_ADAPTER)
    if fallback is None:
        raise MixError(
            409, 'adapters "auto": no adapter is published yet for the routed clusters nor global'
        )
    return [PinnedAdapter(GLOBAL_ADAPTER, fallback.version, fallback.id, 1.0)], missing


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    return str(detail)[:300] if detail else response.text[:300]
