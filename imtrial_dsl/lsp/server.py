"""``imtrial lsp``: the language server (pygls, LSP over stdin/stdout).

Each open document is compiled as it is edited (after a short pause in typing) with the same compiler
``imtrial check`` uses, so the editor shows exactly the diagnostics the command prints, with their codes,
related places and quick fixes for "did you mean" hints. The other features read the parse tree and the
last study that compiled (see :mod:`imtrial_dsl.lsp.analysis` and :mod:`imtrial_dsl.lsp.complete`).
Only ``imtrial lsp`` imports this module (pygls is not loaded by any other command).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

from lsprotocol import types as T
from pygls.lsp.server import LanguageServer

from .. import __version__, ir
from ..diagnostics import Severity
from . import analysis as A
from .complete import complete

DEBOUNCE_S = 0.25
_SEVERITY = {Severity.ERROR: T.DiagnosticSeverity.Error, Severity.WARNING: T.DiagnosticSeverity.Warning,
             Severity.NOTE: T.DiagnosticSeverity.Information}
_COMPLETION_KIND = {"keyword": T.CompletionItemKind.Keyword, "dicom": T.CompletionItemKind.Field,
                    "protocol": T.CompletionItemKind.Class, "site": T.CompletionItemKind.Module,
                    "device": T.CompletionItemKind.Variable, "role": T.CompletionItemKind.Interface,
                    "unit": T.CompletionItemKind.Unit, "option": T.CompletionItemKind.EnumMember,
                    "value": T.CompletionItemKind.Value}
_SYMBOL_KIND = {"protocol": T.SymbolKind.Class, "site": T.SymbolKind.Module, "device": T.SymbolKind.Variable,
                "variant": T.SymbolKind.Method, "schedule": T.SymbolKind.Namespace, "visit": T.SymbolKind.Event,
                "study": T.SymbolKind.Package, "analysis": T.SymbolKind.Function, "qc": T.SymbolKind.Function,
                "role": T.SymbolKind.Interface, "report": T.SymbolKind.File, "transfer": T.SymbolKind.Interface}


@dataclass
class DocState:
    path: str
    index: Optional[A.Index] = None          # from the last text that parsed
    trial: Optional[ir.Trial] = None         # the last study that compiled without syntax errors
    published: set[str] = field(default_factory=set)   # URIs this document's diagnostics went to


def path_of(uri: str) -> str:
    p = urlparse(uri)
    return str(Path(unquote(p.path)).resolve()) if p.scheme == "file" else uri


def uri_of(path: str) -> str:
    return Path(path).as_uri() if path.startswith("/") else path


def _pos(p: A.Pos) -> T.Position:
    return T.Position(line=p[0], character=p[1])


def _range(r: A.Range) -> T.Range:
    return T.Range(start=_pos(r[0]), end=_pos(r[1]))


class ImtrialServer(LanguageServer):
    def __init__(self):
        super().__init__("imtrial", __version__)
        self.docs: dict[str, DocState] = {}
        self.pending: dict[str, asyncio.Task] = {}
        self.imported: dict[tuple[str, float], A.Index] = {}

    # ---------------------------------------------------------------- analysis of one document
    def state(self, uri: str) -> DocState:
        return self.docs.setdefault(uri, DocState(path_of(uri)))

    def validate(self, uri: str) -> None:
        from ..compiler import compile_text
        from ..parser import parse

        st = self.state(uri)
        doc = self.workspace.get_text_document(uri)
        text = doc.source
        tree, _ = parse(text, st.path)
        if tree is not None:
            idx = A.index_tree(tree, st.path)
        else:
            idx = None
        res = compile_text(text, st.path)
        if res.trial is not None and not any(d.code.startswith("E1") for d in res.diagnostics):
            st.trial = res.trial
            if idx is not None:
                for imp in res.trial.imports:
                    if imp.resolved:
                        sub = self.import_index(imp.resolved)
                        if sub is not None:
                            idx.names += sub.names
        if idx is not None:
            st.index = idx
        placed = A.place(res.diagnostics, res.sources, st.index, st.path)
        targets = {uri_of(f): fds for f, fds in placed.items()}
        for gone in st.published - set(targets) - {uri}:
            self.text_document_publish_diagnostics(T.PublishDiagnosticsParams(uri=gone, diagnostics=[]))
        targets.setdefault(uri, [])
        for target, fds in targets.items():
            self.text_document_publish_diagnostics(T.PublishDiagnosticsParams(
                uri=target, version=doc.version if target == uri else None,
                diagnostics=[self.lsp_diagnostic(fd) for fd in fds]))
        st.published = set(targets)

    def import_index(self, path: str) -> Optional[A.Index]:
        from ..parser import parse

        p = Path(path)
        try:
            key = (path, p.stat().st_mtime)
            if key not in self.imported:
                tree, _ = parse(p.read_text(encoding="utf-8"), path)
                self.imported[key] = A.index_tree(tree, path) if tree is not None else A.Index()
        except OSError:
            return None
        return self.imported[key]

    @staticmethod
    def lsp_diagnostic(fd: A.FileDiagnostic) -> T.Diagnostic:
        d = fd.diagnostic
        message = d.message + (f"\nhint: {d.hint}" if d.hint else "")
        related = [T.DiagnosticRelatedInformation(location=T.Location(uri=uri_of(f), range=_range(r)), message=m)
                   for f, r, m in fd.related]
        data = {"fix": {"range": [list(fd.fix[0][0]), list(fd.fix[0][1])], "text": fd.fix[1]}} if fd.fix else None
        return T.Diagnostic(range=_range(fd.range), message=message, severity=_SEVERITY.get(d.severity),
                            code=d.code, source="imtrial", related_information=related or None, data=data)

    def schedule(self, uri: str) -> None:
        """Validate ``uri`` once typing pauses for DEBOUNCE_S."""
        old = self.pending.pop(uri, None)
        if old is not None:
            old.cancel()

        async def later():
            await asyncio.sleep(DEBOUNCE_S)
            self.pending.pop(uri, None)
            self.validate(uri)

        self.pending[uri] = asyncio.ensure_future(later())


server = ImtrialServer()


@server.feature(T.TEXT_DOCUMENT_DID_OPEN)
def did_open(ls: ImtrialServer, params: T.DidOpenTextDocumentParams):
    ls.validate(params.text_document.uri)


@server.feature(T.TEXT_DOCUMENT_DID_CHANGE)
def did_change(ls: ImtrialServer, params: T.DidChangeTextDocumentParams):
    ls.schedule(params.text_document.uri)


@server.feature(T.TEXT_DOCUMENT_DID_SAVE)
def did_save(ls: ImtrialServer, params: T.DidSaveTextDocumentParams):
    ls.validate(params.text_document.uri)


@server.feature(T.TEXT_DOCUMENT_DID_CLOSE)
def did_close(ls: ImtrialServer, params: T.DidCloseTextDocumentParams):
    st = ls.docs.pop(params.text_document.uri, None)
    for uri in (st.published if st else ()):
        ls.text_document_publish_diagnostics(T.PublishDiagnosticsParams(uri=uri, diagnostics=[]))


@server.feature(T.TEXT_DOCUMENT_COMPLETION, T.CompletionOptions(trigger_characters=[" ", ","]))
def completion(ls: ImtrialServer, params: T.CompletionParams):
    st = ls.state(params.text_document.uri)
    text = ls.workspace.get_text_document(params.text_document.uri).source
    items = complete(text, (params.position.line, params.position.character), st.index, st.trial)
    return T.CompletionList(is_incomplete=False, items=[
        T.CompletionItem(label=i.label, kind=_COMPLETION_KIND.get(i.kind, T.CompletionItemKind.Text),
                         detail=i.detail or None, sort_text=f"{i.sort}{i.label}") for i in items])


@server.feature(T.TEXT_DOCUMENT_HOVER)
def hover(ls: ImtrialServer, params: T.HoverParams):
    st = ls.state(params.text_document.uri)
    text = ls.workspace.get_text_document(params.text_document.uri).source
    pos = (params.position.line, params.position.character)
    hit = A.word_at(text, pos)
    if hit is None:
        return None
    word, rng = hit
    md = None
    name = st.index.at(st.path, pos) if st.index else None
    if name is not None:
        md = A.name_hover(st.trial, name)
    elif word in A.dicom_dictionary():
        md = A.dicom_hover(word, st.trial)
    if md is None:
        return None
    return T.Hover(contents=T.MarkupContent(kind=T.MarkupKind.Markdown, value=md), range=_range(rng))


def _name_at(ls: ImtrialServer, params) -> tuple[DocState, Optional[A.Name]]:
    st = ls.state(params.text_document.uri)
    if st.index is None:
        return st, None
    return st, st.index.at(st.path, (params.position.line, params.position.character))


@server.feature(T.TEXT_DOCUMENT_DEFINITION)
def definition(ls: ImtrialServer, params: T.DefinitionParams):
    st, name = _name_at(ls, params)
    if name is None:
        return None
    d = st.index.definition_of(name)
    return T.Location(uri=uri_of(d.file), range=_range(d.range)) if d else None


@server.feature(T.TEXT_DOCUMENT_REFERENCES)
def references(ls: ImtrialServer, params: T.ReferenceParams):
    st, name = _name_at(ls, params)
    if name is None:
        return None
    return [T.Location(uri=uri_of(n.file), range=_range(n.range)) for n in st.index.uses_of(name.kind, name.name)
            if params.context.include_declaration or not n.definition]


@server.feature(T.TEXT_DOCUMENT_DOCUMENT_SYMBOL)
def document_symbols(ls: ImtrialServer, params: T.DocumentSymbolParams):
    st = ls.state(params.text_document.uri)
    if st.index is None:
        ls.validate(params.text_document.uri)
    if st.index is None:
        return []

    def conv(s: A.Symbol) -> T.DocumentSymbol:
        return T.DocumentSymbol(name=s.name, detail=s.kind, kind=_SYMBOL_KIND.get(s.kind, T.SymbolKind.Object),
                                range=_range(s.range), selection_range=_range(s.selection),
                                children=[conv(c) for c in s.children] or None)

    return [conv(s) for s in st.index.symbols]


@server.feature(T.TEXT_DOCUMENT_FORMATTING)
def formatting(ls: ImtrialServer, params: T.DocumentFormattingParams):
    from ..fmt import format_result

    doc = ls.workspace.get_text_document(params.text_document.uri)
    new, _diags = format_result(doc.source, path_of(params.text_document.uri))
    if new is None or new == doc.source:
        return []  # a text with syntax errors is left alone, as 'imtrial fmt' leaves it
    lines = doc.source.split("\n")
    return [T.TextEdit(range=T.Range(start=T.Position(line=0, character=0),
                                     end=T.Position(line=len(lines), character=0)), new_text=new)]


@server.feature(T.TEXT_DOCUMENT_CODE_ACTION, T.CodeActionOptions(code_action_kinds=[T.CodeActionKind.QuickFix]))
def code_actions(ls: ImtrialServer, params: T.CodeActionParams):
    out = []
    for d in params.context.diagnostics:
        fix = (d.data or {}).get("fix") if isinstance(d.data, dict) else None
        if not fix:
            continue
        (l0, c0), (l1, c1) = fix["range"]
        edit = T.TextEdit(range=T.Range(start=T.Position(line=l0, character=c0), end=T.Position(line=l1, character=c1)),
                          new_text=fix["text"])
        out.append(T.CodeAction(title=f"Change to '{fix['text']}'", kind=T.CodeActionKind.QuickFix, diagnostics=[d],
                                is_preferred=True, edit=T.WorkspaceEdit(changes={params.text_document.uri: [edit]})))
    return out


def serve() -> None:
    """Speak LSP on stdin/stdout until the client says exit."""
    server.start_io()
