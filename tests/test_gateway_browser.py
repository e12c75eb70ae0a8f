"""The web page in a real browser: headless Chromium (Debian's) driven by Playwright.

Needs /usr/bin/chromium (`apt-get install -y chromium chromium-driver`); skipped without it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's headless Chromium at /usr/bin/chromium "
        "(apt-get install -y chromium chromium-driver)",
    ),
]

Pictures = dict[str, tuple[str, bytes, str]]


def expect(target: Any) -> Any:
    # Playwright's auto-retrying assertions poll through its own script runner, so they work
    # under the page's Content-Security-Policy (no 'unsafe-eval'), unlike wait_for_function.
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


@contextmanager
def offline(browser: Any, origin: str) -> Iterator[Any]:
    """A page with the network off: only ``origin`` answers; any request leaving it is
    refused, recorded and fails the test."""
    context = browser.new_context()
    page = context.new_page()
    foreign: list[str] = []

    def only_same_origin(route: Any) -> None:
        if route.request.url.startswith(origin):
            route.continue_()
        else:
            foreign.append(route.request.url)
            route.abort()

    page.route("**/*", only_same_origin)
    yield page
    context.close()
    assert foreign == []  # nothing was fetched from elsewhere (a CDN, say)


@pytest.fixture
def page(browser: Any, gateway_live_url: str) -> Iterator[Any]:
    with offline(browser, gateway_live_url) as page:
        page.goto(gateway_live_url + "/")
        yield page


def _api_top_label(url: str, picture: tuple[str, bytes, str]) -> str:
    response = httpx.post(f"{url}/predict-image", files={"file": picture}, trust_env=False)
    response.raise_for_status()
    return response.json()["predictions"][0]["label"]


def test_choosing_a_picture_shows_it_and_its_top_classes(
    page: Any, gateway_live_url: str, gateway_pictures: Pictures, tmp_path: Path
) -> None:
    picture = gateway_pictures["scene"]
    path = tmp_path / picture[0]
    path.write_bytes(picture[1])

    page.set_input_files("[data-testid=file-input]", str(path))
    label = page.locator("[data-testid=top-label]")
    expect(label).to_have_text(re.compile(r"\w"))

    assert label.text_content() == _api_top_label(gateway_live_url, picture)
    rows = page.locator("[data-testid=predictions] li")
    assert rows.count() == 3
    bar_widths = [
        float(rows.nth(i).locator(".bar > span").evaluate("e => parseFloat(e.style.width)"))
        for i in range(3)
    ]
    assert bar_widths == sorted(bar_widths, reverse=True)
    assert all(0 < width <= 100 for width in bar_widths)
    assert page.locator("#preview").get_attribute("src").startswith("blob:")
    assert not page.locator("[data-testid=error]").is_visible()


def test_dropping_a_picture_classifies_it(
    page: Any, gateway_live_url: str, gateway_pictures: Pictures
) -> None:
    name, data, mime = gateway_pictures["png"]
    transfer = page.evaluate_handle(
        """([bytes, name, mime]) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([new Uint8Array(bytes)], name, {type: mime}));
            return transfer;
        }""",
        [list(data), name, mime],
    )

    page.dispatch_event("[data-testid=drop-zone]", "drop", {"dataTransfer": transfer})
    expect(page.locator("[data-testid=top-label]")).to_have_text(re.compile(r"\w"))

    expected = _api_top_label(gateway_live_url, (name, data, mime))
    assert page.locator("[data-testid=top-label]").text_content() == expected


@pytest.mark.parametrize(
    ("filename", "content", "words"),
    [
        ("notes.txt", b"just some text", "not an image file"),
        ("broken.png", b"\x89PNG\r\n\x1a\nnot really", "could not be read as a picture"),
    ],
)
def test_bad_files_are_explained_in_words(
    page: Any, tmp_path: Path, filename: str, content: bytes, words: str
) -> None:
    path = tmp_path / filename
    path.write_bytes(content)

    page.set_input_files("[data-testid=file-input]", str(path))
    error = page.locator("[data-testid=error]")
    expect(error).to_be_visible()

    assert words in error.text_content()
    assert page.locator("[data-testid=top-label]").text_content() == ""


@pytest.fixture
def offline_page(browser: Any, gateway_live_url: str) -> Iterator[Any]:
    with offline(browser, gateway_live_url) as page:
        yield page


def test_swagger_ui_renders_the_operations_offline(
    offline_page: Any, gateway_live_url: str
) -> None:
    offline_page.goto(gateway_live_url + "/docs")

    expect(offline_page.locator(".opblock-summary-path").first).to_be_visible(timeout=20_000)
    paths = offline_page.locator(".opblock-summary-path").all_inner_texts()
    assert {"/predict-image", "/predict-images", "/predict", "/ready"} <= {
        p.strip().replace("\u200b", "") for p in paths
    }


def test_redoc_renders_the_operations_offline(offline_page: Any, gateway_live_url: str) -> None:
    offline_page.goto(gateway_live_url + "/redoc")

    heading = offline_page.locator("h2", has_text="Classify one uploaded image")
    expect(heading).to_be_visible(timeout=20_000)
    assert offline_page.locator("h2", has_text="Readiness").count() == 1
