"""The console in headless Chromium (Debian's package, driven by Playwright) over a served stack."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import Session

from tests.services.console.conftest import ServedStack
from tests.services.console.factories import federation

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
# Where to also write the screenshots (the README's docs/console.png comes from such a run).
SCREENSHOT_DIR = os.environ.get("CONSOLE_SCREENSHOT_DIR")


@pytest.fixture
def browser() -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (make test-setup does)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


def _load_ms(page: object) -> float:
    entry = page.evaluate(  # type: ignore[attr-defined]
        "() => performance.getEntriesByType('navigation')[0].toJSON()"
    )
    return float(entry["loadEventEnd"] - entry["startTime"])


def _shot(page: object, tmp_path: Path, name: str) -> None:
    for folder in filter(None, [tmp_path, SCREENSHOT_DIR and Path(SCREENSHOT_DIR)]):
        assert isinstance(folder, Path)
        folder.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(folder / name), full_page=True)  # type: ignore[attr-defined]


def test_operator_signs_in_opens_a_round_and_sees_the_cluster_map(
    served_aggregator: ServedStack,
    operator_token: str,
    session: Session,
    browser: object,
    tmp_path: Path,
) -> None:
    with httpx.Client(base_url=served_aggregator.url, timeout=10) as api:
        federation(api, operator_token, session, groups=3, per_group=4)  # type: ignore[arg-type]
    context = browser.new_context(viewport={"width": 1280, "height": 800})  # type: ignore[attr-defined]
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    load_ms: dict[str, float] = {}

    page.goto(f"{served_aggregator.url}/console/")
    assert page.url.endswith("/console/signin")
    page.get_by_label("Operator token").fill(operator_token + "x")
    page.get_by_role("button", name="Sign in").click()
    assert "this token is not valid" in page.get_by_role("alert").inner_text()

    page.get_by_label("Operator token").fill(operator_token)
    page.get_by_label("Operator token").press("Enter")  # keyboard only
    page.wait_for_url("**/console/")
    load_ms["overview"] = _load_ms(page)
    assert page.locator("#devices-enrolled").inner_text() == "12"
    assert page.get_by_text("No round yet:").is_visible()
    page.locator("#services table").wait_for()  # loaded by htmx after the page
    assert page.locator("#services tbody tr").count() == 3
    _shot(page, tmp_path, "console.png")

    page.get_by_role("link", name="Rounds").click()
    page.wait_for_url("**/console/rounds")
    load_ms["rounds"] = _load_ms(page)
    page.get_by_label("Quorum: updates in all").fill("2")
    page.get_by_label("Deadline (seconds, empty: none)").fill("900")
    page.get_by_role("button", name="Open round").click()
    page.wait_for_url("**/console/rounds")
    row = page.locator("#rounds-table tbody tr").first
    assert row.locator("td").nth(0).inner_text() == "1"
    assert row.locator("td").nth(1).inner_text() == "collecting"
    assert "in 1" in page.locator("[data-deadline]").inner_text()  # the countdown ticks
    _shot(page, tmp_path, "console-rounds.png")
    page.get_by_role("button", name="Open round").click()
    assert "close or cancel it" in page.get_by_role("alert").inner_text()

    page.get_by_role("link", name="Clusters").click()
    page.wait_for_url("**/console/clusters")
    load_ms["clusters"] = _load_ms(page)
    canvas = page.locator("canvas#cluster-map")
    page.wait_for_function("() => document.querySelector('#cluster-map').dataset.drawn === 'true'")
    datasets = page.evaluate("() => Chart.getChart('cluster-map').data.datasets.map(d => d.label)")
    assert datasets == ["cluster 0", "cluster 1", "cluster 2", "centroids"]
    box = canvas.bounding_box()
    assert box is not None and box["width"] > 600 and box["height"] > 300
    _shot(page, tmp_path, "console-clusters.png")

    page.get_by_role("link", name="Adapters").click()
    page.wait_for_url("**/console/adapters")
    load_ms["adapters"] = _load_ms(page)
    assert page.get_by_text("No adapter published yet").is_visible()

    page.get_by_role("link", name="Clusters").click()
    page.wait_for_url("**/console/clusters")
    page.set_viewport_size({"width": 420, "height": 800})
    # Readable on a narrow window: the chart follows the width (Chart.js resizes on its own).
    page.wait_for_function("() => document.querySelector('#cluster-map').clientWidth <= 420")
    _shot(page, tmp_path, "console-clusters-narrow.png")
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/console/signin")

    assert errors == []
    assert all(url.startswith(served_aggregator.url) for url in requests), (
        "a request left the stack"
    )
    assert all(operator_token not in url for url in requests)
    print("console page load times (ms):", {k: round(v) for k, v in load_ms.items()})
