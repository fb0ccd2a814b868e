"""Transfer destinations: credentials (E316), relays to declared destinations (E304) without loops (E409)."""
from __future__ import annotations

from .context import Context
from .identifiers import key
from .names import undefined


def check(ctx: Context) -> None:
    for d in ctx.trial.transfers:
        key(ctx, d.auth, f"transfer {d.name} credentials")
        if d.relay is not None and d.relay.name not in ctx.destinations:
            undefined(ctx, "E304", d.relay, "transfer destination", ctx.destinations)
    reported: set[frozenset] = set()
    for d in ctx.trial.transfers:
        chain = [d.name]
        cur = d
        while cur.relay is not None and cur.relay.name in ctx.destinations:
            nxt = cur.relay.name
            if nxt in chain:
                loop = chain[chain.index(nxt):]
                if frozenset(loop) not in reported:
                    reported.add(frozenset(loop))
                    first = ctx.destinations[loop[0]]
                    ctx.error("E409", first.relay, f"transfer relays form a loop: {' -> '.join(loop + [loop[0]])}",
                              "a relay must lead to a final destination")
                break
            chain.append(nxt)
            cur = ctx.destinations[nxt]
