"""The console's Adapters page: every published version, its lineage, its file as stored and
exported to diffusers' or kohya's LoRA layout (the same exporter as `tessera adapter export`)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import Response

from services.aggregator import crud
from services.console import views
from services.console.auth import OperatorSessionDep
from services.console.routes import _render
from tessera.lora.interop import EXPORT_FORMATS, ExportFormat
from tessera.models import Adapter, AdapterVersion
from tessera.service.deps import SessionDep, StoreDep

router = APIRouter(prefix="/console", include_in_schema=False)


@router.get("/adapters")
def adapters_page(request: Request, operator: OperatorSessionDep, session: SessionDep) -> Response:
    return _render(
        request,
        "adapters.html",
        operator,
        versions=views.adapter_versions(session=session),
        formats=EXPORT_FORMATS,
    )


def _version_file(
    version_id: int, session: SessionDep, store: StoreDep
) -> tuple[Adapter, AdapterVersion, bytes]:
    """The version's rows and its file, checked against its sha256."""
    found = crud.get_version(session=session, version_id=version_id)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such adapter version")
    adapter, version = found
    return adapter, version, store.get_bytes(version.object_key, expected_sha256=version.sha256)


def _attachment(data: bytes, filename: str) -> Response:
    return Response(
        data,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


def _stem(adapter: Adapter, version: AdapterVersion) -> str:
    return f"{adapter.name.replace(':', '-')}-v{version.version}"


@router.get("/adapters/{version_id}/download")
def download_adapter(
    version_id: int, _operator: OperatorSessionDep, session: SessionDep, store: StoreDep
) -> Response:
    """The version's Tessera safetensors file, through the aggregator."""
    adapter, version, data = _version_file(version_id, session, store)
    return _attachment(data, f"{_stem(adapter, version)}.safetensors")


@router.get("/adapters/{version_id}/export/{fmt}")
def export_adapter_version(
    version_id: int, fmt: str, _operator: OperatorSessionDep, session: SessionDep, store: StoreDep
) -> Response:
    """The version as a diffusers or kohya LoRA file (fp16), which other tools load."""
    from tessera.lora import adapter_from_bytes
    from tessera.lora.interop import export_adapter

    if fmt not in EXPORT_FORMATS:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"no such export format; known formats: {', '.join(EXPORT_FORMATS)}",
        )
    chosen: ExportFormat = "diffusers" if fmt == "diffusers" else "kohya"
    adapter, version, data = _version_file(version_id, session, store)
    exported = export_adapter(adapter_from_bytes(data), chosen)
    return _attachment(exported, f"{_stem(adapter, version)}.{chosen}.safetensors")
