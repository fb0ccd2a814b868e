"""What every check reads and writes: the trial, its declarations by name, the diagnostics found so far."""
from __future__ import annotations

from typing import Any, Optional

from .. import ir
from ..diagnostics import SHOWN_PER_CODE, Diagnostic, Severity, Span


class Context:
    def __init__(self, trial: ir.Trial) -> None:
        self.trial = trial
        self.diags: list[Diagnostic] = []
        self.omitted: dict[str, int] = {}  # code -> diagnostics a check counted without building them
        self.counts: dict[str, int] = {}   # code -> diagnostics recorded so far
        self.protocols = {p.name: p for p in trial.protocols}
        self.analyses = {a.name: a for a in trial.analyses}
        self.roles = {r.name: r for r in trial.roles}
        self.destinations = {d.name: d for d in trial.transfers}

    def add(self, sev: Severity, code: str, node: Any, message: str, hint: Optional[str]) -> None:
        """Record a diagnostic at ``node`` (an IR node or a Span)."""
        span = node if isinstance(node, Span) or node is None else getattr(node, "span", None)
        self.counts[code] = self.counts.get(code, 0) + 1
        self.diags.append(Diagnostic(severity=sev, code=code, message=message, span=span, hint=hint))

    def error(self, code: str, node: Any, message: str, hint: Optional[str]) -> None:
        self.add(Severity.ERROR, code, node, message, hint)

    def warning(self, code: str, node: Any, message: str, hint: Optional[str]) -> None:
        self.add(Severity.WARNING, code, node, message, hint)

    def omit(self, code: str, n: int) -> None:
        """Count ``n`` more diagnostics of ``code`` that a check did not build (past the cap, see ``diagnostics.cap``)."""
        self.omitted[code] = self.omitted.get(code, 0) + n

    def many(self, code: str) -> bool:
        """True once ``code`` was recorded well past what is shown of it: a check may then skip an expensive
        hint (a did-you-mean over every name), since the diagnostic will be summarized, not shown."""
        return self.counts.get(code, 0) >= 3 * SHOWN_PER_CODE
