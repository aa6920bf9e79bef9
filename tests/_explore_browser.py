"""Drive `rcdm explore` in headless Chromium (Debian's `chromium`, through Playwright's Python package).

Used by tests/test_explore.py (upload a photo, click Sample, check the images are rendered) and, run
as a script, to screenshot every tab of a running app:

    python tests/_explore_browser.py http://127.0.0.1:7860/ docs/ [PHOTO]

writes explore_samples.png, explore_interpolation.png, explore_manipulation.png and
explore_fidelity.png (palette PNGs, small enough for the docs).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync"]
TIMEOUT_MS = 120_000
# tab -> (its button, the element holding its result images)
TABS = {
    "Samples": ("#sample-button", "#samples-gallery"),
    "Interpolation": ("#interpolate-button", "#interpolation-gallery"),
    "Manipulation": ("#manipulate-button", "#manipulation-gallery"),
    "Fidelity": ("#fidelity-button", "#fidelity-grid"),
}


@contextmanager
def page_at(url: str, width: int = 1280, height: int = 900):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.locator("#sample-button").wait_for()
            yield page
        finally:
            browser.close()


def wait_for_images(page, where: str, count: int) -> list[int]:
    """Wait until `where` shows `count` images, all decoded; their natural widths."""
    page.wait_for_function(
        """([where, n]) => {
            const imgs = [...document.querySelectorAll(where + ' img')];
            return imgs.length >= n && imgs.every(i => i.complete && i.naturalWidth > 0);
        }""", arg=[where, count], timeout=TIMEOUT_MS)
    return page.eval_on_selector_all(where + " img", "els => els.map(e => e.naturalWidth)")[:count]


def upload(page, photo: str) -> None:
    """Upload `photo` in the Samples tab's file box and wait until the upload has finished (the box
    names the file and no longer says "Uploading").

    On a busy machine the page may still be wiring its components when the Sample button first shows,
    or lose its connection and redraw: when the box neither names the file nor offers its file input,
    the page is reloaded and the file set again (three tries). A failure says what the box and the
    page showed, and what the browser's console said."""
    stem = Path(photo).stem
    done = """([stem]) => {
        const box = document.querySelector('#samples-upload');
        return !!box && box.innerText.includes(stem) && !box.innerText.includes('Uploading');
    }"""
    console = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"[:300]) if m.type in ("error", "warning") else None)
    seen = []
    for attempt in range(3):
        box = page.locator("#samples-upload")
        field = box.locator("input[type=file]")
        try:
            field.wait_for(state="attached", timeout=TIMEOUT_MS // 3)
            field.set_input_files(photo)
            page.wait_for_function(done, arg=[stem], timeout=TIMEOUT_MS // 3)
            return
        except Exception as e:  # playwright's TimeoutError; what the page showed goes in the message
            shown = box.inner_text(timeout=1000)[:200] if box.count() else "(no upload box) " + page.inner_text("body", timeout=1000)[:300]
            seen.append(f"try {attempt + 1}: {type(e).__name__}; showed {shown!r}")
        if attempt < 2:
            page.reload()
            page.locator("#sample-button").wait_for()
    raise AssertionError("the upload box did not take the photo: " + " / ".join(seen)
                         + "; console: " + " | ".join(console[-8:]))


def upload_and_sample(url: str, photo: str, screenshot: str | Path, num_samples: int = 4) -> list[int]:
    """Upload `photo` on the Samples tab, click Sample, wait for the images; save a screenshot and
    return the natural widths of the `num_samples` images shown."""
    with page_at(url) as page:
        upload(page, photo)
        page.click("#sample-button")
        widths = wait_for_images(page, "#samples-gallery", num_samples)
        page.screenshot(path=str(screenshot), full_page=True)
        return widths


def small_png(path: Path) -> None:
    """Rewrite a screenshot as a 256-colour PNG (a third of the size, same look for a UI)."""
    Image.open(path).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def screenshot_tabs(url: str, out_dir: str | Path, photo: str | None = None) -> list[Path]:
    """Click each tab's button with its defaults (the Samples tab: `photo` uploaded when given) and
    screenshot the page once its images are shown."""
    out_dir = Path(out_dir)
    shots = []
    with page_at(url, height=1000) as page:
        for tab, (button, result) in TABS.items():
            page.get_by_role("tab", name=tab).click()
            if tab == "Samples" and photo:
                upload(page, photo)
            page.locator(button).click()
            wait_for_images(page, result, 1)
            page.evaluate("window.scrollTo(0, 0)")
            page.wait_for_timeout(500)
            path = out_dir / f"explore_{tab.lower()}.png"
            page.screenshot(path=str(path), full_page=True)
            small_png(path)
            shots.append(path)
    return shots


if __name__ == "__main__":
    for shot in screenshot_tabs(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None):
        print(shot, f"{shot.stat().st_size // 1024} KB")
