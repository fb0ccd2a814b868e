"""The imaging documents (charter, site manual): golden Markdown, well-formed HTML with the graph, a non-blank PDF.

Regenerate the golden files with ``IMTRIAL_UPDATE_GOLDEN=1``.
"""
from __future__ import annotations

import os
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from imtrial_dsl import ir, source
from imtrial_dsl.compiler import compile_file
from imtrial_dsl.exporters import docs

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.imtrial"))
GOLDEN = ROOT / "tests" / "golden" / "docs"
UPDATE = os.environ.get("IMTRIAL_UPDATE_GOLDEN") == "1"


@pytest.fixture(scope="module")
def compiled():
    out = {}
    for path in EXAMPLES:
        res = compile_file(path)
        assert res.ok, "\n".join(str(d) for d in res.diagnostics)
        out[path.stem] = (res.trial, res.graph)
    return out


@pytest.fixture(scope="module")
def rendered(compiled, tmp_path_factory):
    """Markdown and HTML of every example, exported once."""
    out = {}
    for stem, (trial, graph) in compiled.items():
        d = tmp_path_factory.mktemp(stem)
        files = docs.export(trial, graph, d, formats=("md", "html"))
        out[stem] = {p.name: p for p in files}
    return out


def test_examples_exist():
    names = {p.stem for p in EXAMPLES}
    assert {"amyloid_mri", "oncology_ct", "phantom_qualification"} <= names


@pytest.mark.parametrize("stem", [p.stem for p in EXAMPLES])
@pytest.mark.parametrize("kind", list(docs.DOCUMENTS))
def test_markdown_matches_golden(rendered, stem, kind):
    text = rendered[stem][f"{kind}.md"].read_text(encoding="utf-8")
    golden = GOLDEN / stem / f"{kind}.md"
    if UPDATE:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text, encoding="utf-8")
    assert golden.exists(), f"missing golden {golden}; run with IMTRIAL_UPDATE_GOLDEN=1"
    assert text == golden.read_text(encoding="utf-8")


def test_output_is_reproducible(compiled, tmp_path):
    trial, graph = compiled["amyloid_mri"]
    a = docs.export(trial, graph, tmp_path / "a", formats=("md", "html"))
    b = docs.export(trial, graph, tmp_path / "b", formats=("md", "html"))
    assert [p.name for p in a] == [p.name for p in b]
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes(), pa.name


@pytest.mark.parametrize("stem", [p.stem for p in EXAMPLES])
def test_every_document_carries_version_and_sha(compiled, rendered, stem):
    trial, _ = compiled[stem]
    assert trial.source_sha256 and re.fullmatch(r"[0-9a-f]{64}", trial.source_sha256)
    for name, path in rendered[stem].items():
        if name.endswith(".svg"):
            continue
        text = path.read_text(encoding="utf-8")
        assert trial.source_sha256 in text, name
        assert trial.study.version in text, name


@pytest.mark.parametrize("stem", [p.stem for p in EXAMPLES])
def test_charter_covers_the_whole_study(compiled, rendered, stem):
    """Every declared name of the study appears in the charter (derived from the IR, not listed by hand)."""
    trial, graph = compiled[stem]
    text = rendered[stem]["charter.md"].read_text(encoding="utf-8")
    names = [p.name for p in trial.protocols]
    names += [v.name for v in trial.schedule.visits]
    names += [d.id for _, d in trial.devices()] + [s.code for s in trial.sites]
    applies = [q for q in trial.qc if any(q in trial.qc_for(p) for p in trial.protocols)]
    names += [q.name for q in applies] + [a.name for a in trial.analyses]
    names += [m.name for a in trial.analyses for m in a.measurements]
    names += [t.name for t in trial.transfers] + [r.name for r in trial.roles] + [r.name for r in trial.reports]
    names += [e.name for e in trial.study.endpoints] + [o.value for o in trial.deidentify.options]
    names += [c.name for s in trial.sites for c in s.contacts]
    names += [str(n) for n in graph.nodes]
    missing = [n for n in names if n not in text]
    assert not missing
    # a modality-wide check for a modality the study does not use is left out
    for q in trial.qc:
        if q not in applies:
            assert f"| {docs.code(q.name)} |" not in text
    for p in trial.protocols:
        for v in p.variants:
            assert f"**Variant: {docs.md(docs.variant_label(v))}**" in text
        for c in p.constraints:
            assert docs.code(source.parameter(c)) in text


