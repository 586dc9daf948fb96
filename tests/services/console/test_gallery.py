"""The Gallery against the real inference API (in-process; its jobs queue where no worker
listens): drawn once per adapter version, after the page is sent, and kept."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.console.gallery import CACHE_PREFIX, PROMPTS
from tessera.config import Settings
from tessera.models import AdapterKind, GenerationJob, JobState
from tessera.storage import ObjectStore
from tests.helpers import on_redis_db
from tests.services.aggregator.factories import publish
from tests.services.console.conftest import CONSOLE_QUEUE_DB, console_over_inference, sign_in


@pytest.fixture
def store(store: ObjectStore) -> ObjectStore:
    """The session's store without earlier tests' gallery records."""
    for key in store.list_keys(CACHE_PREFIX):
        store.delete(key)
    return store


@pytest.fixture
def gallery(settings: Settings, store: ObjectStore) -> Iterator[TestClient]:
    own = on_redis_db(settings, CONSOLE_QUEUE_DB).model_copy(
        update={"allow_plaintext_prompts": True}
    )
    yield from console_over_inference(own)


def _jobs(session: Session) -> int:
    session.expire_all()
    return session.scalar(select(func.count()).select_from(GenerationJob)) or 0


def test_each_version_is_drawn_once_beside_the_one_before(
    gallery: TestClient,
    operator_token: str,
    session: Session,
    store: ObjectStore,
    settings: Settings,
) -> None:
    sign_in(gallery, operator_token)
    empty = gallery.get("/console/gallery").text
    publish(session, store, "cluster:0", b"bytes", kind=AdapterKind.CLUSTER, cluster_label=0)

    first = gallery.get("/console/gallery").text  # queues the drawings after it is sent
    after_first = _jobs(session)
    second = gallery.get("/console/gallery").text
    after_second = _jobs(session)
    publish(session, store, "cluster:0", b"other bytes", kind=AdapterKind.CLUSTER, cluster_label=0)
    third = gallery.get("/console/gallery").text
    fourth = gallery.get("/console/gallery").text
    after_fourth = _jobs(session)

    assert "No adapter published yet" in empty
    assert first.count("Queued for drawing") == 2 * len(PROMPTS)
    assert "Before: the base model alone" in first and "Latest: cluster:0 v1" in first
    assert after_first == 2 * len(PROMPTS)  # the base model and cluster:0 v1
    assert "Queued for drawing" not in second and second.count('class="state queued"') == 6
    assert 'hx-trigger="every 2s"' in second  # polled until the images are there
    assert after_second == after_first  # kept: never drawn twice
    assert "Before: cluster:0 v1" in third and "Latest: cluster:0 v2" in third
    # v2's drawings wait for room under the gallery client's cap of queued jobs, never
    # in the way of the operator's own generations (another client).
    cap = settings.generation_jobs_per_client
    assert after_fourth == cap and fourth.count("Queued for drawing") == after_first + 3 - cap


def test_a_drawn_image_is_shown_and_polling_slows_down(
    gallery: TestClient, operator_token: str, session: Session, store: ObjectStore
) -> None:
    sign_in(gallery, operator_token)
    publish(session, store, "global", b"bytes", kind=AdapterKind.GLOBAL)
    gallery.get("/console/gallery")
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(png, format="PNG")
    for job in session.scalars(select(GenerationJob)):  # as the inference worker finishes them
        stored = store.put_bytes(f"generations/{job.id}/0.png", png.getvalue())
        job.state, job.result = JobState.SUCCEEDED, {"images": [stored.key]}
        job.progress_step = job.total_steps
    session.commit()

    page = gallery.get("/console/gallery").text

    assert page.count("data-gallery-image") == 2 * len(PROMPTS)
    assert f'alt="global v1: {PROMPTS[0]}"' in page
    # Drawn: polled now and then only, for the versions the next round publishes.
    assert 'hx-trigger="every 30s"' in page.split('id="live"')[1].split(">")[0]


def test_without_plaintext_prompts_nothing_is_drawn_and_the_page_says_why(
    settings: Settings, operator_token: str, session: Session, store: ObjectStore
) -> None:
    for console in console_over_inference(on_redis_db(settings, CONSOLE_QUEUE_DB)):
        sign_in(console, operator_token)
        publish(session, store, "cluster:1", b"bytes", kind=AdapterKind.CLUSTER, cluster_label=1)
        page = console.get("/console/gallery").text

    assert "TESSERA_ALLOW_PLAINTEXT_PROMPTS=false" in page
    assert "Not drawn (plaintext prompts are off)" in page
    assert _jobs(session) == 0
