"""What the language server knows about a document, as plain values (no LSP types, no I/O to the editor).

Positions here are 0-based (line, character), as LSP counts them; the compiler's spans are 1-based and
are converted at this boundary only. Names and their places come from the parse tree (the tokens carry
exact positions), so definitions, references and the outline work on the text being edited; meanings
(effective constraints, de-identification) come from the compiled study.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

from lark import Token, Tree

from .. import ir
from ..diagnostics import Diagnostic, Severity, Span

Pos = tuple[int, int]            # (line, character), 0-based
Range = tuple[Pos, Pos]

# --------------------------------------------------------------------------- names in the parse tree

# rule -> kind of the name its first NAME token defines
DEFINES = {"protocol": "protocol", "site": "site", "device": "device", "visit": "visit", "qc": "qc",
           "analysis": "analysis", "transfer": "transfer", "role": "role", "report": "report",
           "deid_profile": "profile", "endpoint": "endpoint", "study": "study"}
KIND_WORDS = {"protocol": "protocol", "site": "site", "device": "device", "visit": "visit", "qc": "QC check",
              "analysis": "analysis", "transfer": "transfer destination", "role": "role", "report": "report",
              "profile": "de-identification profile", "endpoint": "endpoint", "study": "study",
              "output": "analysis output", "measurement": "measurement"}


@dataclass(frozen=True)
class Name:
    """One written name: its kind ("protocol", …), the name (``analysis.output`` qualified), where it is."""

    kind: str
    name: str
    file: str
    range: Range
    definition: bool


@dataclass
class Symbol:
    """An outline entry: a declaration with its whole extent and the range of its name."""

    kind: str
    name: str
    range: Range
    selection: Range
    children: list["Symbol"] = field(default_factory=list)


@dataclass
class Index:
    """The names of one file (and of the files it imports) with their places, and its outline."""

    names: list[Name] = field(default_factory=list)
    symbols: list[Symbol] = field(default_factory=list)
    imports: list[str] = field(default_factory=list)   # resolved paths

    def definitions(self, kind: Optional[str] = None) -> list[Name]:
        return [n for n in self.names if n.definition and (kind is None or n.kind == kind)]

    def at(self, file: str, pos: Pos) -> Optional[Name]:
        """The name written at ``pos`` of ``file``."""
        for n in self.names:
            if n.file == file and _inside(pos, n.range):
                return n
        return None

    def definition_of(self, name: Name) -> Optional[Name]:
        return next((d for d in self.definitions(name.kind) if d.name == name.name), None)

    def uses_of(self, kind: str, name: str) -> list[Name]:
        return [n for n in self.names if n.kind == kind and n.name == name]


def _inside(pos: Pos, r: Range) -> bool:
    return r[0] <= pos <= r[1]


def tok_range(t: Token) -> Range:
    return (t.line - 1, t.column - 1), (t.end_line - 1, t.end_column - 1)


def _tree_range(t: Tree) -> Optional[Range]:
    m = t.meta
    if getattr(m, "empty", True):
        return None
    return (m.line - 1, m.column - 1), (m.end_line - 1, m.end_column - 1)


def _names_tokens(t: Optional[Tree]) -> list[Token]:
    if t is None:
        return []
    return [c for c in t.children if isinstance(c, Token) and c.type == "NAME"]


def index_tree(tree: Tree, file: str) -> Index:
    """Every definition and reference of ``tree`` (parsed from ``file``), and its outline."""
    idx = Index()
    add = idx.names.append

    def ref(kind: str, tok: Token, name: Optional[str] = None) -> None:
        add(Name(kind, name or str(tok), file, tok_range(tok), False))

    def define(kind: str, tok: Token, name: Optional[str] = None) -> None:
        add(Name(kind, name or str(tok), file, tok_range(tok), True))

    for item in tree.children:
        if not isinstance(item, Tree):
            continue
        idx.symbols += _symbols(item)
    for t in tree.iter_subtrees_topdown():
        d = t.data
        first = next((c for c in t.children if isinstance(c, Token) and c.type == "NAME"), None)
        if d in DEFINES and first is not None and d != "endpoint":
            define(DEFINES[d], first)
        if d == "endpoint" and first is not None:
            define("endpoint", first)
            r = next((c for c in t.children if isinstance(c, Tree) and c.data == "ref"), None)
            parts = _names_tokens(r)
            if len(parts) == 2:
                ref("analysis", parts[0])
                ref("measurement", parts[1], f"{parts[0]}.{parts[1]}")
        elif d == "analysis" and first is not None:
            for c in t.children:
                if isinstance(c, Tree) and c.data in ("an_output", "an_measure"):
                    tok = _names_tokens(c)[0]
                    define("output" if c.data == "an_output" else "measurement", tok, f"{first}.{tok}")
        elif d in ("acq_item", "q_protocols") or (d == "qc_protocols"):
            for tok in (_names_tokens(t) if d == "acq_item" else [x for c in t.children if isinstance(c, Tree)
                                                                    for x in _names_tokens(c)]):
                ref("protocol", tok)
        elif d == "an_input":
            r = next((c for c in t.children if isinstance(c, Tree) and c.data == "ref"), None)
            parts = _names_tokens(r)
            if len(parts) == 1:
                ref("protocol", parts[0])
            elif len(parts) == 2:
                ref("analysis", parts[0])
                ref("output", parts[1], f"{parts[0]}.{parts[1]}")
        elif d == "audience" and first is not None:
            ref("role", first)
        elif d == "transfer_opt" and t.children and str(t.children[0]) == "via":
            ref("transfer", t.children[1])
        elif d == "deidentify" and first is not None:
            ref("profile", first)
    return idx


_SYMBOL_CHILDREN = {"site": ("device",), "protocol": ("variant",), "schedule": ("visit",),
                    "analysis": ("an_input", "an_output", "an_measure"), "study": ("endpoint",)}


def _symbols(t: Tree) -> list[Symbol]:
    r = _tree_range(t)
    data = str(t.data)
    if r is None or data == "import_stmt":
        return []
    first = next((c for c in t.children if isinstance(c, Token) and c.type == "NAME"), None)
    if data == "variant":
        vend = next((c for c in t.children if isinstance(c, Tree) and c.data == "vendor"), None)
        words = [str(x).strip('"') for x in (vend.children if vend else [])] + \
                [str(c).strip('"') for c in t.children if isinstance(c, Token) and c.type == "STRING"]
        name, sel = "variant " + " ".join(words), (r[0], r[0])
    elif first is not None:
        name, sel = str(first), tok_range(first)
    else:
        name, sel = data, (r[0], r[0])
    sym = Symbol(data, name, r, sel)
    for c in t.children:
        if isinstance(c, Tree) and c.data in _SYMBOL_CHILDREN.get(data, ()):
            sym.children += _symbols(c)
    return [sym]


# --------------------------------------------------------------------------- diagnostics

def span_range(s: Optional[Span], text_lines: Optional[list[str]] = None) -> Range:
    """A compiler span (1-based, end exclusive) as an LSP range; a point span covers the word there."""
    if s is None or s.line <= 0:
        return (0, 0), (0, 1)
    start = (s.line - 1, max(s.col - 1, 0))
    if s.end_line > 0 and (s.end_line, s.end_col) > (s.line, s.col):
        return start, (s.end_line - 1, max(s.end_col - 1, 0))
    if text_lines is not None and 0 <= start[0] < len(text_lines):
        m = re.match(r"[A-Za-z0-9_]+", text_lines[start[0]][start[1]:])
        if m:
            return start, (start[0], start[1] + len(m.group(0)))
    return start, (start[0], start[1] + 1)


_DYM = re.compile(r"did you mean '([^']+)'\?")
_NOT_KW = re.compile(r"'([A-Za-z_]\w*)' is not a keyword here")
_AT_LINE = re.compile(r"(?:at|first given at) line (\d+)")


@dataclass
class FileDiagnostic:
    """A diagnostic placed in one file, with what the editor needs besides the message."""

    diagnostic: Diagnostic
    range: Range
    related: list[tuple[str, Range, str]] = field(default_factory=list)   # (file, range, message)
    fix: Optional[tuple[Range, str]] = None                               # replace range with text

    @property
    def severity(self) -> Severity:
        return self.diagnostic.severity


def place(diags: Iterable[Diagnostic], sources: dict[str, str], idx: Optional[Index],
          default_file: str) -> dict[str, list[FileDiagnostic]]:
    """Diagnostics grouped by the file (resolved path) they are in, with ranges, related places and fixes."""
    out: dict[str, list[FileDiagnostic]] = {}
    lines_of: dict[str, list[str]] = {}
    for d in diags:
        name = d.span.file if d.span else default_file
        file = resolve(name)
        text = sources.get(name)
        if file not in lines_of:
            lines_of[file] = text.splitlines() if text is not None else []
        lines = lines_of[file]
        fd = FileDiagnostic(d, span_range(d.span, lines))
        _relate(fd, file, lines, idx)
        fd.fix = _fix(fd, lines)
        out.setdefault(file, []).append(fd)
    return out


def _relate(fd: FileDiagnostic, file: str, lines: list[str], idx: Optional[Index]) -> None:
    d = fd.diagnostic
    for m in _AT_LINE.finditer(d.message + " " + (d.hint or "")):
        n = int(m.group(1)) - 1
        if 0 <= n < len(lines):
            fd.related.append((file, ((n, 0), (n, len(lines[n]))), "the earlier one"))
    if idx is None:
        return
    here = fd.range[0][0]
    for word in dict.fromkeys(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", d.message)):
        for defn in idx.definitions():
            if defn.name == word and defn.kind in ("protocol", "analysis", "role", "transfer", "site", "device") \
                    and not (defn.file == file and defn.range[0][0] == here):
                fd.related.append((defn.file, defn.range, f"{KIND_WORDS[defn.kind]} {word} is defined here"))


def _fix(fd: FileDiagnostic, lines: list[str]) -> Optional[tuple[Range, str]]:
    """The replacement a "did you mean" hint proposes: the word the diagnostic points at, or the misspelt
    keyword before it that the parser names."""
    m = _DYM.search(fd.diagnostic.hint or "")
    if not m:
        return None
    suggestion = m.group(1)
    (l0, c0), (l1, c1) = fd.range
    bad = _NOT_KW.search(fd.diagnostic.hint or "")
    if bad and 0 <= l0 < len(lines):
        # the misspelt keyword was taken as a name; the error landed on the token after it
        for ln in range(l0, max(l0 - 3, -1), -1):
            text = lines[ln][: c0] if ln == l0 else lines[ln]
            hit = [mm for mm in re.finditer(rf"\b{re.escape(bad.group(1))}\b", text)]
            if hit:
                h = hit[-1]
                return ((ln, h.start()), (ln, h.end())), suggestion
        return None
    if l0 == l1 and 0 <= l0 < len(lines) and c1 > c0:
        return fd.range, suggestion
    return None


def resolve(name: str) -> str:
    """A span's file name (relative to the working folder, as the loader writes it) as an absolute path."""
    if name.startswith("<"):
        return name
    return str(Path(name).resolve())


