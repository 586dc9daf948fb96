"""The Generate page against the real inference API (in-process; no inference worker runs)."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.orm import Session

from tessera.config import Settings
from tessera.model.encoder import task_encoder_info
from tessera.models import AdapterKind, GenerationJob, JobState
from tessera.storage import ObjectStore
from tests.helpers import on_redis_db
from tests.services.aggregator.factories import publish
from tests.services.console.conftest import (
    CONSOLE_QUEUE_DB,
    console_over_inference,
    sign_in,
    signed_in_csrf,
)
from tests.services.console.factories import federation


@pytest.fixture
def plaintext_console(settings: Settings) -> Iterator[TestClient]:
    own = on_redis_db(settings, CONSOLE_QUEUE_DB).model_copy(
        update={"allow_plaintext_prompts": True}
    )
    yield from console_over_inference(own)


@pytest.fixture
def encoded_only_console(settings: Settings) -> Iterator[TestClient]:
    yield from console_over_inference(on_redis_db(settings, CONSOLE_QUEUE_DB))


def test_generate_queues_a_job_and_follows_it(
    plaintext_console: TestClient, operator_token: str
) -> None:
    sign_in(plaintext_console, operator_token)
    csrf = signed_in_csrf(plaintext_console)
    page = plaintext_console.get("/console/generate").text

    refused = plaintext_console.post(
        "/console/generate", data={"csrf": csrf, "prompt": "a red square", "steps": "500"}
    )
    queued = plaintext_console.post(
        "/console/generate",
        data={"csrf": csrf, "prompt": "a red square", "steps": "4", "seed": "7"},
        follow_redirects=False,
    )
    job_page = plaintext_console.get(queued.headers["location"])

    assert "encodes it on the server" in page and "No adapter published yet" in page
    assert refused.status_code == 422 and "steps" in refused.text and 'role="alert"' in refused.text
    assert queued.status_code == 303
    assert re.fullmatch(r"/console/generate/[0-9a-f-]{36}", queued.headers["location"])
    assert '<span class="state queued" data-job-state>queued</span>' in job_page.text
    assert "Step 0 of 4" in job_page.text and "Seed 7" in job_page.text
    assert 'hx-trigger="every 1s"' in job_page.text  # followed live until it ends


def test_generate_says_when_plaintext_prompts_are_off(
    encoded_only_console: TestClient, operator_token: str
) -> None:
    sign_in(encoded_only_console, operator_token)
    csrf = signed_in_csrf(encoded_only_console)
    page = encoded_only_console.get("/console/generate").text
    forced = encoded_only_console.post(
        "/console/generate", data={"csrf": csrf, "prompt": "a red square"}
    )

    assert "Plaintext prompts are off" in page and "TESSERA_ALLOW_PLAINTEXT_PROMPTS" in page
    assert forced.status_code == 422  # the inference API's own refusal, shown as it came
    assert "plaintext" in forced.text.lower() and 'role="alert"' in forced.text


def test_a_finished_jobs_image_comes_through_the_console(
    plaintext_console: TestClient, operator_token: str, session: Session, store: ObjectStore
) -> None:
    sign_in(plaintext_console, operator_token)
    csrf = signed_in_csrf(plaintext_console)
    queued = plaintext_console.post(
        "/console/generate",
        data={"csrf": csrf, "prompt": "a red square", "steps": "4"},
        follow_redirects=False,
    )
    job_id = queued.headers["location"].rsplit("/", 1)[1]
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(png, format="PNG")
    stored = store.put_bytes(f"generations/{job_id}/0.png", png.getvalue())
    job = session.get(GenerationJob, job_id)
    assert job is not None
    job.state, job.result = JobState.SUCCEEDED, {"images": [stored.key]}  # as the worker does
    job.progress_step = job.total_steps
    session.commit()

    page = plaintext_console.get(f"/console/generate/{job_id}").text
    image = plaintext_console.get(f"/console/generate/{job_id}/image/0")
    missing = plaintext_console.get(f"/console/generate/{job_id}/image/1")

    assert f'src="/console/generate/{job_id}/image/0"' in page
    assert 'hx-trigger="every 1s"' not in page  # a finished job is no longer polled
    assert image.status_code == 200 and image.content == png.getvalue()
    assert image.headers["content-type"] == "image/png"
    assert missing.status_code == 404


def test_a_hybrid_is_queued_beside_its_parents_with_the_same_seed(
    plaintext_console: TestClient, operator_token: str, session: Session, store: ObjectStore
) -> None:
    for label in (0, 1):
        publish(session, store, f"cluster:{label}", b"bytes", kind=AdapterKind.CLUSTER)
    sign_in(plaintext_console, operator_token)
    csrf = signed_in_csrf(plaintext_console)
    form = {"csrf": csrf, "prompt": "a red square", "steps": "4", "seed": "3"}

    page = plaintext_console.get("/console/generate").text
    bad = plaintext_console.post("/console/generate", data={**form, "weight:cluster:0": "x"})
    queued = plaintext_console.post(
        "/console/generate",
        data={**form, "weight:cluster:0": "0.5", "weight:cluster:1": "0.5", "compare": "1"},
        follow_redirects=False,
    )
    compared = plaintext_console.get(queued.headers["location"]).text

    assert 'name="weight:cluster:0" type="range"' in page
    assert bad.status_code == 422 and "must be numbers" in bad.text
    assert queued.headers["location"].count(",") == 2
    titles = re.findall(r'<h2 id="h-job-\d">(.*?)</h2>', compared)
    assert titles == [
        "cluster:0 v1 \u00d7 0.5 + cluster:1 v1 \u00d7 0.5",
        "cluster:0 v1 \u00d7 1.0",
        "cluster:1 v1 \u00d7 1.0",
    ]
    assert compared.count("Seed 3,") == 3


def test_auto_routes_the_prompt_and_queues_its_clusters_beside_it(
    plaintext_console: TestClient,
    operator_token: str,
    session: Session,
    store: ObjectStore,
    settings: Settings,
) -> None:
    width = task_encoder_info(settings.task_encoder).width
    federation(plaintext_console, operator_token, session, groups=3, per_group=2, dim=width)
    for label in (0, 1, 2):
        publish(session, store, f"cluster:{label}", b"bytes", kind=AdapterKind.CLUSTER)
    sign_in(plaintext_console, operator_token)
    csrf = signed_in_csrf(plaintext_console)
    form = {"csrf": csrf, "prompt": "a red square", "steps": "4", "seed": "5", "mix": "auto"}

    too_strong = plaintext_console.post("/console/generate", data={**form, "guidance": "50"})
    queued = plaintext_console.post(
        "/console/generate",
        data={**form, "guidance": "5", "top_k": "2", "compare": "1"},
        follow_redirects=False,
    )
    page = plaintext_console.get(queued.headers["location"]).text

    assert too_strong.status_code == 422 and "guidance" in too_strong.text
    assert queued.status_code == 303 and queued.headers["location"].count(",") == 2
    assert "auto: routed by clustering v1 to cluster" in page
    titles = re.findall(r'<h2 id="h-job-\d">(.*?)</h2>', page)
    assert titles[0].count(" + ") == 1  # the two nearest clusters, blended
    assert [t.split(" \u00d7 ")[0] for t in titles[1:]] == [
        part.split(" \u00d7 ")[0] for part in titles[0].split(" + ")
    ]
    assert page.count("Seed 5, 4 steps, guidance 5.0") == 3
