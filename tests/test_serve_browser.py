"""The serve page in a real browser: `audiosearch serve` started as a user starts it, driven with headless Chromium.

Debian's chromium (installed by `make system-deps`) through Playwright's Python package;
Playwright never downloads a browser here. The results page is saved as a screenshot,
build/test-artifacts/serve-results.png, whose path the test prints.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import mixed_40s, write
from .serve_data import serve_index, serve_library  # noqa: F401 (fixtures)

ARTIFACTS = Path(__file__).resolve().parent.parent / "build" / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server(serve_index, tiny_model):
    """The URL of `audiosearch serve --port 0` on the test index, as printed by the command."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "audiosearch", "serve", "--index", str(serve_index), "--model", str(tiny_model),
         "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if m := re.search(r"at (http://127\.0\.0\.1:\d+/)", line):
                yield m.group(1)
                break
        else:
            pytest.fail("audiosearch serve did not start:\n" + "".join(lines))
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 143  # SIGTERM: the CLI's usual exit code for it, and no traceback
        assert "Traceback" not in proc.stdout.read()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail("chromium is not installed: run 'make setup' as root (or apt install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM,
                              args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        yield b
        b.close()


def test_search_listen_filter_in_the_page(server, browser, serve_library, tmp_path):
    clip = write(tmp_path / "excerpt.wav", mixed_40s()[int(20.48 * 16000): int(30.72 * 16000)], 16000)
    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    page.goto(server)
    page.wait_for_selector("#info:not(:has-text('loading'))")

    page.set_input_files("#file", str(clip))
    first = page.locator(".hit").first
    first.wait_for()
    assert first.locator(".path").inner_text() == str(serve_library / "music" / "mixed_40s.wav")
    assert first.locator(".kind").inner_text() == "DUPLICATE"
    start = float(first.get_attribute("data-start"))
    assert abs(start - 20.48) < 0.3

    first.locator(".play").click()  # plays from the start of the matched range, not from 0
    audio = first.locator("audio")
    audio.evaluate("a => new Promise(ok => a.readyState >= 1 && a.currentTime > 0 ? ok() : "
                   "a.addEventListener('seeked', () => ok(), {once: true}))")
    now = audio.evaluate("a => a.currentTime")
    assert start - 0.05 <= now <= start + 1.5, now
    page.wait_for_function("() => document.querySelector('.hit canvas').width > 0")

    shown = page.locator(".hit .path").all_inner_texts()
    chip = page.locator(".chip[aria-pressed=true]").first  # the clip's top label, the default filter
    chip.click()
    page.wait_for_function("n => document.querySelectorAll('.hit').length !== n", arg=len(shown))
    assert page.locator(".hit .path").all_inner_texts() != shown
    assert page.locator("#nofilter").is_checked()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "serve-results.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")

    page.set_input_files("#file", str(serve_library / "notes.txt"))
    message = page.locator("#message")
    message.wait_for(state="visible")
    assert "notes.txt is not readable audio" in message.inner_text()
    assert page.locator(".hit").count() == 0


def test_page_fits_a_phone_screen(server, browser, serve_library):
    page = browser.new_page(viewport={"width": 375, "height": 740}, device_scale_factor=2, is_mobile=True)
    page.goto(server)
    page.wait_for_selector("#by-label .chip")
    page.set_input_files("#file", str(serve_library / "tones" / "a440.wav"))
    page.locator(".hit").first.wait_for()
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.locator("#pick").fill("white")
    page.locator("#picks li").first.click()  # a library file as the query
    page.wait_for_function("() => document.querySelector('.hit .path')?.textContent.endsWith('white.flac')")
    page.screenshot(path=str(ARTIFACTS / "serve-phone.png"), full_page=True)
