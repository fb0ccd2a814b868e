"""Analyses: inputs name protocols (E301) or other analyses' outputs (E302), command placeholders
(E308), and analyses that depend on each other in a cycle (E406)."""
from __future__ import annotations

import string
from collections import defaultdict

from .. import ir
from ..diagnostics import did_you_mean
from .context import Context
from .names import analysis_member, undefined


def check(ctx: Context) -> None:
    deps: dict[str, list[tuple[str, ir.Ref]]] = defaultdict(list)
    for a in ctx.trial.analyses:
        for inp in a.inputs:
            if inp.protocol is not None and inp.protocol.name not in ctx.protocols:
                other = ctx.analyses.get(inp.protocol.name)
                if other is not None:
                    outs = [o.name for o in other.outputs]
                    ctx.error("E301", inp.protocol, f"undefined protocol '{inp.protocol.name}'",
                              f"'{other.name}' is an analysis: name one of its outputs, e.g. {other.name}.{outs[0] if outs else 'output'}")
                else:
                    undefined(ctx, "E301", inp.protocol, "protocol", ctx.protocols)
            if inp.analysis_output is not None:
                if analysis_member(ctx, inp.analysis_output, "output") is not None:
                    deps[a.name].append((inp.analysis_output.name.partition(".")[0], inp.analysis_output))
        names = {i.name for i in a.inputs} | {o.name for o in a.outputs}
        for arg in a.command:
            try:
                used = [f for _, f, _, _ in string.Formatter().parse(arg) if f is not None]
            except ValueError:
                ctx.error("E308", a, f"unbalanced braces in command argument \"{arg}\" of analysis {a.name}",
                          "write {{ and }} for literal braces")
                continue
            for f in used:
                if f not in names:
                    ctx.error("E308", a, f"unknown placeholder '{{{f}}}' in the command of analysis {a.name}",
                              did_you_mean(f, names) or f"placeholders name inputs and outputs: {', '.join(sorted(names)) or 'none declared'}")
        if not a.command:
            ctx.error("E308", a, f"analysis {a.name} has no command", "add run \"program {input} {output}\"")
    # cycles among analyses (E406)
    import networkx as nx

    g = nx.DiGraph()
    for a, lst in deps.items():
        for b, ref in lst:
            g.add_edge(b, a, ref=ref)
    order = {a.name: i for i, a in enumerate(ctx.trial.analyses)}
    for comp in nx.strongly_connected_components(g):
        if len(comp) == 1 and not any(g.has_edge(n, n) for n in comp):
            continue
        first = min(comp, key=lambda n: order.get(n, 0))
        cyc = [first]
        cur = first
        while True:
            nxt = sorted((s for s in g.successors(cur) if s in comp), key=lambda n: order.get(n, 0))[0]
            if nxt == first or nxt in cyc:
                cyc.append(nxt)
                break
            cyc.append(nxt)
            cur = nxt
        node = ctx.analyses[first]
        ctx.error("E406", node, f"analyses depend on each other in a cycle: {' -> '.join(cyc)}",
                  "an analysis can only consume outputs of analyses that do not need its own output")
