"""Visit reminders and escalations from the study's ``schedule.reminders`` policy.

As of a date, for every subject x scheduled visit not yet received:

- ``upcoming``    — the window opens within ``before_open`` days → the ``notify`` roles;
- ``window_open`` — the window is open (when ``on_open``) → the ``notify`` roles;
- ``overdue``     — the window closed ``overdue_after`` days ago or more → the ``escalate_to`` roles.

Roles are contact roles of the subject's site (``contact coordinator …``); the role ``central``
(or the name of any study role of kind central) means the central team, whose addresses come from
``central_emails`` (CLI ``--central-email``, env ``IMTRIAL_CENTRAL_EMAIL``) plus any site contact
declared with role ``central``. Each recipient gets one digest message per run; a notice already
sent to a recipient (table ``ops_notifications_sent``) is never sent again, so re-running is safe.

No real date leaves the site (the rule of ``ops/reports.py``): a site contact's message, for its own site,
shows the visit windows' real dates and carries the site's calendar; a message to the central team shows
each subject's dates shifted by its keyed offset (the dates its de-identified images carry) or, when the study
does not shift dates (or its key is unavailable here), study days from the subject's day 0 — and no calendar,
which would have to sit on the real days. (That a message is sent on a given day is itself a hint of the
real schedule; content-wise it holds no real date.)
"""
from __future__ import annotations

import json
import os
import smtplib
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta, timezone
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Optional

from imtrial_dsl import ir

from . import ics
from .expected import VisitStatus, expected_vs_received
from ..store import tx
from .model import StudyData, connect

KINDS = ("upcoming", "window_open", "overdue")
CENTRAL_ENV = "IMTRIAL_CENTRAL_EMAIL"


@dataclass(frozen=True)
class Recipient:
    email: str
    name: str
    role: str
    site: Optional[str]        # None: central team, sees every site


@dataclass
class Notice:
    kind: str
    subject_id: str
    site: str
    visit: str
    target: date
    opens: date
    closes: date
    roles: tuple[str, ...]
    day0: Optional[date] = None        # the subject's day 0 (study days for messages that leave the site)

    def line(self, shift: Optional[int] = None, real: bool = True) -> str:
        """The notice in words: real dates (``real``, site side), dates moved by ``shift`` days, or study days."""
        def d(x: date) -> str:
            if real:
                return x.isoformat()
            if shift is not None:
                return (x + timedelta(days=shift)).isoformat()
            return f"day {(x - self.day0).days}" if self.day0 else "(date withheld)"

        if self.kind == "upcoming":
            what = f"window opens {d(self.opens)} (closes {d(self.closes)})"
        elif self.kind == "window_open":
            what = f"window OPEN until {d(self.closes)} (target {d(self.target)})"
        else:
            what = f"OVERDUE: window closed {d(self.closes)}, no exam received"
        return f"{self.site}  {self.subject_id}  visit {self.visit}: {what}"

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("target", "opens", "closes", "day0"):
            d[k] = d[k].isoformat() if d[k] else None
        d["roles"] = list(self.roles)
        return d


@dataclass
class Message:
    recipient: Recipient
    notices: list[Notice]
    subject: str
    body: str
    calendar: str
    status: str = "pending"      # sent | dry_run | outbox | failed
    error: str = ""

    def to_json(self) -> dict:
        return {"to": self.recipient.email, "name": self.recipient.name, "role": self.recipient.role,
                "site": self.recipient.site, "subject": self.subject, "status": self.status,
                "error": self.error, "notices": [n.to_json() for n in self.notices]}


@dataclass
class ReminderRun:
    trial: str
    as_of: date
    notices: list[Notice] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    already_sent: list[dict] = field(default_factory=list)
    undeliverable: list[dict] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(m.status == "failed" for m in self.messages)

    def to_json(self) -> dict:
        return {"trial": self.trial, "as_of": self.as_of.isoformat(),
                "notices": [n.to_json() for n in self.notices],
                "messages": [m.to_json() for m in self.messages],
                "already_sent": self.already_sent, "undeliverable": self.undeliverable}


