"""``imtrial pull``: fetch what sites pushed to a relay outside the central firewall."""
from __future__ import annotations


def register(sub) -> None:
    pass