# --------------------------------------------------------------------------- DICOM keywords, units

@lru_cache(maxsize=1)
def dicom_dictionary() -> dict[str, tuple[str, str, str, str, bool]]:
    """keyword -> (tag, VR, VM, name, retired), from pydicom's data dictionary (DICOM PS3.6)."""
    from pydicom.datadict import DicomDictionary

    out = {}
    for tag, (vr, vm, name, retired, kw) in DicomDictionary.items():
        if kw and tag >> 16 not in (0x0000, 0x0002):  # command and file-meta elements are not in a study's headers
            out[kw] = (f"({tag >> 16:04X},{tag & 0xFFFF:04X})", vr, vm, name, bool(retired))
    return out


def unit_of(keyword: str) -> Optional[tuple[str, str]]:
    """(dimension, unit the header stores it in) for attributes with a physical unit."""
    from ..units import DICOM_UNITS

    return DICOM_UNITS.get(keyword)


def units_for(dimension: Optional[str]) -> list[str]:
    from ..units import UNITS

    return [u for u, (dim, _) in UNITS.items() if dimension is None or dim == dimension]


def dicom_detail(keyword: str) -> Optional[str]:
    """One line for a completion item: VR, VM and unit."""
    e = dicom_dictionary().get(keyword)
    if e is None:
        return None
    u = unit_of(keyword)
    unit = f", unit {u[1]}" if u and u[1] else ""
    return f"{e[0]} VR {e[1]}, VM {e[2]}{unit}" + (" (retired)" if e[4] else "")


