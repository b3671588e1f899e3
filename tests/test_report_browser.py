"""The report as its readers see it (issue 20): a mini report from the hand-made store of
test_report.py (no training), opened in headless Chromium and checked by the browser itself over the
DevTools protocol (Selenium + Debian's chromedriver): every image loads, nothing on the console is an
error, every #run-... link lands on its run AND clicking it opens that run's block, text columns are
left-aligned and numbers right-aligned, the page fits a phone's width, print hides the contents, and a
screenshot comes out.

Skips, saying why, only where Chromium cannot be had; with CI or PRETEXTLAB_REQUIRE_BROWSER set it
fails instead, so CI never skips it silently."""

from __future__ import annotations

import os

import pytest
from test_report import _fill

from pretextlab.report import build_report
from pretextlab.report.browser import browser_missing_reason, check_page


def _required() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes") for name in ("CI", "PRETEXTLAB_REQUIRE_BROWSER"))


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    reason = browser_missing_reason()
    if reason is not None:
        if _required():
            pytest.fail(f"the browser test is required here (CI / PRETEXTLAB_REQUIRE_BROWSER) but {reason}")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("browser")
    hashes = _fill(root / "results.sqlite")
    report = build_report(root / "results.sqlite", root / "report")
    return hashes, report, check_page(report.html, screenshot=root / "screenshot.png")


def test_every_image_loads_and_the_console_is_clean(page):
    _, report, check = page
    assert len(check.images) == len(report.figures) == 8
    assert all(image["natural_width"] > 0 for image in check.images), check.images
    assert check.console_errors == []
    assert check.screenshot is not None and check.screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert check.screenshot.stat().st_size > 10_000


def test_every_run_link_resolves_and_clicking_it_opens_the_run(page):
    hashes, _, check = page
    finished = {"#run-" + h for k, h in hashes.items() if k != ("exemplar", "revnet50(-)", 2, None)}
    assert finished <= {link["href"] for link in check.links}
    assert [link for link in check.links if not (link["resolves"] and link["opened"])] == []


def test_tables_are_aligned_by_type_and_the_page_fits_a_phone_and_prints_without_contents(page):
    _, _, check = page
    runs = next(t for t in check.tables if t["header"][:3] == ["run", "task", "network"])
    align = dict(zip(runs["header"], runs["align"]))
    assert [align[h] for h in ("run", "task", "network", "status")] == ["left"] * 4
    assert [align[h] for h in ("k", "pretext val %", "probes", "train min")] == ["right"] * 4
    main = next(t for t in check.tables if t["header"][:2] == ["network", "k"])
    assert main["align"] == ["left", "right", "right", "right"]
    assert check.phone_width_px == 390  # laid out for the phone's width, not a shrunken desktop page
    assert check.phone_overflow_px == 0  # wide tables scroll inside their box, not the page
    assert check.print_hides_nav


def test_report_command_writes_pdfs_and_a_screenshot_and_without_a_browser_keeps_the_report(page, tmp_path, capsys, monkeypatch):
    import json

    from pretextlab.cli import main
    from pretextlab.study.store import ResultsStore

    # A one-cell study (its figures placeholders): the command's flags, not the figures, are checked here.
    store = tmp_path / "results.sqlite"
    with ResultsStore(store) as opened:
        opened.register_run("000000000001", task="jigsaw", network="vgg19bn", width=8, representation_size=None,
                            config={}, run_dir="/runs/1", plan=[("imagenet", "pre_logits", "lbfgs", "all")])
    shot = tmp_path / "shot.png"
    assert main(["report", str(store), "--out", str(tmp_path / "a"), "--pdf", "--screenshot", str(shot)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["screenshot"] == str(shot) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "a" / "pretext_training.pdf").read_bytes()[:5] == b"%PDF-"

    monkeypatch.setenv("PRETEXTLAB_CHROMIUM", str(tmp_path / "no-such-chromium"))
    assert main(["report", str(store), "--out", str(tmp_path / "b"), "--screenshot", str(tmp_path / "b.png")]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("pretextlab: error:")]
    assert errors == [errors[0]] and "cannot open the report in a browser" in errors[0] and "chromium" in errors[0]
    assert (tmp_path / "b" / "report.html").exists() and not (tmp_path / "b.png").exists()