@pytest.mark.parametrize("stem", [p.stem for p in EXAMPLES])
def test_site_manual_has_effective_parameters_per_device(compiled, rendered, stem):
    """Each scanner's card lists exactly the constraints that apply to it (base overridden by its variant)."""
    trial, _ = compiled[stem]
    text = rendered[stem]["site_manual.md"].read_text(encoding="utf-8")
    sections = re.split(r"^### ", text, flags=re.M)
    for site, dev in trial.devices():
        card = next(s for s in sections if s.startswith(f"{site.code} / {dev.id} "))
        for p in trial.protocols:
            if p.modality != dev.modality:
                continue
            eff, variant = ir.effective_constraints(p, dev.vendor, dev.software, dev.model)
            block = card.split(f"#### `{p.name}`", 1)[1].split("#### ", 1)[0].split("\n## ", 1)[0]
            assert f"Parameter set: {docs.md(docs.variant_label(variant))}." in block
            rows = [ln for ln in block.splitlines() if ln.startswith("| `")]
            assert [r.split("|")[1].strip() for r in rows] == [docs.code(source.parameter(c)) for c in eff]


def test_deidentification_is_stated_in_words(compiled, rendered):
    trial, _ = compiled["amyloid_mri"]
    text = rendered["amyloid_mri"]["charter.md"].read_text(encoding="utf-8")
    lo, hi = trial.deidentify.date_shift_min.days, trial.deidentify.date_shift_max.days
    assert (f"Dates are shifted by a per-subject offset between {docs.plural(abs(hi), 'day')} and "
            f"{docs.plural(abs(lo), 'day')} into the past") in text
    assert "intervals between visits are" in text
    profile = trial.profile(trial.deidentify.profile.name)
    assert f"The profile lists {len(profile.rules)} attributes" in text
    for o in trial.deidentify.overrides:
        assert docs.override_text(o) in text


def test_html_is_well_formed_and_embeds_the_graph(rendered):
    for stem, files in rendered.items():
        for kind in docs.DOCUMENTS:
            page = files[f"{kind}.html"].read_text(encoding="utf-8")
            assert page.startswith("<!DOCTYPE html>")
            root = ET.fromstring(page.split("\n", 1)[1])  # XHTML-compatible: parse as XML
            assert root.tag == "html"
            ids = [e.get("id") for e in root.iter() if e.get("id")]
            assert len(ids) == len(set(ids)), (stem, kind)
            for href in re.findall(r'href="#([^"]+)"', page):
                assert href in ids, (stem, kind, href)
        charter = files["charter.html"].read_text(encoding="utf-8")
        root = ET.fromstring(charter.split("\n", 1)[1])
        svgs = [e for e in root.iter() if e.tag == "{http://www.w3.org/2000/svg}svg"]
        assert len(svgs) == 2, stem     # the exam pipeline and the study tasks, each its own picture
        assert 'src="graph.svg"' not in charter
        svg_text = files[docs.GRAPH_FILE].read_text(encoding="utf-8")
        assert "<svg" in svg_text and "ingest" in svg_text.lower()


def test_without_graph_the_charter_says_so(compiled, tmp_path):
    trial, _ = compiled["oncology_ct"]
    files = docs.export(trial, None, tmp_path, formats=("md",))
    assert docs.GRAPH_FILE not in {p.name for p in files}
    text = (tmp_path / "charter.md").read_text(encoding="utf-8")
    assert "> The dependency graph is not included: no graph was given to the document exporter." in text


def test_secret_key_never_reaches_output(compiled, tmp_path, monkeypatch):
    secret = "s3cr3t-key-value-that-must-not-leak"
    monkeypatch.setenv("IMTRIAL_KEY", secret)
    monkeypatch.setenv("CENTRAL_TOKEN", secret)
    trial, graph = compiled["amyloid_mri"]
    for p in docs.export(trial, graph, tmp_path, formats=("md", "html")):
        assert secret not in p.read_text(encoding="utf-8")