def due_notices(trial: ir.Trial, statuses: list[VisitStatus], as_of: date) -> list[Notice]:
    """The notices the policy calls for on ``as_of`` (before de-duplication against what was sent)."""
    pol = trial.schedule.reminders if trial.schedule else None
    if pol is None:
        return []
    before = int(round(pol.before_open.days)) if pol.before_open else None
    after = int(round(pol.overdue_after.days)) if pol.overdue_after else 0
    escalate = tuple(pol.escalate_to or pol.notify)
    out = []
    for s in statuses:
        kind = None
        if s.status == "upcoming" and before is not None and as_of >= s.opens - timedelta(days=before):
            kind, roles = "upcoming", tuple(pol.notify)
        elif s.status == "window_open" and pol.on_open:
            kind, roles = "window_open", tuple(pol.notify)
        elif s.status == "overdue" and not s.optional and as_of >= s.closes + timedelta(days=after):
            kind, roles = "overdue", escalate
        if kind and roles:
            out.append(Notice(kind, s.subject_id, s.site, s.visit, s.target, s.opens, s.closes, roles, s.day0))
    return out


def central_addresses(trial: ir.Trial, extra: list[str] | None = None) -> list[Recipient]:
    """The central team: explicit addresses, ``$IMTRIAL_CENTRAL_EMAIL`` (comma-separated), and contacts with role central."""
    seen, out = set(), []
    env = [a.strip() for a in os.environ.get(CENTRAL_ENV, "").split(",") if a.strip()]
    for addr in list(extra or []) + env:
        if addr.lower() not in seen:
            seen.add(addr.lower())
            out.append(Recipient(addr, "Central team", "central", None))
    for site in trial.sites:
        for c in site.contacts:
            if c.role == "central" and c.email and c.email.lower() not in seen:
                seen.add(c.email.lower())
                out.append(Recipient(c.email, c.name, "central", None))
    return out


def _is_central(trial: ir.Trial, role: str) -> bool:
    return role == "central" or any(r.name == role and r.kind == "central" for r in trial.roles)


FALLBACK_ROLES = ir.REMINDER_FALLBACK_ROLES


def recipients_for(trial: ir.Trial, notice: Notice, central: list[Recipient]) -> tuple[list[Recipient], list[str], list[Recipient]]:
    """(recipients, roles with nobody to receive, fallback recipients used) for one notice.

    When none of the site-level roles has a contact with an e-mail at the subject's site, the
    site's imaging PI (else PI, else coordinator) receives the notice so that it is not lost.
    """
    site = trial.site(notice.site)
    contacts = [c for c in (site.contacts if site else []) if c.email]
    found: list[Recipient] = []
    missing = []
    site_roles = [r for r in notice.roles if not _is_central(trial, r)]
    for role in notice.roles:
        rs = central if _is_central(trial, role) else [Recipient(c.email, c.name, c.role, notice.site)
                                                       for c in contacts if c.role == role]
        if not rs:
            missing.append(role)
        found += [r for r in rs if r not in found]
    fallback: list[Recipient] = []
    if site_roles and all(r in missing for r in site_roles):
        for role in FALLBACK_ROLES:
            fallback = [Recipient(c.email, c.name, c.role, notice.site) for c in contacts if c.role == role]
            if fallback:
                break
        found += [r for r in fallback if r not in found]
    return found, missing, fallback


def _calendar_events(trial: ir.Trial, statuses: list[VisitStatus], as_of: date) -> list[ics.Event]:
    pol = trial.schedule.reminders if trial.schedule else None
    alarm = int(round(pol.before_open.days)) if pol and pol.before_open else None
    code = trial.study.code if trial.study else "study"
    evs = []
    for s in statuses:
        if s.status not in ("upcoming", "window_open") or s.closes < as_of:
            continue
        evs.append(ics.Event(
            uid=f"{s.subject_id}-{s.visit}.{code}@imtrial",
            start=s.opens, end=s.closes,
            summary=f"{code} {s.visit} window: {s.subject_id} ({s.site})",
            description=f"Subject {s.subject_id} at site {s.site}: visit {s.visit}, target {s.target.isoformat()}, "
                        f"window {s.opens.isoformat()} to {s.closes.isoformat()}.",
            categories=(code, s.site, s.visit), alarm_days_before=alarm))
    return evs


