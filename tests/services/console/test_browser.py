"""The console in headless Chromium (Debian's package, driven by Playwright) over a real stack:
the aggregator, clustering and inference APIs served by uvicorn, the session's aggregation
worker (a process) and an inference worker, on the test backends.

With CONSOLE_SCREENSHOT_DIR set, the screenshots of every page and the page load times measured
in the browser are written there too (docs/console/ comes from such a run).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from sqlalchemy.orm import Session

from services.aggregator.main import create_app
from services.clustering.main import create_app as create_clustering_app
from services.inference.api.main import create_app as create_inference_app
from tessera import db
from tessera.config import Settings
from tessera.events import INFERENCE_QUEUE
from tessera.lora import LoraSpec, adapter_to_bytes, random_adapter
from tessera.model.base import BaseModel
from tessera.model.encoder import task_encoder_info
from tessera.queue import make_celery
from tessera.storage import ObjectStore
from tests.helpers import bearer, enrol
from tests.services.console.factories import Federation, federation
from tests.services.inference.helpers import inference_worker
from tests.serving import served

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
SCREENSHOT_DIR = os.environ.get("CONSOLE_SCREENSHOT_DIR")
GROUPS, PER_GROUP = 3, 2  # a small federation: 6 devices in 3 well-separated groups
NARROW = 390  # pixels: a phone's width
PAGES = [
    ("Overview", "/console/"),
    ("Rounds", "/console/rounds"),
    ("Clusters", "/console/clusters"),
    ("Adapters", "/console/adapters"),
    ("Generate", "/console/generate"),
    ("Gallery", "/console/gallery"),
]
WAIT_MS = 300_000  # the longest wait for a worker's result (a busy shared 2-core machine)

# Every control must be labelled: by a <label>, aria-label, or (buttons) its text.
UNLABELLED = """() => [...document.querySelectorAll(
    'input:not([type=hidden]), select, textarea, button')].filter(e =>
    !(e.labels && e.labels.length) && !e.getAttribute('aria-label') &&
    !(e.tagName === 'BUTTON' && e.textContent.trim())).map(e => e.outerHTML)"""


@dataclass
class ConsoleStack:
    url: str
    settings: Settings
    federation: Federation
    generator_token: str
    spec: LoraSpec


@pytest.fixture
def console_stack(
    settings: Settings,
    session: Session,
    store: ObjectStore,
    base_model: BaseModel,
    worker: None,
) -> Iterator[ConsoleStack]:
    """Clustering, inference (plaintext prompts allowed, as the console's Generate needs) and
    the aggregator with the console, each served over HTTP and told the others' URLs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on shared cores, more threads make the small UNet far slower
    own = settings.model_copy(update={"allow_plaintext_prompts": True})
    engine = db.create_db_engine(own.resolved_database_url)
    with (
        _generations_for_this_worker_only(own),
        served(create_clustering_app(own)) as clustering_url,
    ):
        own = own.model_copy(update={"clustering_url": clustering_url})
        with served(create_inference_app(own)) as inference_url:
            own = own.model_copy(update={"inference_url": inference_url})
            with (
                served(create_app(own)) as url,
                inference_worker(own, base_model, db.session_factory(engine), store),
                httpx.Client(base_url=url, timeout=30) as api,
            ):
                token = own.operator_token.get_secret_value()
                # Task vectors as wide as the task encoder's, so that `auto` routes among them.
                width = task_encoder_info(own.task_encoder).width
                made = federation(
                    api, token, session, groups=GROUPS, per_group=PER_GROUP, dim=width
                )
                generator = enrol(api, token, "a-generation-client", role="generator")["token"]
                yield ConsoleStack(url, own, made, generator, base_model.lora_spec)
    engine.dispose()
    torch.set_num_threads(threads)


@contextmanager
def _generations_for_this_worker_only(settings: Settings) -> Iterator[None]:
    """The session's worker process consumes the inference queue as well (so that /readyz finds
    a worker of it) but cannot run generations: a job's message it takes is dropped as an
    unregistered task, and the job waits for the stalled-jobs loop to send it again after
    TESSERA_TASK_STALE_S. While this stack runs, that worker leaves the inference queue to the
    stack's inference worker."""
    app = make_celery(settings)
    try:
        left = app.control.cancel_consumer(INFERENCE_QUEUE, reply=True, timeout=10)
        assert left, "the session's worker did not answer"
        yield
    finally:
        app.control.add_consumer(INFERENCE_QUEUE, reply=True, timeout=10)
        app.close()


@pytest.fixture
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (make browser does)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


def _load_ms(page: Any) -> float:
    """Navigation start to the load event of the page shown, as the browser measured it."""
    entry = page.evaluate("() => performance.getEntriesByType('navigation')[0].toJSON()")
    return float(entry["loadEventEnd"] - entry["startTime"])


def _safetensors_keys(data: bytes) -> list[str]:
    (length,) = struct.unpack("<Q", data[:8])
    return [key for key in json.loads(data[8 : 8 + length]) if key != "__metadata__"]


class Visit:
    """The browser tab, with what every page must satisfy and what the run records."""

    def __init__(self, page: Any, folders: list[Path]) -> None:
        self.page = page
        self.folders = folders
        self.load_ms: dict[str, float] = {}

    def arrive(self, link: str, path: str, *, timed_as: str | None = None) -> None:
        """Follow the navigation link `link`; the page loaded, timed (as `timed_as`, by default
        the link's name), every control labelled."""
        self.page.get_by_role("link", name=link, exact=True).click()
        self.page.wait_for_url(f"**{path}")
        self.page.wait_for_load_state("load")
        self.load_ms[timed_as or link.lower()] = _load_ms(self.page)
        assert self.page.evaluate(UNLABELLED) == [], f"unlabelled controls on {path}"

    def shot(self, name: str) -> None:
        for folder in self.folders:
            folder.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(folder / name), full_page=True)


