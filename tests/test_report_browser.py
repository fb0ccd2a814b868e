"""The management report as a person reads it: rendered by a real browser (headless Chromium over CDP) at
common widths, measured for layout, and read for what it says.

The data is a real run: a synthetic corpus for the amyloid study (three sites, Philips software stored as
a multi-valued SoftwareVersions, a protocol deviation, an upgrade, an unknown device) through
``imtrial run``, then ``imtrial report`` for every audience the study declares and for the blinded reader.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from browser import LAYOUT_JS, Browser

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "examples" / "amyloid_mri.imtrial"
BIN = Path(sys.executable).parent
WIDTHS = (1920, 1366, 1024, 768, 390)


def _imtrial(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, IMTRIAL_KEY="browser-test-key-0123456789", NO_COLOR="1")
    p = subprocess.run([str(BIN / "imtrial"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode in (0, 1), p.stderr
    return p


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, Path]:
    w = tmp_path_factory.mktemp("browser")
    _imtrial("synth", str(STUDY), "-o", "inbox", "--subjects", "1", "--small", "--seed", "3",
             "--deviations", "param_off,software_upgrade,unknown_device", cwd=w)
    _imtrial("run", str(STUDY), "--inbox", "inbox", "--workdir", "work", cwd=w)
    for role in (None, "reader", "sponsor"):
        _imtrial("report", str(STUDY), "--workdir", "work", "-o", "report", "--as-of", "2028-01-01",
                 *(["--role", role] if role else []), cwd=w)
    found = {str(p.parent.relative_to(w / "report")): p for p in (w / "report").rglob("report.html")}
    assert {"central", "site/BOS", "reader", "sponsor"} <= set(found), found
    return found


@pytest.fixture(scope="module")
def page():
    b = Browser()
    try:
        yield b.page()
    finally:
        b.close()


def test_the_layout_check_sees_overlap_and_overflow(page):
    """The measurement itself: two text boxes on top of each other, a chart label cut off, a box wider than the page."""
    page.open('data:text/html,<p><span>overlapping</span><span style="margin-left:-50px">text</span></p>'
              '<svg width="100" height="40"><text x="60" y="20">cut off label</text></svg>'
              '<div style="width:3000px">wide</div>', 800)
    r = page.eval(LAYOUT_JS)
    assert r["overlaps"] and r["clipped"] == ["cut off label"] and r["scrollWidth"] > 800


@pytest.mark.parametrize("width", WIDTHS)
def test_no_overlap_or_overflow_at_common_widths(reports, page, width, tmp_path):
    for name, html in sorted(reports.items()):
        page.open(html.as_uri(), width)
        r = page.eval(LAYOUT_JS)
        where = f"{name} at {width}px"
        assert r["textBoxes"] > 100, where
        assert r["scrollWidth"] <= width, f"{where}: the page scrolls sideways ({r['scrollWidth']} px)"
        assert not r["outside"], f"{where}: outside the viewport: {r['outside'][:3]}"
        assert not r["overlaps"], f"{where}: overlapping text: {r['overlaps'][:3]}"
        assert not r["clipped"], f"{where}: chart labels cut off: {r['clipped'][:3]}"
    page.screenshot(tmp_path / f"report-{width}.png")  # a person can look at it when this fails
    assert (tmp_path / f"report-{width}.png").stat().st_size > 10_000


def test_what_the_page_says(reports, page):
    page.open(reports["central"].as_uri(), 1366)
    text = page.eval("document.body.innerText")
    assert "\\" not in text, "a DICOM multi-value or a repr escape leaked into the page"
    assert " / " in page.eval("[...document.querySelectorAll('td')].map(t => t.innerText).join('|')")
    assert "no data yet" not in text
    # a visit whose protocol failed adherence is shaded incomplete, and explained in the legend
    inc = page.eval("[...document.querySelectorAll('tr.incomplete')].map(r => r.innerText)")
    assert inc and all("failed" in r or "missing" in r for r in inc), inc
    assert "incomplete: received, but a protocol of the visit is missing or failed" in text

    # the blinded reader does not see sites or devices: the page says so instead of showing nothing
    page.open(reports["reader"].as_uri(), 1366)
    text = page.eval("document.body.innerText")
    assert text.count("Hidden for your role.") >= 2 and "no data yet" not in text
    assert "BOS" not in text and "\\" not in text


def test_a_role_that_may_not_see_dates_gets_hidden_not_empty(tmp_path, page):
    """The enrolment chart of a role hiding exam dates says it is hidden, not that there is no data."""
    from datetime import date

    from imtrial_dsl.ops import reports as rep
    from ops_data.data import AS_OF, study_data
    from ops_data.trial import trial

    t = trial()
    t.roles.append(t.roles[0].model_copy(update={"name": "monitor", "hide": ["exam_date"]}))
    files = rep.generate(t, study_data(), tmp_path, AS_OF, role="monitor", workdir=tmp_path / "w")
    html = next(p for p in files["monitor"] if p.name == "report.html")
    page.open(html.as_uri(), 1024)
    text = page.eval("document.body.innerText")
    svg_text = page.eval("[...document.querySelectorAll('svg text')].map(t => t.textContent).join('|')")
    assert "hidden for your role" in svg_text and "no data yet" not in svg_text + text
    assert isinstance(AS_OF, date)
