"""Routing: an encoded prompt's weights over the current clusters."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from services.clustering import crud
from services.clustering.routes.errors import http_error
from services.clustering.schemas import ClusterWeight, RouteOut, RouteRequest
from tessera.service.auth import RouterDep
from tessera.service.deps import SessionDep

router = APIRouter(prefix="/v1/route", tags=["routing"])


@router.post(
    "",
    summary="Cluster weights for a prompt vector: softmax of cosine / temperature over the top-k",
    responses={
        404: {"description": "no clustering yet"},
        422: {"description": "the vector is not finite, unit-norm or as wide as the centroids"},
    },
)
def route_prompt(body: RouteRequest, _caller: RouterDep, session: SessionDep) -> RouteOut:
    try:
        clustering, weights = crud.route_vector(
            session=session, vector=body.vector, temperature=body.temperature, top_k=body.top_k
        )
    except crud.ClusteringStateError as error:
        raise http_error(error) from error
    except ValueError as error:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(error)) from error
    return RouteOut(
        clustering_version=clustering.version,
        weights=[ClusterWeight(label=label, weight=weight) for label, weight in weights],
    )