def test_pdf_first_page_is_not_blank(compiled, tmp_path):
    from PIL import Image

    trial, graph = compiled["amyloid_mri"]
    files = docs.export(trial, graph, tmp_path, formats=("pdf",), documents=("charter",))
    pdf = tmp_path / "charter.pdf"
    assert pdf in files and pdf.read_bytes().startswith(b"%PDF-")
    subprocess.run(["pdftoppm", "-r", "40", "-f", "1", "-l", "1", "-png", str(pdf), str(tmp_path / "p")], check=True)
    png = next(tmp_path.glob("p-*1.png"))
    img = np.asarray(Image.open(png).convert("L"), dtype=float)
    ink = (img < 200).mean()
    assert 0.02 < ink < 0.5, ink          # text on the page, not a solid block
    rows_with_ink = (img < 200).any(axis=1).mean()
    assert rows_with_ink > 0.3, rows_with_ink  # spread over the page, not one line
    text = subprocess.run(["pdftotext", "-f", "1", "-l", "1", str(pdf), "-"], capture_output=True, text=True, check=True)
    assert "Imaging Charter" in text.stdout and trial.study.code in text.stdout
    assert trial.source_sha256[:12] in text.stdout


def test_python_example_in_docs_runs(tmp_path, monkeypatch, capsys):
    """The Python example of docs/documents.md works and prints what its comment says."""
    text = (ROOT / "docs" / "documents.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    expected = re.search(r"# (\[.*\])", block).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block.replace('"examples/', f'"{ROOT}/examples/'), "documents.md", "exec"), {})
    assert capsys.readouterr().out.strip() == expected
    assert (tmp_path / "out" / "onc-docs" / "site_manual.html").exists()


@pytest.mark.slow  # two full WeasyPrint renders: ~5 s idle, up to ~25 s on a loaded machine
def test_pdf_is_byte_reproducible(compiled, tmp_path):
    trial, graph = compiled["phantom_qualification"]
    a = docs.export(trial, graph, tmp_path / "a", formats=("pdf",), documents=("site_manual",))
    b = docs.export(trial, graph, tmp_path / "b", formats=("pdf",), documents=("site_manual",))
    assert a[-1].read_bytes() == b[-1].read_bytes()  # no timestamps anywhere, font subsets included


def test_minimal_study_says_what_is_not_defined(tmp_path):
    """A study with almost nothing declared still gives complete documents that say what is missing."""
    from imtrial_dsl.compiler import compile_text

    src = ('study MIN "Minimal study" { version "0.1" }\n'
           'protocol T1 modality MR "T1" { match SeriesDescription ~ "t1"  EchoTime < 10 ms }\n')
    res = compile_text(src, "min.imtrial")
    assert res.ok, res.diagnostics
    docs.export(res.trial, res.graph, tmp_path, formats=("md", "html"))
    charter = (tmp_path / "charter.md").read_text(encoding="utf-8")
    for sentence in ("The study description has no visit schedule.",
                     "The study description does not de-identify images.",
                     "The study description requires no qualification examination.",
                     "| `EchoTime` | Echo Time (0018,0081) | < 10 ms |"):
        assert sentence in charter
    manual = (tmp_path / "site_manual.md").read_text(encoding="utf-8")
    assert "The study does not de-identify images." in manual


def test_missing_weasyprint_is_a_diagnostic_not_a_crash(compiled, tmp_path, monkeypatch):
    """Without the optional PDF renderer the other formats are written and E900 names the extra to install."""
    import sys

    from imtrial_dsl.extras import MissingExtra

    monkeypatch.setitem(sys.modules, "weasyprint", None)  # makes 'import weasyprint' raise ModuleNotFoundError
    trial, graph = compiled["oncology_ct"]
    with pytest.raises(MissingExtra) as exc:
        docs.export(trial, graph, tmp_path)
    assert exc.value.diagnostic.code == "E900" and exc.value.diagnostic.hint == "pip install 'imtrial[docs]'"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["charter.html", "charter.md", "graph.svg", "graph_pipeline.svg", "graph_tasks.svg",
                     "site_manual.html", "site_manual.md"]


def test_charter_answers_every_fda_topic_and_m11_heading(compiled, rendered):
    """Appendix C: each topic links to the section that answers it, or says why it does not apply; the
    read topics are answered in section 10 from the study's read block (oncology), n/a without one (phantom)."""
    onc = rendered["oncology_ct"]["charter.md"].read_text(encoding="utf-8")
    appendix = onc.split("## Appendix C.", 1)[1]
    rows = [ln for ln in appendix.splitlines() if ln.startswith("| ") and not ln.startswith("| Topic") and not ln.startswith("| ICH")]
    assert len(rows) == 22 + 15
    for row in rows:
        where = row.split(" | ", 1)[1]
        assert where.startswith("[") or "not applicable because" in where or where.startswith("version history"), row
    for topic in ("Reader qualification and training", "Read paradigm and number of readers", "Adjudication",
                  "Reader-variability monitoring", "Image display conditions", "Response criteria",
                  "Handling of unevaluable images", "Image data lock", "Charter amendment control"):
        row = next(r for r in rows if r.startswith(f"| {topic} |"))
        assert "not applicable" not in row and "](#" in row, row
    read = compiled["oncology_ct"][0].reads[0]
    for text in (read.qualification, read.training, read.display, read.unevaluable, read.lock, read.variability.action):
        assert docs.md(text) in onc
    assert "RECIST 1.1 — Eisenhauer EA" in onc and "an adjudicator reviews a time point when" in onc.lower()
    phantom = rendered["phantom_qualification"]["charter.md"].read_text(encoding="utf-8")
    row = next(r for r in phantom.splitlines() if r.startswith("| Response criteria |"))
    assert "not applicable because the study description defines no read" in row
    # M11 wording where M11 headings are used
    assert "subject" not in onc.split("## 2.", 1)[0].split("## 1. Protocol Synopsis", 1)[1].lower()
    assert "## 4. Participant Preparation" in onc


def test_title_page_effective_date_history_and_signatures(compiled, rendered):
    trial, _ = compiled["oncology_ct"]
    text = rendered["oncology_ct"]["charter.md"].read_text(encoding="utf-8")
    head = text.split("## Contents", 1)[0]
    entry = next(e for e in trial.changelog.entries if e.version == trial.study.version)
    assert f"| Effective date | {entry.date} |" in head
    for e in trial.changelog.entries:
        assert f"| {e.version} | {e.date} | {docs.md(e.description)} |" in head
    for a in trial.changelog.approvers:
        assert f"| {docs.md(a.title)} | {docs.md(a.name or '')} | | |" in head
    # without a changelog the charter says so instead of inventing a date
    phantom = rendered["phantom_qualification"]["charter.md"].read_text(encoding="utf-8")
    assert "not recorded (the changelog has no entry for version" in phantom


def test_registry_sentence_states_what_the_registry_does(compiled, rendered):
    """§6.6 is written from the registry implementation: keyed lookups when the study names a key."""
    from imtrial_dsl.runner.identify import source_key

    text = rendered["oncology_ct"]["charter.md"].read_text(encoding="utf-8")
    section = text.split("### 6.6 Research Identifiers", 1)[1].split("\n## ", 1)[0]
    assert source_key("ONC02", {"PatientID": "123"}, "X", b"key").startswith("hmac:")
    assert "keyed hash (HMAC-SHA256)" in section
    trial, graph = compiled["oncology_ct"]
    unkeyed = trial.model_copy(update={"identifiers": trial.identifiers.model_copy(update={"key": None})})
    section = docs.render_markdown(docs.build(unkeyed, None), "charter").split("### 6.6 Research Identifiers", 1)[1]
    assert "as written\n(not hashed)" in section and "keyed hash (HMAC" not in section.split("\n## ", 1)[0]


def test_wide_graph_gets_a_landscape_page(compiled, tmp_path):
    """The pipeline picture (wider than tall) is printed on a landscape page: its PDF page is wider than high."""
    trial, graph = compiled["oncology_ct"]
    docs.export(trial, graph, tmp_path, formats=("pdf",), documents=("charter",))
    info = subprocess.run(["pdfinfo", "-f", "1", "-l", "99", str(tmp_path / "charter.pdf")], capture_output=True,
                          text=True, check=True).stdout
    sizes = re.findall(r"Page\s+\d+ size:\s+([\d.]+) x ([\d.]+)", info)
    landscape = [i for i, (w, h) in enumerate(sizes, 1) if float(w) > float(h)]
    assert len(landscape) == 1, sizes
    page = subprocess.run(["pdftotext", "-f", str(landscape[0]), "-l", str(landscape[0]), str(tmp_path / "charter.pdf"), "-"],
                          capture_output=True, text=True, check=True).stdout
    assert "Figure 1" in page and "Classify series" in page