@pytest.mark.timeout(1200)  # a whole federation round, 6 generations and 15 gallery drawings
# (2 minutes on this shared 2-core machine at load 4.6; the limit leaves room for a busy CI)
def test_an_operator_runs_a_round_and_a_hybrid_from_the_console(
    console_stack: ConsoleStack, browser: Any, tmp_path: Path
) -> None:
    stack = console_stack
    operator_token = stack.settings.operator_token.get_secret_value()
    devices = stack.federation.devices
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    visit = Visit(page, [tmp_path, *([Path(SCREENSHOT_DIR)] if SCREENSHOT_DIR else [])])
    token_box = page.get_by_label("Operator token")

    # Only an operator enters: a wrong token, a device's and a generation client's are refused.
    page.goto(f"{stack.url}/console/")
    assert page.url.endswith("/console/signin")
    for wrong, said in (
        (operator_token + "x", "this token is not valid"),
        (devices[0][1]["token"], "this token belongs to a device"),
        (stack.generator_token, "this token belongs to a generator"),
    ):
        token_box.fill(wrong)
        page.get_by_role("button", name="Sign in").click()
        assert said in page.get_by_role("alert").inner_text()
        assert page.url.endswith("/console/signin")
    assert page.evaluate(UNLABELLED) == [], "unlabelled controls on the sign-in page"
    visit.shot("signin.png")

    # Keyboard only: Enter in the token field signs in; the first Tab reaches the skip link.
    token_box.fill(operator_token)
    token_box.press("Enter")
    page.wait_for_url("**/console/")
    visit.load_ms["overview"] = _load_ms(page)
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.textContent") == "Skip to content"
    assert page.locator("#devices-enrolled").inner_text() == str(GROUPS * PER_GROUP)
    assert page.get_by_text("No round yet:").is_visible()
    page.locator("#services table").wait_for()  # loaded by htmx after the page
    assert page.locator("#services tbody tr").count() == 3
    visit.shot("overview.png")

    # The map shows the clustering the federation made: three clusters and their centroids.
    visit.arrive("Clusters", "/console/clusters")
    page.wait_for_function("() => document.querySelector('#cluster-map').dataset.drawn === 'true'")
    datasets = page.evaluate("() => Chart.getChart('cluster-map').data.datasets.map(d => d.label)")
    assert datasets == ["cluster 0", "cluster 1", "cluster 2", "centroids"]
    assert page.locator("#cluster-count").inner_text() == str(GROUPS)
    box = page.locator("canvas#cluster-map").bounding_box()
    assert box is not None and box["width"] > 600 and box["height"] > 300
    assert "first clustering: labels 0, 1, 2" in page.locator("#history-table").inner_text()
    visit.shot("clusters.png")

    # Open a round; the devices upload; the page (never reloaded) sees it close and publish.
    visit.arrive("Rounds", "/console/rounds")
    page.get_by_label("Rank").fill("4")
    page.get_by_label("Quorum: updates in all").fill(str(len(devices)))
    page.get_by_label("Deadline (seconds, empty: none)").fill("900")
    page.get_by_role("button", name="Open round").click()
    page.wait_for_url("**/console/rounds")
    row = page.locator("#rounds-table tbody tr").first
    assert row.locator("td").nth(1).inner_text() == "collecting"
    assert "in 1" in page.locator("[data-deadline]").inner_text()  # the countdown ticks
    page.get_by_role("button", name="Open round").click()  # the API's 409, shown as it came
    assert "close or cancel it" in page.get_by_role("alert").inner_text()
    round_id = int(page.locator("form[action$='/close']").get_attribute("action").split("/")[-2])
    with httpx.Client(base_url=stack.url, timeout=30) as api:
        for seed, (_group, device) in enumerate(devices):
            adapter = random_adapter(stack.spec, 4, 4.0, seed=seed, std=0.05)
            sent = api.put(
                f"/v1/rounds/{round_id}/updates/{device['id']}",
                content=adapter_to_bytes(adapter),
                params={"num_samples": 8},
                headers={**bearer(device["token"]), "Content-Type": "application/octet-stream"},
            )
            assert sent.is_success, sent.text
    published = page.locator("#rounds-table tbody tr").first.locator("td").nth(1)
    published.filter(has_text="published").wait_for(timeout=WAIT_MS)
    timings = page.locator("#rounds-table tbody tr").first.locator("td.timings").inner_text()
    assert "collected" in timings and "aggregated and published" in timings
    assert all(f"cluster {label}:" in timings for label in range(GROUPS))
    assert page.locator(".report-table tbody tr").count() == GROUPS
    visit.shot("rounds.png")

    # Each cluster's adapter and the global one, with the lineage and an export to diffusers.
    visit.arrive("Adapters", "/console/adapters")
    assert page.locator("#versions-table tbody tr").count() == GROUPS + 1
    with page.expect_download() as download:
        page.get_by_role("link", name="Export cluster:0 v1 for diffusers").click()
    exported = Path(download.value.path()).read_bytes()
    assert download.value.suggested_filename == "cluster-0-v1.diffusers.safetensors"
    assert all(key.startswith("unet.") for key in _safetensors_keys(exported))
    visit.shot("adapters.png")

    # A hybrid of two clusters beside each of them alone, same seed, followed live.
    visit.arrive("Generate", "/console/generate")
    assert "encodes it on the server" in page.locator("main").inner_text()
    page.get_by_label("Prompt", exact=True).fill("a red circle")
    page.get_by_label("Steps", exact=True).fill("8")
    page.get_by_label("Seed", exact=True).fill("3")
    for name in ("cluster:0", "cluster:1"):
        slider = page.get_by_label(f"{name} (v1) weight")
        slider.focus()
        for _ in range(10):  # by keyboard: 10 steps of 0.05
            page.keyboard.press("ArrowRight")
        assert slider.input_value() == "0.5"
    visit.shot("generate.png")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_url("**/console/generate/*")
    assert page.locator("#live[hx-get]").count() == 1  # polled while the jobs run
    titles = page.locator("h2[id^=h-job]").all_inner_texts()
    assert titles == [
        "cluster:0 v1 \u00d7 0.5 + cluster:1 v1 \u00d7 0.5",
        "cluster:0 v1 \u00d7 1.0",
        "cluster:1 v1 \u00d7 1.0",
    ]
    _wait_for_images(page, "img.generated", 3)
    assert page.get_by_text("Seed 3, 8 steps").count() == 3
    visit.shot("generate-hybrid.png")

    # `auto`: the clustering service routes the prompt; the parents come from its routing.
    page.get_by_role("link", name="Another generation").click()
    page.get_by_label("Prompt", exact=True).fill("a blue square")
    page.get_by_label("Steps", exact=True).fill("4")
    page.get_by_label("auto: the clustering service routes").check()
    page.get_by_role("button", name="Generate").click()
    page.wait_for_url("**/console/generate/*")
    assert "auto: routed by clustering v1 to cluster" in page.locator(".routing").inner_text()
    jobs = page.locator("h2[id^=h-job]").count()
    assert jobs >= 2  # the routed blend, each cluster alone
    page.locator("#live:not([hx-get])").wait_for(timeout=WAIT_MS)  # polled until all end
    assert page.locator("[data-job-state]").all_inner_texts() == ["succeeded"] * jobs
    _wait_for_images(page, "img.generated", jobs)
    visit.shot("generate-auto.png")

    # The gallery draws each adapter's version beside the base model, without blocking.
    visit.arrive("Gallery", "/console/gallery")
    assert page.locator("main section").count() == GROUPS + 1
    _wait_for_images(page, "img[data-gallery-image]", (GROUPS + 1) * 2 * 3)
    visit.shot("gallery.png")

    # A phone's narrow window: no page is wider than the window (wide tables scroll in their
    # own box), and the map follows the width.
    page.set_viewport_size({"width": NARROW, "height": 844})
    for link, path in PAGES:
        visit.arrive(link, path, timed_as=f"{link.lower()} ({NARROW} px)")
        width = page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= NARROW, f"{path} is {width} px wide in a {NARROW} px window"
        if link == "Clusters":
            page.wait_for_function(
                f"() => document.querySelector('#cluster-map').clientWidth <= {NARROW}"
            )
        visit.shot(f"{link.lower()}-narrow.png")
    page.set_viewport_size({"width": 1280, "height": 800})

    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/console/signin")
    page.goto(f"{stack.url}/console/rounds")
    assert page.url.endswith("/console/signin")

    assert errors == []
    assert all(url.startswith(stack.url) for url in requests), "a request left the stack"
    assert all(operator_token not in url for url in requests)
    times = {name: round(ms) for name, ms in visit.load_ms.items()}
    print("console page load times (ms):", times)
    for folder in visit.folders:
        (folder / "load_times.json").write_text(json.dumps(times, indent=2) + "\n")


def _wait_for_images(page: Any, selector: str, count: int) -> None:
    """Until `count` images matching `selector` are on the page and decoded (htmx swaps them in)."""
    page.wait_for_function(
        """([selector, count]) => {
            const images = [...document.querySelectorAll(selector)];
            return images.length === count && images.every(i => i.complete && i.naturalWidth > 0);
        }""",
        arg=[selector, count],
        timeout=WAIT_MS,
    )
