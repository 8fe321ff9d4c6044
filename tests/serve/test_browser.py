"""A real headless Chromium (Debian's package, driven by Playwright) on the page at ``/``: it
uploads an image, asks, sees the streamed answer, draws, sees the pictures; a screenshot is saved."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (Debian: apt-get install chromium)", allow_module_level=True)

from _serving import QUESTION, server_process, talking_copy  # noqa: E402

# where the screenshot goes: $UNICODEBOOK_SCREENSHOTS, else the test's temporary folder
SHOTS = os.environ.get("UNICODEBOOK_SCREENSHOTS")


def test_the_page_asks_about_an_uploaded_image_and_draws(model_run, shapes_dir, tmp_path, tmp_path_factory):
    import httpx

    talk = talking_copy(model_run, tmp_path_factory.mktemp("talk_page") / "model")
    image = shapes_dir / "test" / "images" / "000000.png"
    with server_process(talk) as (url, _):
        from _serving import chat_body, data_url

        expected = httpx.post(f"{url}/v1/chat/completions", json=chat_body(data_url(image)), timeout=60).json()
        expected = expected["choices"][0]["message"]["content"]
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 640})
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(url)
                sync_api.expect(page.locator("#model")).to_contain_text("model · 32×32 px")
                page.set_input_files("#image-input", str(image))
                sync_api.expect(page.locator("#preview")).to_be_visible()
                page.fill("#question", QUESTION)
                page.click("#ask")
                page.wait_for_selector("#answer[data-done='1']", timeout=30_000)
                assert page.inner_text("#answer").strip() == expected and expected
                assert " streamed in " in page.inner_text("#stats")

                page.fill("#prompt", "draw a small red circle at the top left")
                page.fill("#n", "3")
                page.fill("#seed", "2")
                page.click("#draw")
                pictures = page.locator("#gallery img")
                sync_api.expect(pictures).to_have_count(3, timeout=30_000)
                assert all(pictures.nth(i).evaluate("img => img.complete && img.naturalWidth") == 32 for i in range(3))
                assert pictures.first.evaluate("img => getComputedStyle(img).imageRendering") == "pixelated"
                assert pictures.first.bounding_box()["width"] == 128  # scaled up 4×, not blurred
                sync_api.expect(page.locator("#progress")).not_to_have_class("on")
                assert page.inner_text("#draw-error") == "" and not errors

                page.set_input_files(
                    "#image-input", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not a picture"}]
                )
                page.click("#ask")
                sync_api.expect(page.locator("#ask-error")).to_contain_text("not an image file")

                shot = Path(SHOTS) if SHOTS else tmp_path
                shot.mkdir(parents=True, exist_ok=True)
                page.set_input_files("#image-input", str(image))  # the good image again, for the picture
                page.click("#ask")
                page.wait_for_selector("#answer[data-done='1']", timeout=30_000)
                assert page.inner_text("#answer").strip() == expected and page.inner_text("#ask-error") == ""
                page.screenshot(path=str(shot / "serve_page.png"), full_page=True)
                assert (shot / "serve_page.png").stat().st_size > 10_000
            finally:
                browser.close()
