"""The Gradio demo in headless Chromium, used as a person would: type the characters and the story, pick a style,
set a small size, click Generate, and find the panels in the gallery; then a story naming an undefined character
shows the app's error message. Runs on the tiny model; needs Debian's chromium and chromium-driver (.ci/run
installs them). DEMO_SCREENSHOT=docs/demo.png also saves the page after the run there (the README's screenshot)."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import serve_app  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1300",
]
CHARACTERS = "[Bob] a man with a black suit\n[Alice] a woman in a white shirt"
STORY = """[Bob] wakes up #Bob wakes up
[Alice] reads a book #Alice reads
[Bob] has breakfast #breakfast
[Alice] goes to work #off to work
[Bob] and [Alice] meet in the park #they meet"""
RUN_TIMEOUT = 1200  # seconds for the first run: the graphs compile on a busy 2-core machine

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason=f"chromium is not installed ({CHROMIUM}, {CHROMEDRIVER}): apt-get install chromium chromium-driver",
)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("app")
    with serve_app(folder, "--cache_dir", str(folder / "no_models")) as address:
        yield address


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def retype(element, text: str) -> None:
    """Replace a field's text, with Enter between lines, as a person types them."""
    from selenium.webdriver.common.keys import Keys

    element.click()
    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(Keys.BACKSPACE)
    for line_no, line in enumerate(text.split("\n")):
        element.send_keys(("\n" if line_no else "") + line)
    element.send_keys(Keys.TAB)


def test_generate_in_the_browser(url, browser, tmp_path):
    from selenium.webdriver.common.by import By

    def find(css):
        return browser.find_element(By.CSS_SELECTOR, css)

    browser.get(url)
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#sd-generate"), 120, "the page")
    retype(find("#sd-characters textarea"), CHARACTERS)
    retype(find("#sd-story textarea"), STORY)
    find("#sd-style input").click()
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, 'li[aria-label="Comic book"]'), 10, "the styles")[0].click()
    for field, value in (("steps", 2), ("height", 64), ("width", 64), ("seed", 11), ("font-size", 8)):
        retype(find(f"#sd-{field} input"), str(value))
    assert find("#sd-style input").get_attribute("value") == "Comic book"
    assert find("#sd-story textarea").get_attribute("value") == STORY
    find("#sd-generate").click()

    def gallery_images():
        images = browser.find_elements(By.CSS_SELECTOR, "#sd-gallery img")
        loaded = [im for im in images if browser.execute_script("return arguments[0].naturalWidth", im) > 0]
        return loaded if len(loaded) >= 5 else None

    images = wait_for(gallery_images, RUN_TIMEOUT, "five panels in the gallery")
    assert [browser.execute_script("return arguments[0].naturalWidth", im) for im in images[:5]] == [64] * 5
    assert "5 panels, 2 page(s)" in find("#sd-status").text
    assert find("#sd-zip").find_elements(By.CSS_SELECTOR, "a[href$='.zip']"), "no zip to download"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#sd-pages img")) >= 1
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(tmp_path / "demo.png"))
    if os.environ.get("DEMO_SCREENSHOT"):
        shutil.copyfile(tmp_path / "demo.png", os.environ["DEMO_SCREENSHOT"])

    # bad input: the error message, not a traceback, appears in the page
    retype(find("#sd-story textarea"), "[Carol] runs away")
    find("#sd-generate").click()
    text = wait_for(
        lambda: "does not define" in (body := find("body").text) and body, 60, "the error message in the page"
    )
    assert "names [Carol], which the character box does not define" in text
    assert "Traceback" not in text


def test_reference_photo_in_the_browser(url, browser):
    """The 'Using Ref Images' switch shows the upload; a photo uploaded for [Bob] gives his two panels."""
    from selenium.webdriver.common.by import By

    def find(css):
        return browser.find_element(By.CSS_SELECTOR, css)

    browser.get(url)
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#sd-generate"), 120, "the page")
    assert not browser.find_elements(By.CSS_SELECTOR, "#sd-ref-files input[type=file]")  # hidden in text mode
    retype(find("#sd-characters textarea"), "[Bob] a man img, with a black suit")
    retype(find("#sd-story textarea"), "[Bob] wakes up\n[Bob] eats #lunch")
    for field, value in (("steps", 2), ("height", 64), ("width", 64), ("font-size", 8)):
        retype(find(f"#sd-{field} input"), str(value))
    find('#sd-ref-mode input[value="Using Ref Images"]').click()
    upload = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#sd-ref-files input[type=file]"), 30, "upload")
    upload[0].send_keys(str(Path(__file__).resolve().parent / "fixtures" / "photomaker" / "photo_0.png"))
    wait_for(lambda: "photo_0" in find("#sd-ref-files").get_attribute("innerHTML"), 60, "the uploaded photo")
    find("#sd-generate").click()
    status = wait_for(lambda: "2 panels" in (t := find("#sd-status").text) and t, RUN_TIMEOUT, "two panels")
    assert "1 page(s)" in status
    images = browser.find_elements(By.CSS_SELECTOR, "#sd-gallery img")
    assert [browser.execute_script("return arguments[0].naturalWidth", im) for im in images[:2]] == [64] * 2
