"""Generate imtrial_dsl/data/diagnostic_codes.json: every diagnostic code with its meaning, for
``imtrial explain-code``.

Source: the code tables of this repository's manuals, ``docs/diagnostics.md`` (E0xx, E3xx–E9xx, W4xx)
and ``docs/language.md`` (E1xx, E2xx): every Markdown table row whose first cell is a code. The
package reads only the generated file (docs/ is not installed); ``tests/test_cli_help.py`` checks that
it matches the manuals, so a code documented there is explained by the command.

    .venv/bin/python scripts/gen_diagnostic_codes.py [DOCS_DIR] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "imtrial_dsl" / "data" / "diagnostic_codes.json"
PAGES = ("diagnostics.md", "language.md")
_CODE = re.compile(r"^[EW]\d{3}$")


def _cells(line: str) -> list[str]:
    """A table row's cells; a ``|`` inside `code` is text (as GitHub renders ``svg|png``)."""
    cells, cur, in_code = [], "", False
    for ch in line.strip().strip("|"):
        if ch == "`":
            in_code = not in_code
        if ch == "|" and not in_code:
            cells.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return cells + [cur.strip()]


def build(docs: Path) -> dict:
    codes: dict[str, dict] = {}
    for page in PAGES:
        section, header = "", None
        for line in (docs / page).read_text(encoding="utf-8").splitlines():
            if line.startswith("## "):
                section, header = line[3:].strip(), None
            elif line.startswith("|"):
                cells = _cells(line)
                if header is None:
                    header = [c.lower() for c in cells]
                elif _CODE.match(cells[0]):
                    row = dict(zip(header, cells))
                    codes[cells[0]] = {"section": section, "doc": f"docs/{page}",
                                       **{k.replace(" ", "_"): v for k, v in row.items() if k != "code" and v}}
                # the |---| separator row matches neither
            else:
                header = None
    return {"source": "docs/diagnostics.md and docs/language.md (their code tables)",
            "generated_by": "scripts/gen_diagnostic_codes.py", "codes": dict(sorted(codes.items()))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("docs", nargs="?", type=Path, default=ROOT / "docs", help="the folder of the manuals")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    a.out.write_text(json.dumps(build(a.docs), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
