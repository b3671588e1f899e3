"""The report as a browser draws it: headless Chromium driven over the DevTools protocol (Selenium with
the system's chromedriver; nothing is downloaded). Used by the browser test and by
``pretextlab report --screenshot FILE``.

``check_page`` loads report.html and reads back, from the browser itself: every image's natural width,
the console's errors, each ``#run-...`` link's target and whether clicking the link opened it, each
table's column alignments, whether the page fits a phone's width, whether the print style hides the
contents, and (on request) a screenshot.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pretextlab import atomic
from pretextlab.errors import PretextlabError

# Debian's chromium and chromium-driver (setup.sh installs them where apt is available).
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_NAMES = ("chromedriver",)
DESKTOP = (1280, 1600)
PHONE = (390, 844)  # CSS pixels of a common phone


@dataclass
class PageCheck:
    images: list[dict[str, Any]] = field(default_factory=list)  # src, natural_width
    console_errors: list[str] = field(default_factory=list)
    links: list[dict[str, Any]] = field(default_factory=list)  # href, resolves, opened
    tables: list[dict[str, Any]] = field(default_factory=list)  # header -> computed text-align of its column
    phone_width_px: int = 0  # the page's layout width on a phone (its screen's width unless the page lacks a viewport)
    phone_overflow_px: int = 0  # how far the page is wider than that (0 = fits)
    print_hides_nav: bool = False
    screenshot: Path | None = None


def _program(variable: str, names: tuple[str, ...], fallback: str = "") -> str | None:
    named = os.environ.get(variable)
    if named:  # named explicitly: that one or none
        return named if os.path.isfile(named) and os.access(named, os.X_OK) else None
    found = next(filter(None, map(shutil.which, names)), None)
    return found or (fallback if fallback and os.access(fallback, os.X_OK) else None)


def find_browser() -> tuple[str, str] | None:
    """(chromium, chromedriver) paths, or None where either is missing. $PRETEXTLAB_CHROMIUM and
    $PRETEXTLAB_CHROMEDRIVER name others."""
    browser = _program("PRETEXTLAB_CHROMIUM", BROWSER_NAMES)
    driver = _program("PRETEXTLAB_CHROMEDRIVER", DRIVER_NAMES, "/usr/lib/chromium/chromedriver")
    return (browser, driver) if browser and driver else None


def browser_missing_reason() -> str | None:
    """Why no page can be checked here, or None when it can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if find_browser() is None:
        return ("no chromium and chromedriver found (PATH, $PRETEXTLAB_CHROMIUM, $PRETEXTLAB_CHROMEDRIVER; "
                "Debian: apt-get install chromium chromium-driver, which setup.sh does)")
    return None


@contextmanager
def chromium(size: tuple[int, int] = DESKTOP) -> Iterator[Any]:
    """A headless Chromium under Selenium, closed on exit."""
    reason = browser_missing_reason()
    if reason is not None:
        raise PretextlabError(f"cannot open the report in a browser: {reason}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = find_browser()  # type: ignore[misc]
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # --no-sandbox: Chromium's sandbox cannot start as root (CI and these machines run as root).
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--allow-file-access-from-files", "--hide-scrollbars", f"--window-size={size[0]},{size[1]}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        _viewport(driver, size)
        yield driver
    finally:
        driver.quit()


def _viewport(driver: Any, size: tuple[int, int], mobile: bool = False) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": mobile})


_READ_IMAGES = "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete ? i.naturalWidth : 0]);"
_RUN_HREFS = "return Array.from(new Set(Array.from(document.querySelectorAll('a[href^=\"#run-\"]')).map(a => a.getAttribute('href'))));"
# Close every block, then show the first link to the run (open the blocks around it, as a reader
# expanding a figure's numbers would) and hand it back to be clicked.
_PREPARE_LINK = """
document.querySelectorAll('details').forEach(d => d.open = false);
const link = document.querySelector('a[href="' + arguments[0] + '"]');
for (let node = link.parentElement; node; node = node.parentElement) { if (node.tagName === 'DETAILS') node.open = true; }
return [link, document.getElementById(arguments[0].slice(1)) !== null];
"""
# The run's block: the target itself, the block around it, or (a bare anchor) the block right after it.
_OPENED = """
const target = document.getElementById(arguments[0].slice(1));
if (!target) return false;
const next = target.nextElementSibling;
const block = target.tagName === 'DETAILS' ? target : (target.closest('details') || (next && next.tagName === 'DETAILS' ? next : null));
if (!block || !block.open) return false;
for (let node = block.parentElement; node; node = node.parentElement) { if (node.tagName === 'DETAILS' && !node.open) return false; }
const box = block.getBoundingClientRect();
return box.bottom > 0 && box.top < window.innerHeight;
"""
_TABLES = """
return Array.from(document.querySelectorAll('table')).map(t => {
  const header = Array.from(t.rows[0].cells).map(c => c.textContent);
  const body = t.rows.length > 1 ? Array.from(t.rows[1].cells) : [];
  return {header: header, align: body.map(c => getComputedStyle(c).textAlign)};
});
"""


def check_page(html: str | os.PathLike, screenshot: str | os.PathLike | None = None) -> PageCheck:
    """Open ``html`` in headless Chromium and read back what a reader would meet (see the module doc)."""
    html = Path(html).resolve()
    if not html.exists():
        raise PretextlabError(f"no report at {html}: run `pretextlab report FILE --out DIR` first")
    result = PageCheck()
    with chromium() as driver:
        driver.get(html.as_uri())
        result.images = [{"src": src, "natural_width": width} for src, width in driver.execute_script(_READ_IMAGES)]
        if screenshot is not None:
            result.screenshot = _screenshot(driver, Path(screenshot))
        for href in driver.execute_script(_RUN_HREFS):
            link, resolves = driver.execute_script(_PREPARE_LINK, href)
            link.click()  # a real click: the browser follows the link and runs the page's handlers
            result.links.append({"href": href, "resolves": resolves, "opened": bool(driver.execute_script(_OPENED, href))})
        result.tables = driver.execute_script(_TABLES)
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": "print"})
        result.print_hides_nav = bool(driver.execute_script(
            "const n = document.querySelector('nav'); return n !== null && getComputedStyle(n).display === 'none';"))
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": ""})
        _viewport(driver, PHONE, mobile=True)
        driver.get(html.as_uri())
        result.phone_width_px, result.phone_overflow_px = driver.execute_script(
            "const e = document.documentElement; return [e.clientWidth, Math.max(0, e.scrollWidth - e.clientWidth)];")
        result.console_errors = [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    return result


def _screenshot(driver: Any, path: Path) -> Path:
    driver.execute_script("window.scrollTo(0, 0);")
    png = driver.get_screenshot_as_png()
    return atomic.write_bytes(path, lambda handle: handle.write(png))


def take_screenshot(html: str | os.PathLike, path: str | os.PathLike, size: tuple[int, int] = DESKTOP) -> Path:
    """A PNG of the top of ``html`` as Chromium draws it at ``size`` (CSS pixels)."""
    html = Path(html).resolve()
    if not html.exists():
        raise PretextlabError(f"no report at {html}: run `pretextlab report FILE --out DIR` first")
    with chromium(size) as driver:
        driver.get(html.as_uri())
        return _screenshot(driver, Path(path))
