"""Scanner AE titles (``device … { ae_title "…" }``): the worklist and the listener tell scanners apart by them."""
from __future__ import annotations

from .context import Context


def check(ctx: Context) -> None:
    """E874: an AE title DICOM does not allow (1–16 characters, no backslash or control character, not
    only spaces); E875: two devices with one AE title (the worklist could not tell them apart)."""
    first: dict[str, object] = {}
    for _, d in ctx.trial.devices():
        title = d.ae_title
        if title is None:
            continue
        if not (0 < len(title) <= 16) or not title.strip() or "\\" in title or not title.isprintable():
            ctx.error("E874", d, f"device {d.id}: ae_title {title!r} is not a DICOM AE title",
                      "1 to 16 printable characters, no backslash")
            continue
        if title in first:
            prev = getattr(first[title], "span", None)
            ctx.error("E875", d, f"devices {first[title].id} and {d.id} share the AE title {title!r}",
                      "each scanner needs its own AE title" + (f" (first at line {prev.line})" if prev and prev.line else ""))
        else:
            first[title] = d
