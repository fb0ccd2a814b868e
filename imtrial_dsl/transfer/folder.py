"""Folder destination: a verified copy under ``PATH/<subject>/<visit>/<series_uid>/``."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional

from .destinations import Endpoint
from .objects import Item
from .sender import Result, Sink


def send_folder(ep: Endpoint, items: list[Item], base: Optional[Path], emit: Callable[[Result], None],
                log: Callable[[str], None]) -> None:
    """Copy to ``PATH/<subject>/<visit>/<series_uid>/<sop_uid>.dcm`` (temp file, fsync, rename, verify)."""
    root = Path(ep.path).expanduser()
    if not root.is_absolute() and base is not None:
        root = base / root
    out = Sink(emit)

    def safe(part: Any, fallback: str) -> str:
        s = re.sub(r"[^A-Za-z0-9._-]", "_", str(part or "")).strip(".")
        return s or fallback

    try:
        for it in items:
            m = it.meta
            dest = root / safe(m.get("subject"), "unknown") / safe(m.get("visit"), "unscheduled") / \
                safe(m.get("series_uid"), "series") / f"{safe(it.sop_uid, it.sha256)}.dcm"
            try:
                replaces = None
                if dest.exists():
                    there = hashlib.sha256(dest.read_bytes()).hexdigest()
                    if there == it.sha256:
                        out.add(it.sha256, "sent", {"reason": "already present", "file": str(dest),
                                                    "acknowledged": it.sop_uid})
                        continue
                    if there != m.get("supersedes"):
                        out.add(it.sha256, "failed", {"reason": f"{dest} exists with different content; not overwritten"})
                        continue
                    replaces = there  # the earlier version of this instance, which this one corrects
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")  # hidden: a folder watcher ignores it
                with open(tmp, "wb") as fh:
                    fh.write(it.path.read_bytes())
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, dest)
                if hashlib.sha256(dest.read_bytes()).hexdigest() == it.sha256:
                    out.add(it.sha256, "sent", {"reason": "copied" + (" (replaced the earlier version)" if replaces else ""),
                                                "file": str(dest), "acknowledged": it.sop_uid})
                else:
                    out.add(it.sha256, "failed", {"reason": "copy verification failed (sha256 differs)"})
            except OSError as exc:
                out.add(it.sha256, "failed", {"reason": f"copy failed: {exc.strerror or exc}"})
    finally:
        out.flush()
    log(f"transfer: copied {len(items)} instance(s) to {root}")