def dicom_hover(keyword: str, trial: Optional[ir.Trial]) -> Optional[str]:
    """What a DICOM keyword means, where imtrial reads it from, and what the study does with it."""
    from ..runner.dicomio import ALIASES

    e = dicom_dictionary().get(keyword)
    if e is None:
        return None
    tag, vr, vm, name, retired = e
    u = unit_of(keyword)
    out = [f"**{keyword}** — {name}" + (" *(retired)*" if retired else ""), "",
           f"Tag `{tag}`, VR `{vr}`, VM `{vm}`" + (f", stored in **{u[1]}** ({u[0]})" if u and u[1] else ""), "",
           "Read from the top level of the header, else from the Shared and then the Per-frame Functional "
           "Groups (Enhanced objects)"
           + (f"; also found as {', '.join(ALIASES[keyword])}" if keyword in ALIASES else "") + "."]
    if trial is not None:
        used = [p.name for p in trial.protocols
                if any(c.keyword == keyword for c in p.constraints) or any(m.attribute == keyword for m in p.match)
                or any(c.keyword == keyword for v in p.variants for c in v.constraints)]
        if used:
            out += ["", "Constrained or matched by: " + ", ".join(used)]
        deid = _deid_action(trial, keyword)
        if deid:
            out += ["", deid]
    return "\n".join(out)