def away_from_site(r: Recipient) -> bool:
    """A recipient outside the subject's site (the central team): real dates must not reach it."""
    return r.site is None


def _shift(trial: ir.Trial, subject_id: str) -> Optional[int]:
    """The subject's keyed date offset, or None (dates not shifted, or the key is not available here)."""
    from imtrial_dsl.deid import subject_date_shift
    from imtrial_dsl.secrets import SecretError

    try:
        return subject_date_shift(trial, subject_id)
    except SecretError:
        return None


def _compose(trial: ir.Trial, r: Recipient, notices: list[Notice], cal: str, as_of: date) -> Message:
    code = trial.study.code if trial.study else "study"
    scope = r.site or "all sites"
    away = away_from_site(r)
    shifts = {n.subject_id: _shift(trial, n.subject_id) for n in notices} if away else {}
    counts = {k: sum(n.kind == k for n in notices) for k in KINDS}
    head = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items() if v)
    subject = f"[{code}] {scope}: {head} ({as_of.isoformat()})"
    body = [f"Dear {r.name},", "", f"Imaging visit status for study {code} ({scope}) as of {as_of.isoformat()}:", ""]
    for kind, title in (("overdue", "Overdue visits (window closed, no exam received)"),
                        ("window_open", "Visit windows open now"), ("upcoming", "Visit windows opening soon")):
        items = [n for n in notices if n.kind == kind]
        if items:
            body.append(title + ":")
            body += ["  - " + n.line(shifts.get(n.subject_id), real=not away)
                     for n in sorted(items, key=lambda n: (n.site, n.opens, n.subject_id))]
            body.append("")
    if away:
        body += [("Dates are each subject's shifted dates (as in its de-identified images)"
                  if any(v is not None for v in shifts.values()) else "Dates are study days from each subject's day 0")
                 + "; real dates stay at the sites, so no calendar is attached."]
    else:
        body += ["The attached calendar (.ics) lists the open and upcoming windows."]
    body += ["This message was generated by imtrial reminders; you receive each notice once."]
    return Message(r, notices, subject, "\n".join(body) + "\n", "" if away else cal)


def _email(msg: Message, sender: str) -> EmailMessage:
    em = EmailMessage()
    em["From"] = sender
    em["To"] = msg.recipient.email
    em["Subject"] = msg.subject
    em["Date"] = format_datetime(datetime.now(timezone.utc))
    em.set_content(msg.body)
    if msg.calendar:   # none for recipients away from the site (it sits on the real days)
        em.add_attachment(msg.calendar.encode("utf-8"), maintype="text", subtype="calendar",
                          filename="visit_windows.ics", params={"method": "PUBLISH"})
    return em


def _smtp_connect(smtp: tuple[str, int]) -> smtplib.SMTP:
    """Plain SMTP; with ``$IMTRIAL_SMTP_USER`` set, STARTTLS then login with ``$IMTRIAL_SMTP_PASSWORD``."""
    conn = smtplib.SMTP(smtp[0], smtp[1], timeout=30)
    user = os.environ.get("IMTRIAL_SMTP_USER")
    if user:
        conn.starttls()
        conn.login(user, os.environ.get("IMTRIAL_SMTP_PASSWORD", ""))
    return conn


