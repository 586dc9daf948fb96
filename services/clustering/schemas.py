"""Request and response models of the clustering API (the tables are in `tessera.models`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field

from services.clustering.algorithms import Method
from tessera.federation import Temperature
from tessera.schemas import FiniteFloat, RowId, Strict

MAX_VECTOR_DIM = 4096


class ClusteringCreate(Strict):
    """How to recluster; contradictions (hdbscan with k, ...) are refused by the algorithms."""

    method: Method = "kmeans"
    k: Annotated[int | None, Field(ge=1, le=64, description="None: chosen by silhouette")] = None
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    min_cluster_size: Annotated[int, Field(ge=2, le=1000, description="HDBSCAN's")] = 2
    distance_threshold: Annotated[
        float | None,
        Field(gt=0.0, le=2.0, allow_inf_nan=False, description="agglomerative: cosine distance"),
    ] = None


class ClusterOut(BaseModel):
    label: int
    size: int
    members: list[int] | None = Field(
        description="client ids assigned to the cluster: for operators only (null otherwise)"
    )


class ClusteringOut(BaseModel):
    id: int
    version: int
    algorithm: str
    params: dict[str, Any]
    metrics: dict[str, Any]
    clusters: list[ClusterOut]
    created_at: datetime


class ClusteringJobOut(BaseModel):
    """A re-clustering job: queued, running, succeeded (with its clustering) or failed (why)."""

    id: int
    state: str
    trigger: str = Field(description="operator, or drift (queued by the round loop)")
    params: dict[str, Any]
    base_version: int | None = Field(description="the current clustering when it was queued")
    clustering_version: int | None = Field(description="the version it made, once succeeded")
    error: str | None = Field(description="why it failed")
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class AssignmentCreate(Strict):
    client_id: RowId


class AssignmentOut(BaseModel):
    client_id: int
    clustering_version: int
    label: int
    similarity: float | None


class RouteRequest(Strict):
    """An encoded prompt: a pooled, L2-normalised vector as wide as the centroids."""

    vector: Annotated[list[FiniteFloat], Field(min_length=1, max_length=MAX_VECTOR_DIM)]
    temperature: Temperature = 0.1
    top_k: Annotated[int, Field(ge=1, le=64)] = 2


class ClusterWeight(BaseModel):
    label: int
    weight: float


class RouteOut(BaseModel):
    clustering_version: int
    weights: list[ClusterWeight] = Field(description="heaviest first, summing to 1")