def _deid_action(trial: ir.Trial, keyword: str) -> Optional[str]:
    from ..deid.plan import resolve_action

    d = trial.deidentify
    if d is None:
        return None
    over = next((o for o in d.overrides if o.attribute == keyword), None)
    if over is not None:
        return f"De-identification: `{over.action}` (override in this study)"
    prof = trial.profile(d.profile.name)
    rule = next((r for r in (prof.rules if prof else []) if r.keyword == keyword), None)
    if rule is None:
        return f"De-identification: not in profile {d.profile.name} (kept)"
    action, option = resolve_action(rule, [o.value for o in d.options])
    return (f"De-identification: action `{action}` under {d.profile.name}"
            + (f" (decided by option {option})" if option else " (basic profile)"))


# --------------------------------------------------------------------------- protocols on devices

def protocol_hover(trial: ir.Trial, name: str) -> Optional[str]:
    """A protocol and, per device of its modality, the constraints that apply there (the chosen variant)."""
    from .. import source

    p = trial.protocol(name)
    if p is None:
        return None
    out = [f"**protocol {p.name}** ({p.modality})" + (f" — {p.title}" if p.title else "")]
    if p.match:
        out += ["", "Selects series where " + " and ".join(f"`{m.attribute} {_OPS[m.op.value]} {source.quote(m.value)}`"
                                                         for m in p.match)]
    devices = [(s, d) for s, d in trial.devices() if d.acquires(p.modality)]
    if not devices:
        out += ["", "No device of modality " + p.modality + " in the inventory."]
    for s, d in devices:
        cons, var = ir.effective_constraints(p, d.vendor, d.software, d.model)
        which = "base constraints" if var is None else "variant " + " ".join(
            x for x in (var.vendor_text or var.vendor, var.model and f"model {var.model}",
                        var.software and f"software {var.software}") if x)
        out += ["", f"**{s.code}/{d.id}** ({d.vendor}{' ' + d.model if d.model else ''}"
                    f"{', ' + d.software if d.software else ''}): {which}"]
        out += [f"- `{source.constraint(c)}`" for c in cons] or ["- (no constraints)"]
    return "\n".join(out)


_OPS = {"matches": "~", "equals": "=", "contains": "has", "not_matches": "!~"}


def device_hover(trial: ir.Trial, name: str) -> Optional[str]:
    hit = next(((s, d) for s, d in trial.devices() if d.id == name), None)
    if hit is None:
        return None
    s, d = hit
    prots = [p.name for p in trial.protocols if d.acquires(p.modality)]
    lines = [f"**device {d.id}** at {s.code}: {'/'.join(d.all_modalities())}, {d.vendor}"
             + (f" {d.model}" if d.model else "") + (f", software {d.software}" if d.software else "")]
    for pn in prots:
        p = trial.protocol(pn)
        _, var = ir.effective_constraints(p, d.vendor, d.software, d.model)
        lines.append(f"- {pn}: " + ("base constraints" if var is None else
                                    f"variant {var.vendor_text or var.vendor}"
                                    + (f" software {var.software}" if var.software else "")))
    return "\n".join(lines)


def name_hover(trial: Optional[ir.Trial], name: Name) -> Optional[str]:
    if trial is not None:
        if name.kind == "protocol":
            return protocol_hover(trial, name.name)
        if name.kind == "device":
            return device_hover(trial, name.name)
    return f"{KIND_WORDS.get(name.kind, name.kind)} **{name.name}**"


# --------------------------------------------------------------------------- text helpers

def offset_of(text: str, pos: Pos) -> int:
    lines = text.split("\n")
    line = min(pos[0], len(lines) - 1)
    return sum(len(x) + 1 for x in lines[:line]) + min(pos[1], len(lines[line]))


def word_at(text: str, pos: Pos) -> Optional[tuple[str, Range]]:
    lines = text.split("\n")
    if not 0 <= pos[0] < len(lines):
        return None
    line = lines[pos[0]]
    for m in re.finditer(r"[A-Za-z_][A-Za-z0-9_]*", line):
        if m.start() <= pos[1] <= m.end():
            return m.group(0), ((pos[0], m.start()), (pos[0], m.end()))
    return None
