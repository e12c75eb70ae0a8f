"""The web page in a real browser: headless Chromium (Debian's) driven by Playwright.

Needs /usr/bin/chromium (`apt-get install -y chromium chromium-driver`); skipped without it.
"""

from __future__ import annotations

import os
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


# Screenshots of each state of the page land here, to be looked at (not compared pixel by pixel:
# fonts differ between machines).
SCREENSHOTS = Path(os.environ.get("IMAGE_CLASSIFIER_SCREENSHOTS", "build/screenshots"))


def screenshot(page: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 5_000  # a rendered page, not an empty canvas
    return path


@pytest.fixture(scope="module")
def sure_gateway_url(live_gateway: Any) -> Iterator[str]:
    """A gateway that never calls an answer unsure (threshold 0), for the plain-result states."""
    with live_gateway(low_confidence_threshold=0.0) as url:
        yield url


@pytest.fixture(scope="module")
def unsure_gateway_url(live_gateway: Any) -> Iterator[str]:
    """A gateway that calls every answer below 99.9% unsure."""
    with live_gateway(low_confidence_threshold=0.999) as url:
        yield url


@pytest.fixture
def page(browser: Any, sure_gateway_url: str) -> Iterator[Any]:
    with offline(browser, sure_gateway_url) as page:
        page.goto(sure_gateway_url + "/")
        expect(page.locator("[data-testid=model-line]")).to_contain_text("v1")
        yield page


def _api_predictions(url: str, picture: tuple[str, bytes, str]) -> list[dict[str, Any]]:
    response = httpx.post(f"{url}/predict-image?top_k=10", files={"file": picture}, trust_env=False)
    response.raise_for_status()
    predictions: list[dict[str, Any]] = response.json()["predictions"]
    return predictions


def _write(tmp_path: Path, picture: tuple[str, bytes, str]) -> str:
    path = tmp_path / picture[0]
    path.write_bytes(picture[1])
    return str(path)


def test_idle_page_invites_a_picture_and_names_the_model(page: Any) -> None:
    expect(page.locator("[data-testid=drop-zone]")).to_contain_text("Choose pictures")
    assert page.locator("[data-testid=result]").count() == 0
    assert page.locator("#controls").is_hidden()
    screenshot(page, "1-idle")


def test_choosing_a_picture_shows_it_and_its_top_classes(
    page: Any, sure_gateway_url: str, gateway_pictures: Pictures, tmp_path: Path
) -> None:
    picture = gateway_pictures["scene"]

    page.set_input_files("[data-testid=file-input]", _write(tmp_path, picture))
    card = page.locator("[data-testid=result]")
    expect(card).to_have_attribute("data-state", "done")

    expected = _api_predictions(sure_gateway_url, picture)
    assert card.locator("[data-testid=top-label]").text_content() == expected[0]["label"]
    rows = card.locator("[data-testid=predictions] li")
    assert rows.count() == 3
    assert [rows.nth(i).get_attribute("data-label") for i in range(3)] == [
        p["label"] for p in expected[:3]
    ]
    bar_widths = [
        float(rows.nth(i).locator(".bar > span").evaluate("e => parseFloat(e.style.width)"))
        for i in range(3)
    ]
    assert bar_widths == sorted(bar_widths, reverse=True)
    assert all(0 < width <= 100 for width in bar_widths)
    assert card.locator("img.thumb").get_attribute("src").startswith("blob:")
    # The model version and the time the answer took.
    assert re.fullmatch(r"Model v1 · \d+ ms", card.locator("[data-testid=meta]").text_content())
    assert card.locator("[data-testid=unsure]").count() == 0
    assert card.locator("[data-testid=error]").count() == 0
    screenshot(page, "2-one-result")

    # The selector changes how many classes are shown, without asking the server again.
    page.select_option("#topk", "5")
    expect(card.locator("[data-testid=predictions] li")).to_have_count(5)


def test_several_pictures_get_a_card_each_in_order(
    page: Any, sure_gateway_url: str, gateway_pictures: Pictures, tmp_path: Path
) -> None:
    pictures = [gateway_pictures[name] for name in ("scene", "png", "webp", "gray", "rgba")]

    page.set_input_files("[data-testid=file-input]", [_write(tmp_path, p) for p in pictures])
    cards = page.locator("[data-testid=result]")
    expect(cards).to_have_count(5)
    for i in range(5):
        expect(cards.nth(i)).to_have_attribute("data-state", "done")

    for i, picture in enumerate(pictures):
        assert cards.nth(i).locator(".name").text_content() == picture[0]
        label = cards.nth(i).locator("[data-testid=top-label]").text_content()
        assert label == _api_predictions(sure_gateway_url, picture)[0]["label"]
    screenshot(page, "3-several-results")

    # One removed with its own button, then all cleared.
    cards.nth(1).get_by_role("button", name=f"Remove {pictures[1][0]}").click()
    expect(cards).to_have_count(4)
    page.get_by_test_id("clear").click()
    expect(cards).to_have_count(0)


def test_dropping_a_picture_classifies_it(
    page: Any, sure_gateway_url: str, gateway_pictures: Pictures
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
    label = page.locator("[data-testid=top-label]")
    expect(label).to_have_text(re.compile(r"\w"))

    expected = _api_predictions(sure_gateway_url, (name, data, mime))[0]["label"]
    assert label.text_content() == expected


@pytest.mark.parametrize(
    ("filename", "content", "words"),
    [
        ("notes.txt", b"just some text", "not an image file"),
        ("broken.png", b"\x89PNG\r\n\x1a\nnot really", "could not be read as a picture"),
    ],
)
def test_bad_files_get_an_error_card_with_only_the_message(
    page: Any, tmp_path: Path, filename: str, content: bytes, words: str
) -> None:
    path = tmp_path / filename
    path.write_bytes(content)

    page.set_input_files("[data-testid=file-input]", str(path))
    card = page.locator("[data-testid=result]")
    expect(card).to_have_attribute("data-state", "error")

    assert words in card.locator("[data-testid=error]").text_content()
    # No broken picture, no predictions, no stray class selector.
    assert card.locator("img").count() == 0
    assert card.locator("[data-testid=predictions], [data-testid=top-label]").count() == 0
    assert page.locator("#topk").is_hidden()
    if filename == "broken.png":
        screenshot(page, "4-error")


def test_a_good_and_a_bad_file_together_each_get_their_own_card(
    page: Any, gateway_pictures: Pictures, tmp_path: Path
) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_bytes(b"text")

    page.set_input_files(
        "[data-testid=file-input]", [_write(tmp_path, gateway_pictures["png"]), str(bad)]
    )
    cards = page.locator("[data-testid=result]")
    expect(cards.nth(0)).to_have_attribute("data-state", "done")
    expect(cards.nth(1)).to_have_attribute("data-state", "error")


def test_an_unsure_answer_says_so_and_shows_the_runners_up(
    browser: Any, unsure_gateway_url: str, gateway_pictures: Pictures, tmp_path: Path
) -> None:
    picture = gateway_pictures["scene"]
    with offline(browser, unsure_gateway_url) as page:
        page.goto(unsure_gateway_url + "/")
        expect(page.locator("[data-testid=model-line]")).to_contain_text("v1")
        page.set_input_files("[data-testid=file-input]", _write(tmp_path, picture))
        card = page.locator("[data-testid=result]")
        expect(card).to_have_attribute("data-state", "done")
        page.select_option("#topk", "1")

        assert card.get_attribute("data-confidence") == "low"
        note = card.locator("[data-testid=unsure]").text_content()
        top = _api_predictions(unsure_gateway_url, picture)[0]
        assert "not sure" in note
        assert f"{top['probability'] * 100:.1f}%" in note or top["probability"] < 0.1
        # Even with "show 1 class", an unsure answer lists the runners-up.
        assert card.locator("[data-testid=predictions] li").count() == 3
        screenshot(page, "5-low-confidence")


def test_the_page_works_from_the_keyboard(page: Any) -> None:
    # Listening before any key is pressed turns Playwright's file-chooser interception on first;
    # expect_file_chooser() turns it on while the key press races it (a flaky test, not page).
    choosers: list[Any] = []
    page.on("filechooser", lambda chooser: choosers.append(chooser))
    # Tab reaches the picker first; Enter and Space open the file chooser.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "file"
    for key in ("Enter", " "):
        before = len(choosers)
        page.keyboard.press(key)
        for _ in range(50):
            if len(choosers) > before:
                break
            page.wait_for_timeout(100)
        assert len(choosers) == before + 1, f"{key!r} did not open the file chooser"
        assert choosers[-1].is_multiple()


def test_the_page_reads_the_threshold_from_model(sure_gateway_url: str) -> None:
    info = httpx.get(f"{sure_gateway_url}/model", trust_env=False).json()
    assert info["low_confidence_threshold"] == 0.0
    assert info["version"] == "1"


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
