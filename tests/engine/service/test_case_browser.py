"""The case-study page of the service in a real headless Chromium (Debian's chromium and chromium-driver,
driven by selenium): it renders, every image loads, and a screenshot is saved in the test's output."""

import shutil
import threading
import time

import pytest
import uvicorn

from benchmarks.serve_load import free_port
from perpeft.engine.serve.recommend import ServingRun
from perpeft.engine.service.app import create_app

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None, reason="no Chromium (apt-get install chromium chromium-driver)"
)


@pytest.fixture(scope="module")
def base_url(embedded_run):
    port = free_port()
    config = uvicorn.Config(create_app(ServingRun.open(embedded_run)), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the service did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Headless as root, and no background traffic: this machine's network is closed.
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_case_page_renders_with_its_images(base_url, browser, embedded_run, tmp_path):
    user = ServingRun.open(embedded_run).dataset.user_ids[6]
    browser.get(f"{base_url}/case/{user}?k=4")
    assert browser.title == f"PerPEFT case study: user {user}"
    headings = [element.text for element in browser.find_elements("css selector", "section h2")]
    assert headings[0].startswith("Recent history") and headings[1] == "Global PEFT" and len(headings) == 4
    images = browser.execute_script(
        "return Array.from(document.images).map(image => [image.complete, image.naturalWidth, image.naturalHeight]);"
    )
    assert len(images) >= 3 * 4
    assert all(complete and width > 0 and height > 0 for complete, width, height in images), images
    screenshot = tmp_path / "case-page.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
