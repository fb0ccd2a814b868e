"""Canonical layout of ``.imtrial`` source: ``imtrial fmt``.

Two-space indent, one statement per line, single spaces between tokens (none inside
``PixelSpacing[0]``, ``snr(min = 10)``, ``a.b``, ``1%``), ``;`` separators dropped, at
most one blank line kept where the author left one. Comments are kept: a comment after
code stays at the end of the line holding that code, other comments stay before the
statement that follows them. Tokens are printed as written, so formatting never changes
the meaning: ``lower(parse(fmt(x))) == lower(parse(x))`` up to positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from lark import Token, Tree

from .diagnostics import CompileErrors, Diagnostic
from .parser import parse_with_comments

INDENT = "  "

# Rules that start a line of their own.
STATEMENTS = frozenset("""
import_stmt study site protocol schedule deidentify identifiers qc analysis transfer archive role report
qualification deid_profile
study_prop arms endpoint contact irb timezone device dev_modality dev_vendor dev_text dev_software dev_field dev_coils
dev_agreement proto_text match_rule constraint variant remove visit same_device remind escalate deid_attrs
replace key date_shift blank burned_in profile_rule id_subject id_check id_source id_issuer id_reid an_input
an_output an_run an_measure an_timeout an_description an_env ar_path ar_retention ar_keep ar_hash sections
q_protocols q_phantom q_requalify when scope
""".split())

# Rules whose "{ ... }" is a block of statements (a set literal's braces are not).
BLOCKS = frozenset("""
study site device protocol variant schedule deidentify deid_profile identifiers analysis archive report
qualification when
""".split())

# reads (image interpretation) and document control
STATEMENTS |= frozenset("""
read rd_images rd_timepoints rd_readers rd_text rd_blinded rd_paradigm rd_adjudicate rd_criteria rd_window
rd_variability changelog cl_version cl_approver
""".split())
BLOCKS |= frozenset(("read", "changelog"))

_NO_SPACE_BEFORE = {",", ")", "]", "."}
_NO_SPACE_AFTER = {"(", "[", ".", "{"}


@dataclass
class _Line:
    depth: int
    tokens: list[Token] = field(default_factory=list)
    leading: list[Token] = field(default_factory=list)
    trailing: list[Token] = field(default_factory=list)


class _Printer:
    def __init__(self):
        self.lines: list[_Line] = []
        self.owner: dict[int, int] = {}  # id(token) -> line index

    def new_line(self, depth: int) -> None:
        if self.lines and not self.lines[-1].tokens:
            self.lines[-1].depth = depth
            return
        self.lines.append(_Line(depth))

    def emit(self, tok: Token) -> None:
        if not self.lines:
            self.lines.append(_Line(0))
        self.owner[id(tok)] = len(self.lines) - 1
        self.lines[-1].tokens.append(tok)

    def walk(self, node, depth: int) -> None:
        if isinstance(node, Token):
            if node.type != "SEMICOLON":
                self.emit(node)
            return
        if node.data in STATEMENTS:
            self.new_line(depth)
        inner = depth
        block = node.data in BLOCKS
        for child in node.children:
            if child is None:
                continue
            if block and isinstance(child, Token) and child.type == "LBRACE":
                self.emit(child)
                inner = depth + 1
                self.new_line(inner)
                continue
            if block and isinstance(child, Token) and child.type == "RBRACE":
                cur = self.lines[-1]
                if not cur.tokens and len(self.lines) >= 2 and self.lines[-2].tokens[-1].type == "LBRACE":
                    self.lines.pop()  # empty block: "{}"
                else:
                    self.new_line(depth)
                self.emit(child)
                inner = depth
                continue
            self.walk(child, inner)


def _join(tokens: list[Token]) -> str:
    out: list[str] = []
    prev: Optional[Token] = None
    for t in tokens:
        s = str(t)
        if prev is not None:
            p = str(prev)
            tight = (
                s in _NO_SPACE_BEFORE
                or p in _NO_SPACE_AFTER
                or t.type == "RBRACE"  # only a set literal or an empty block closes mid-line
                or (t.type == "UNIT" and s == "%")
                or (s == "(" and prev.type in ("NAME", "ATTR"))
                or (s == "[" and prev.type in ("ATTR", "TAG", "STRING"))  # STRING: a private field, "B_value"[0]
            )
            if not tight:
                out.append(" ")
        out.append(s)
        prev = t
    return "".join(out)


def _comment_text(c: Token) -> str:
    return str(c).rstrip()


def format_tree(tree: Tree, comments: list[Token]) -> str:
    """Lay out a keep-all-tokens tree, re-attaching comment tokens by position."""
    pr = _Printer()
    pr.walk(tree, 0)
    lines = [ln for ln in pr.lines if ln.tokens]
    index = {id(ln): i for i, ln in enumerate(lines)}
    owner = {tid: index[id(pr.lines[i])] for tid, i in pr.owner.items() if id(pr.lines[i]) in index}

    code = sorted((t for ln in lines for t in ln.tokens), key=lambda t: t.start_pos)
    items = sorted(code + list(comments), key=lambda t: t.start_pos)
    prev_end: dict[int, int] = {}
    last_line = None
    for it in items:
        prev_end[id(it)] = last_line if last_line is not None else it.line
        last_line = it.end_line or it.line
    tail: list[Token] = []
    for pos, it in enumerate(items):
        if it.type != "COMMENT":
            continue
        before = next((items[j] for j in range(pos - 1, -1, -1) if items[j].type != "COMMENT"), None)
        after = next((items[j] for j in range(pos + 1, len(items)) if items[j].type != "COMMENT"), None)
        if before is not None and (before.end_line or before.line) == it.line:
            lines[owner[id(before)]].trailing.append(it)
        elif after is not None:
            lines[owner[id(after)]].leading.append(it)
        else:
            tail.append(it)

    out: list[str] = []

    def blank_before(anchor: Token) -> bool:
        return anchor.line - prev_end.get(id(anchor), anchor.line) >= 2

    def put(text: str, anchor: Token, allow_blank: bool) -> None:
        if out and allow_blank and blank_before(anchor) and out[-1] != "" and not out[-1].endswith("{"):
            out.append("")
        out.append(text)

    for ln in lines:
        closing = len(ln.tokens) == 1 and ln.tokens[0].type == "RBRACE"
        cdepth = ln.depth + 1 if closing else ln.depth
        for c in ln.leading:
            put(INDENT * cdepth + _comment_text(c), c, True)
        text = INDENT * ln.depth + _join(ln.tokens)
        if ln.trailing:
            text += "  " + "  ".join(_comment_text(c) for c in ln.trailing)
        put(text, ln.tokens[0], not closing)
    for c in tail:
        put(_comment_text(c), c, True)
    return "\n".join(out) + "\n" if out else ""


def format_result(text: str, filename: str = "<string>") -> tuple[Optional[str], list[Diagnostic]]:
    """(formatted text, []) or (None, syntax diagnostics)."""
    tree, comments, diags = parse_with_comments(text, filename)
    if diags or tree is None:
        return None, diags
    return format_tree(tree, comments), []


def format_source(text: str, filename: str = "<string>") -> str:
    """The canonical layout of ``text``; raises :class:`CompileErrors` if it does not parse."""
    out, diags = format_result(text, filename)
    if out is None:
        raise CompileErrors(diags)
    return out
