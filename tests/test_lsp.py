"""``imtrial lsp`` driven by a real LSP client over stdio (pytest-lsp starts ``python -m imtrial_dsl lsp`` as a
subprocess and speaks JSON-RPC to it): diagnostics with the checker's ranges and codes, updates on edit,
completion, hover, definition, references, outline, formatting and quick fixes."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import pytest_lsp
from lsprotocol import types as T
from pytest_lsp import ClientServerConfig, LanguageClient

from imtrial_dsl.compiler import compile_file

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "tests" / "scenarios" / "undefined_names.imtrial"
EXAMPLE = ROOT / "examples" / "amyloid_mri.imtrial"


@pytest_lsp.fixture(config=ClientServerConfig(server_command=[sys.executable, "-m", "imtrial_dsl", "lsp"]))
async def client(lsp_client: LanguageClient):
    await lsp_client.initialize_session(T.InitializeParams(capabilities=pytest_lsp.client_capabilities("visual-studio-code")))
    yield
    await lsp_client.shutdown_session()


def _open(client: LanguageClient, path: Path, text: str | None = None) -> str:
    uri = path.resolve().as_uri()
    client.text_document_did_open(T.DidOpenTextDocumentParams(text_document=T.TextDocumentItem(
        uri=uri, language_id="imtrial", version=1, text=text if text is not None else path.read_text(encoding="utf-8"))))
    return uri


async def _diagnostics(client: LanguageClient, uri: str) -> list[T.Diagnostic]:
    while True:
        params = await client.wait_for_notification(T.TEXT_DOCUMENT_PUBLISH_DIAGNOSTICS)
        if params.uri == uri:
            return params.diagnostics


def _line_of(text: str, needle: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines()) if needle in ln)


@pytest.mark.asyncio
async def test_diagnostics_have_the_checkers_ranges_and_codes_and_follow_edits(client: LanguageClient, tmp_path):
    study = tmp_path / "study.imtrial"
    shutil.copy(SCENARIO, study)
    text = study.read_text(encoding="utf-8")
    uri = _open(client, study)
    got = await _diagnostics(client, uri)
    expected = compile_file(study).diagnostics
    assert len(got) == len(expected) > 5
    for g, e in zip(sorted(got, key=lambda d: (d.range.start.line, d.range.start.character)), expected):
        assert g.code == e.code and g.message.startswith(e.message)
        assert (g.range.start.line, g.range.start.character) == (e.span.line - 1, e.span.col - 1)
        assert (g.range.end.line, g.range.end.character) == (e.span.end_line - 1, e.span.end_col - 1)
        assert g.severity == T.DiagnosticSeverity.Error
    # the caret of "acquire T1, FLAIR" (E301 on T1) covers exactly "T1"
    t1 = next(d for d in got if "'T1'" in d.message)
    line = text.splitlines()[t1.range.start.line]
    assert line[t1.range.start.character:t1.range.end.character] == "T1"

    # fix the undefined protocol names of the visit: their diagnostics go, the others stay
    fixed = text.replace("acquire T1, FLAIR", "acquire T1w")
    client.text_document_did_change(T.DidChangeTextDocumentParams(
        text_document=T.VersionedTextDocumentIdentifier(uri=uri, version=2),
        content_changes=[T.TextDocumentContentChangeWholeDocument(text=fixed)]))
    after = await _diagnostics(client, uri)
    assert len(after) == len(got) - 2
    assert not any("'T1'" in d.message or ("'FLAIR'" in d.message and d.range.start.line == t1.range.start.line)
                   for d in after)

    # a clean study clears them all
    client.text_document_did_change(T.DidChangeTextDocumentParams(
        text_document=T.VersionedTextDocumentIdentifier(uri=uri, version=3),
        content_changes=[T.TextDocumentContentChangeWholeDocument(text=EXAMPLE.read_text(encoding="utf-8"))]))
    assert list(await _diagnostics(client, uri)) == []


@pytest.mark.asyncio
async def test_syntax_error_range_and_did_you_mean_quick_fix(client: LanguageClient, tmp_path):
    study = tmp_path / "typo.imtrial"
    text = 'protocol T1w modality MR {\n  mach SeriesDescription ~ "t1"\n}\n'
    uri = _open(client, study, text)
    (d,) = await _diagnostics(client, uri)
    assert d.code == "E103" and d.range.start.line == 1
    actions = await client.text_document_code_action_async(T.CodeActionParams(
        text_document=T.TextDocumentIdentifier(uri=uri), range=d.range,
        context=T.CodeActionContext(diagnostics=[d])))
    (fix,) = actions
    (edit,) = fix.edit.changes[uri]
    assert edit.new_text == "match"
    line = text.splitlines()[1]
    assert line[edit.range.start.character:edit.range.end.character] == "mach"


@pytest.mark.asyncio
async def test_completion_in_a_protocol_offers_dicom_keywords_with_vr_and_unit(client: LanguageClient, tmp_path):
    text = EXAMPLE.read_text(encoding="utf-8")
    study = tmp_path / EXAMPLE.name
    study.write_text(text, encoding="utf-8")
    uri = _open(client, study)
    await _diagnostics(client, uri)
    ln = _line_of(text, "protocol T1w modality MR")
    res = await client.text_document_completion_async(T.CompletionParams(
        text_document=T.TextDocumentIdentifier(uri=uri), position=T.Position(line=ln + 1, character=2)))
    items = {i.label: i for i in res.items}
    assert "EchoTime" in items and "VR DS" in items["EchoTime"].detail and "ms" in items["EchoTime"].detail
    assert {"match", "variant"} <= set(items) and "visit" not in items  # keywords of a protocol block only
    # after "acquire" in a visit: the study's protocols
    ln = _line_of(text, "acquire")
    col = text.splitlines()[ln].index("acquire") + len("acquire ")
    res = await client.text_document_completion_async(T.CompletionParams(
        text_document=T.TextDocumentIdentifier(uri=uri), position=T.Position(line=ln, character=col)))
    labels = {i.label for i in res.items}
    assert {"T1w", "FLAIR", "SWI"} <= labels and "EchoTime" not in labels
    # after "with" in deidentify: the PS3.15 options
    ln = _line_of(text, "deidentify using")
    col = text.splitlines()[ln].index("with") + len("with ")
    res = await client.text_document_completion_async(T.CompletionParams(
        text_document=T.TextDocumentIdentifier(uri=uri), position=T.Position(line=ln, character=col)))
    assert "retain_longitudinal_modified_dates" in {i.label for i in res.items}


@pytest.mark.asyncio
async def test_hover_definition_references_outline_formatting(client: LanguageClient, tmp_path):
    text = EXAMPLE.read_text(encoding="utf-8")
    study = tmp_path / EXAMPLE.name
    study.write_text(text, encoding="utf-8")
    uri = _open(client, study)
    await _diagnostics(client, uri)
    lines = text.splitlines()

    ln = _line_of(text, "EchoTime")
    col = lines[ln].index("EchoTime") + 2
    h = await client.text_document_hover_async(T.HoverParams(text_document=T.TextDocumentIdentifier(uri=uri),
                                                             position=T.Position(line=ln, character=col)))
    assert "Echo Time" in h.contents.value and "(0018,0081)" in h.contents.value and "ms" in h.contents.value

    # hover on a protocol used in a visit: the constraints that apply on each device (its variant)
    ln = _line_of(text, "acquire T1w")
    col = lines[ln].index("acquire T1w") + len("acquire ") + 1
    pos = T.Position(line=ln, character=col)
    h = await client.text_document_hover_async(T.HoverParams(text_document=T.TextDocumentIdentifier(uri=uri), position=pos))
    assert "protocol T1w" in h.contents.value and "LYN/LYN_MR1" in h.contents.value and "variant GE" in h.contents.value

    loc = await client.text_document_definition_async(T.DefinitionParams(
        text_document=T.TextDocumentIdentifier(uri=uri), position=pos))
    assert loc.uri == uri and lines[loc.range.start.line].startswith("protocol T1w")
    assert lines[loc.range.start.line][loc.range.start.character:loc.range.end.character] == "T1w"

    refs = await client.text_document_references_async(T.ReferenceParams(
        text_document=T.TextDocumentIdentifier(uri=uri), position=pos,
        context=T.ReferenceContext(include_declaration=True)))
    written = [lines[r.range.start.line][r.range.start.character:r.range.end.character] for r in refs]
    assert written == ["T1w"] * len(refs) and len(refs) >= 4  # the definition, visits, QC checks, analysis input

    # the imported profile resolves into the stdlib file
    ln = _line_of(text, "deidentify using")
    col = lines[ln].index("ps315_basic") + 1
    loc = await client.text_document_definition_async(T.DefinitionParams(
        text_document=T.TextDocumentIdentifier(uri=uri), position=T.Position(line=ln, character=col)))
    assert loc.uri.endswith("stdlib/deid/ps315.imtrial")

    syms = await client.text_document_document_symbol_async(T.DocumentSymbolParams(
        text_document=T.TextDocumentIdentifier(uri=uri)))
    names = [s.name for s in syms]
    assert {"AMY01", "BOS", "T1w", "FLAIR", "schedule"} <= set(names)
    bos = next(s for s in syms if s.name == "BOS")
    assert [c.name for c in bos.children] == ["BOS_MR1"]

    # formatting is 'imtrial fmt': a badly laid out file comes back canonical
    messy = "protocol   T1w modality MR {match SeriesDescription ~ \"t1\" ; EchoTime in 2 .. 3 ms}\n"
    uri2 = _open(client, tmp_path / "messy.imtrial", messy)
    await _diagnostics(client, uri2)
    edits = await client.text_document_formatting_async(T.DocumentFormattingParams(
        text_document=T.TextDocumentIdentifier(uri=uri2), options=T.FormattingOptions(tab_size=2, insert_spaces=True)))
    from imtrial_dsl.fmt import format_source

    assert len(edits) == 1 and edits[0].new_text == format_source(messy)


@pytest.mark.asyncio
async def test_related_locations_point_at_the_earlier_declaration(client: LanguageClient, tmp_path):
    text = ('protocol T1w modality MR { match SeriesDescription ~ "t1" }\n'
            'protocol T1w modality MR { match SeriesDescription ~ "mprage" }\n')
    uri = _open(client, tmp_path / "dup.imtrial", text)
    diags = await _diagnostics(client, uri)
    dup = next(d for d in diags if d.code == "E310")
    assert dup.related_information and any(r.location.range.start.line == 0 for r in dup.related_information)


def test_check_does_not_import_the_language_server():
    """pygls is loaded by 'imtrial lsp' only: 'imtrial check' stays as fast as it was."""
    import subprocess

    code = ("import sys; from imtrial_dsl.cli import main; main(['check', %r]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pygls', 'lsprotocol', 'argcomplete')))" % str(EXAMPLE))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.stdout.strip().splitlines()[-1] == "[]", p.stdout + p.stderr
