"""A minimal iCalendar (RFC 5545) writer for visit windows.

Written by hand: the subset needed (VCALENDAR/VEVENT/VALARM with all-day dates) is small,
and owning it keeps the bytes deterministic (stable UIDs, DTSTAMP from the as-of date) with
no extra dependency. Lines end in CRLF and are folded at 75 octets (RFC 5545 §3.1); TEXT
values are escaped per §3.3.11.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from typing import Iterable, Optional

PRODID = "-//imtrial//imtrial operations//EN"


def escape_text(s: str) -> str:
    return (s.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,")
            .replace("\r\n", "\\n").replace("\n", "\\n"))


def fold(line: str) -> str:
    """Fold one content line at 75 octets without splitting a UTF-8 character."""
    out, cur, size = [], [], 0
    for ch in line:
        n = len(ch.encode("utf-8"))
        limit = 75 if not out else 74  # continuation lines start with one space
        if size + n > limit:
            out.append("".join(cur))
            cur, size = [], 0
        cur.append(ch)
        size += n
    out.append("".join(cur))
    return "\r\n ".join(out)


@dataclass
class Event:
    uid: str
    start: date                      # all-day, inclusive
    end: date                        # all-day, inclusive (written as exclusive DTEND = end + 1)
    summary: str
    description: str = ""
    categories: tuple[str, ...] = ()
    alarm_days_before: Optional[int] = None


def calendar(events: Iterable[Event], stamp: date, name: str = "") -> str:
    """The .ics text (CRLF line ends). ``stamp`` gives DTSTAMP so output depends only on inputs."""
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", f"PRODID:{PRODID}", "CALSCALE:GREGORIAN", "METHOD:PUBLISH"]
    if name:
        lines.append(f"X-WR-CALNAME:{escape_text(name)}")
    for ev in sorted(events, key=lambda e: (e.start, e.uid)):
        lines += [
            "BEGIN:VEVENT",
            f"UID:{ev.uid}",
            f"DTSTAMP:{stamp.strftime('%Y%m%d')}T000000Z",
            f"DTSTART;VALUE=DATE:{ev.start.strftime('%Y%m%d')}",
            f"DTEND;VALUE=DATE:{(ev.end + timedelta(days=1)).strftime('%Y%m%d')}",
            f"SUMMARY:{escape_text(ev.summary)}",
        ]
        if ev.description:
            lines.append(f"DESCRIPTION:{escape_text(ev.description)}")
        if ev.categories:
            lines.append("CATEGORIES:" + ",".join(escape_text(c) for c in ev.categories))
        lines.append("TRANSP:TRANSPARENT")
        if ev.alarm_days_before is not None:
            lines += ["BEGIN:VALARM", "ACTION:DISPLAY", f"DESCRIPTION:{escape_text(ev.summary)}",
                      f"TRIGGER;RELATED=START:-P{int(ev.alarm_days_before)}D", "END:VALARM"]
        lines.append("END:VEVENT")
    lines.append("END:VCALENDAR")
    return "".join(fold(l) + "\r\n" for l in lines)


def parse(text: str) -> list[dict[str, str]]:
    """Unfold and read VEVENTs back as {NAME(;params): value} dicts (for tests and tooling)."""
    unfolded = text.replace("\r\n ", "").replace("\r\n\t", "")
    events, cur, depth = [], None, []
    for line in unfolded.split("\r\n"):
        if not line:
            continue
        name, _, value = line.partition(":")
        if name == "BEGIN":
            depth.append(value)
            if value == "VEVENT":
                cur = {}
        elif name == "END":
            depth.pop()
            if value == "VEVENT":
                events.append(cur)
                cur = None
        elif cur is not None and depth[-1] == "VEVENT":
            cur[name] = value
    return events
