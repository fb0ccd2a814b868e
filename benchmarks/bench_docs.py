"""Documents benchmark: `imtrial export docs` per example, split by stage.

For each example: compile (parse, check, graph), the graphviz pictures (`dot`, a child process), Markdown and
HTML (jinja + markdown-it), and the PDFs (WeasyPrint), as wall-clock seconds and as CPU seconds (this process
plus its children), best of N runs, in a fresh output folder each time. Prints a Markdown table.
Run on demand:  .venv/bin/python benchmarks/bench_docs.py [--runs 3] [--examples amyloid_mri ...]
Goal (issue 12): the whole export under 5 s per example.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class Clock:
    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def stage(self, name: str, fn, *a, **kw):
        w0, c0 = time.perf_counter(), _cpu()
        out = fn(*a, **kw)
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w0
        self.cpu[name] = self.cpu.get(name, 0.0) + _cpu() - c0
        return out


def one(example: Path) -> Clock:
    from imtrial_dsl.compiler import compile_file
    from imtrial_dsl.exporters import docs

    clk = Clock()
    res = clk.stage("compile", compile_file, example)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "par").mkdir()
        doc = clk.stage("model", docs.build, res.trial, res.graph)
        svgs, _ = clk.stage("graphviz", docs.graph_pictures, res.graph)
        pages = []
        for kind in docs.DOCUMENTS:
            text = clk.stage("markdown+html", docs.render_markdown, doc, kind, svgs)
            pages.append((kind, clk.stage("markdown+html", docs.render_html, doc, kind, text, svgs)))
        for kind, page in pages:          # one after the other: each document's own cost
            clk.stage(f"pdf:{kind}", docs.render_pdf, page, out / f"{kind}.pdf", out)
        clk.stage("pdf (side by side)", docs.render_pdfs, pages, out / "par")
    return clk


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--examples", nargs="*", default=["amyloid_mri", "oncology_ct", "phantom_qualification"])
    args = ap.parse_args()
    from imtrial_dsl import extras

    extras.load("weasyprint", "the documents benchmark")   # import once, outside the timings (like a warm CLI)
    import os

    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; CPU s (wall s), best of {args.runs}")
    print("| example | compile | model | graphviz | markdown+html | PDF charter | PDF site manual | "
          "PDFs one after the other | PDFs side by side (wall) | export CPU, PDFs sequential | critical path on 2 idle cores |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.examples:
        best = None
        for _ in range(args.runs):
            clk = one(ROOT / "examples" / f"{name}.imtrial")
            if best is None or sum(clk.cpu.values()) < sum(best.cpu.values()):
                best = clk
        c, w = best.cpu, best.wall
        pre = sum(c[k] for k in ("compile", "model", "graphviz", "markdown+html"))
        seq = c["pdf:charter"] + c["pdf:site_manual"]
        cells = [f"{c[k]:.2f} ({w[k]:.2f})" for k in ("compile", "model", "graphviz", "markdown+html", "pdf:charter",
                                                     "pdf:site_manual")]
        print(f"| {name} | " + " | ".join(cells) + f" | {seq:.2f} | {w['pdf (side by side)']:.2f} | {pre + seq:.2f} | "
              f"{pre + max(c['pdf:charter'], c['pdf:site_manual']):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