def run_reminders(trial: ir.Trial, data: StudyData, workdir: str | Path, as_of: date, *,
                  dry_run: bool = False, smtp: Optional[tuple[str, int]] = None, sender: str = "imtrial@localhost",
                  out_dir: str | Path | None = None, central_emails: list[str] | None = None) -> ReminderRun:
    """Compute, send (SMTP), or file (outbox) the day's reminders; record what was sent.

    Without ``smtp`` messages go to ``out_dir/outbox/*.eml`` (and count as sent); with ``dry_run``
    nothing is sent or recorded. ``out_dir`` also receives ``reminders.json`` and ``.ics`` calendars.
    """
    code = trial.study.code if trial.study else "study"
    statuses = expected_vs_received(trial, data, as_of)
    run = ReminderRun(code, as_of, due_notices(trial, statuses, as_of))
    central = central_addresses(trial, central_emails)
    per: dict[Recipient, list[Notice]] = {}
    for n in run.notices:
        rs, missing, fallback = recipients_for(trial, n, central)
        for role in missing:
            alt = f"; sent to {', '.join(sorted({r.role for r in fallback}))} instead" if fallback and role != "central" else ""
            run.undeliverable.append({"subject_id": n.subject_id, "site": n.site, "visit": n.visit, "kind": n.kind,
                                      "role": role, "reason": f"no contact with role {role!r} and an e-mail{alt}"})
        for r in rs:
            per.setdefault(r, []).append(n)

    con = connect(workdir)
    try:
        sent = {(row["subject_id"], row["visit"], row["kind"], row["recipient"].lower())
                for row in con.execute("SELECT subject_id, visit, kind, recipient FROM ops_notifications_sent WHERE trial=?", (code,))}
        cal_by_scope: dict[Optional[str], str] = {}
        for r in sorted(per, key=lambda r: (r.site or "", r.email)):
            fresh = []
            for n in per[r]:
                if (n.subject_id, n.visit, n.kind, r.email.lower()) in sent:
                    run.already_sent.append({"to": r.email, "subject_id": n.subject_id, "visit": n.visit, "kind": n.kind})
                else:
                    fresh.append(n)
            if not fresh:
                continue
            if r.site not in cal_by_scope and not away_from_site(r):
                scoped = [s for s in statuses if r.site is None or s.site == r.site]
                cal_by_scope[r.site] = ics.calendar(_calendar_events(trial, scoped, as_of), as_of, f"{code} visit windows")
            run.messages.append(_compose(trial, r, fresh, cal_by_scope.get(r.site, ""), as_of))

        outbox = Path(out_dir) / "outbox" if out_dir else None
        smtp_conn = None
        for i, m in enumerate(run.messages):
            if dry_run:
                m.status = "dry_run"
                continue
            try:
                em = _email(m, sender)
                if smtp:
                    if smtp_conn is None:
                        smtp_conn = _smtp_connect(smtp)
                    smtp_conn.send_message(em)
                    m.status, channel = "sent", "smtp"
                elif outbox is not None:
                    outbox.mkdir(parents=True, exist_ok=True)
                    p = outbox / f"{as_of.isoformat()}_{i:03d}_{m.recipient.email.replace('@', '_at_')}.eml"
                    p.write_bytes(bytes(em))
                    run.files.append(p)
                    m.status, channel = "outbox", "outbox"
                else:
                    m.status, m.error = "failed", "no --smtp server and no --out folder for an outbox"
                    continue
            except (OSError, smtplib.SMTPException) as exc:
                m.status, m.error = "failed", f"{type(exc).__name__}: {exc}"
                smtp_conn = None
                continue
            with tx(con):
                con.executemany(
                    "INSERT OR IGNORE INTO ops_notifications_sent VALUES (?,?,?,?,?,?,?)",
                    [(code, n.subject_id, n.visit, n.kind, m.recipient.email.lower(), as_of.isoformat(), channel)
                     for n in m.notices])
        if smtp_conn is not None:
            try:
                smtp_conn.quit()
            except (OSError, smtplib.SMTPException):
                pass
    finally:
        con.close()

    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        p = out / "reminders.json"
        p.write_text(json.dumps(run.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        run.files.append(p)
        for site in sorted({s.site for s in statuses}) + [None]:
            scoped = [s for s in statuses if site is None or s.site == site]
            p = out / f"visit_windows_{site or 'all'}.ics"
            p.write_bytes(ics.calendar(_calendar_events(trial, scoped, as_of), as_of,
                                       f"{code} visit windows {site or 'all sites'}").encode("utf-8"))
            run.files.append(p)
    return run
