"""The HTTP status of each clustering domain error, so routes map them in one place."""

from __future__ import annotations

from fastapi import HTTPException, status

from services.clustering import crud, jobs

_STATUS: dict[type[crud.ClusteringStateError], int] = {
    crud.NothingToClusterError: status.HTTP_409_CONFLICT,
    crud.UnknownClientError: status.HTTP_404_NOT_FOUND,
    crud.NotADeviceError: status.HTTP_409_CONFLICT,
    crud.NoTaskVectorsError: status.HTTP_404_NOT_FOUND,
    crud.NoClusteringError: status.HTTP_404_NOT_FOUND,
    crud.MixedDimensionsError: status.HTTP_409_CONFLICT,
    crud.ClusteringOptionsError: status.HTTP_422_UNPROCESSABLE_CONTENT,
    jobs.ActiveJobError: status.HTTP_409_CONFLICT,
    jobs.NoSuchJobError: status.HTTP_404_NOT_FOUND,
}


def http_error(error: crud.ClusteringStateError) -> HTTPException:
    """The HTTPException for a domain error, its message as the detail."""
    return HTTPException(_STATUS.get(type(error), status.HTTP_409_CONFLICT), detail=str(error))


def concurrent_write() -> HTTPException:
    """A unique constraint hit because another request wrote the same row first."""
    return HTTPException(
        status.HTTP_409_CONFLICT,
        detail="another request changed the clustering at the same time: retry",
    )
