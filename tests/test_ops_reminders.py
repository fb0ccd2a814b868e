"""Reminders: policy, recipients, de-duplication, SMTP delivery to a local sink, iCalendar output."""
import email
from email import policy
from datetime import date

import pytest
from aiosmtpd.controller import Controller

from imtrial_dsl.ops import ics
from imtrial_dsl.ops.reminders import run_reminders
from ops_data.data import AS_OF, study_data
from ops_data.trial import trial
from netutil import free_port  # tests/netutil.py

EXPECTED = {  # recipient -> [(kind, subject, visit)]
    "central@lab.example": [("overdue", "AMY01-BOS-0002", "m12")],
    "rivera@bgh.example": [("overdue", "AMY01-BOS-0002", "m12")],
    "martin@chu-lyon.example": [("upcoming", "AMY01-LYN-0002", "m12")],   # LYN has no technologist/coordinator: PI
    "ito@tmc.example": [("window_open", "AMY01-TOK-0001", "baseline")],
}


def _by_recipient(run):
    return {m.recipient.email: sorted((n.kind, n.subject_id, n.visit) for n in m.notices) for m in run.messages}


class Sink:
    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.rcpt_tos, email.message_from_bytes(envelope.content, policy=policy.default)))
        return "250 OK"


@pytest.fixture
def smtp_sink():
    sink = Sink()
    port = free_port()
    ctl = Controller(sink, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        yield sink, port
    finally:
        ctl.stop()


def test_dry_run_plans_and_records_nothing(tmp_path):
    run = run_reminders(trial(), study_data(), tmp_path / "w", AS_OF, dry_run=True, central_emails=["central@lab.example"])
    assert _by_recipient(run) == EXPECTED
    assert all(m.status == "dry_run" for m in run.messages)
    again = run_reminders(trial(), study_data(), tmp_path / "w", AS_OF, dry_run=True, central_emails=["central@lab.example"])
    assert _by_recipient(again) == EXPECTED  # nothing was recorded
    roles = {(u["site"], u["role"]) for u in run.undeliverable}
    assert roles == {("LYN", "technologist"), ("LYN", "coordinator"), ("TOK", "coordinator")}


def test_smtp_delivery_and_no_duplicates(tmp_path, smtp_sink):
    sink, port = smtp_sink
    wd, out = tmp_path / "w", tmp_path / "out"
    run = run_reminders(trial(), study_data(), wd, AS_OF, smtp=("127.0.0.1", port), sender="ops@amy01.example",
                        out_dir=out, central_emails=["central@lab.example"])
    assert run.ok and all(m.status == "sent" for m in run.messages)
    got = {tuple(rcpt)[0]: msg for rcpt, msg in sink.messages}
    assert set(got) == set(EXPECTED)
    body = got["rivera@bgh.example"].get_body(("plain",)).get_content()
    assert "AMY01-BOS-0002" in body and "OVERDUE" in body
    # a site contact never sees another site's subjects; nobody sees the arm
    assert "LYN" not in body and "TOK" not in body
    for _, msg in sink.messages:
        text = msg.as_string()
        assert "placebo" not in text and "drug_x" not in text
    cal = [p for p in got["ito@tmc.example"].iter_attachments() if p.get_content_type() == "text/calendar"]
    assert len(cal) == 1 and "AMY01-TOK-0001" in cal[0].get_content()

    # same day again: nothing twice; the next day also nothing new for the same notices
    sink.messages.clear()
    again = run_reminders(trial(), study_data(), wd, AS_OF, smtp=("127.0.0.1", port), central_emails=["central@lab.example"])
    assert again.messages == [] and len(again.already_sent) == 4 and sink.messages == []
    nxt = run_reminders(trial(), study_data(), wd, date(2027, 4, 26), smtp=("127.0.0.1", port), central_emails=["central@lab.example"])
    assert nxt.messages == [] and sink.messages == []
    # 2027-04-28: LYN-0002's window opens (new kind of notice) and TOK-0001's baseline window has closed
    opened = run_reminders(trial(), study_data(), wd, date(2027, 4, 28), smtp=("127.0.0.1", port), central_emails=["central@lab.example"])
    assert _by_recipient(opened) == {"martin@chu-lyon.example": [("window_open", "AMY01-LYN-0002", "m12")],
                                     "sato@tmc.example": [("overdue", "AMY01-TOK-0001", "baseline")],
                                     "central@lab.example": [("overdue", "AMY01-TOK-0001", "baseline")]}
    assert len(sink.messages) == 3


def test_failed_delivery_is_not_recorded(tmp_path):
    port = free_port()  # nobody listens there
    run = run_reminders(trial(), study_data(), tmp_path / "w", AS_OF, smtp=("127.0.0.1", port), central_emails=["central@lab.example"])
    assert not run.ok and all(m.status == "failed" for m in run.messages)
    retry = run_reminders(trial(), study_data(), tmp_path / "w", AS_OF, dry_run=True, central_emails=["central@lab.example"])
    assert _by_recipient(retry) == EXPECTED


def test_outbox_json_and_calendars(tmp_path):
    out = tmp_path / "out"
    run = run_reminders(trial(), study_data(), tmp_path / "w", AS_OF, out_dir=out, central_emails=["central@lab.example"])
    assert sorted(p.name for p in (out / "outbox").iterdir()) == sorted(
        f"2027-04-25_{i:03d}_{m.recipient.email.replace('@', '_at_')}.eml" for i, m in enumerate(run.messages))
    assert {p.name for p in out.glob("*.ics")} == {"visit_windows_BOS.ics", "visit_windows_LYN.ics",
                                                  "visit_windows_TOK.ics", "visit_windows_all.ics"}
    raw = (out / "visit_windows_all.ics").read_bytes()
    assert raw.startswith(b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\n") and raw.endswith(b"END:VCALENDAR\r\n")
    assert all(len(line) <= 75 for line in raw.split(b"\r\n"))
    events = {e["UID"]: e for e in ics.parse(raw.decode())}
    # pending windows not yet closed: every upcoming/open visit, none received or overdue
    assert "AMY01-BOS-0002-m12.AMY01@imtrial" not in events
    tok = events["AMY01-TOK-0001-baseline.AMY01@imtrial"]
    assert tok["DTSTART;VALUE=DATE"] == "20270413" and tok["DTEND;VALUE=DATE"] == "20270428"  # exclusive end
    lyn_only = ics.parse((out / "visit_windows_LYN.ics").read_bytes().decode())
    assert lyn_only and all("LYN" in e["SUMMARY"] for e in lyn_only)
    # deterministic calendar bytes for the same inputs
    run_reminders(trial(), study_data(), tmp_path / "w2", AS_OF, dry_run=True, out_dir=tmp_path / "out2")
    assert (tmp_path / "out2" / "visit_windows_all.ics").read_bytes() == raw


def test_ics_folding_and_escaping():
    ev = ics.Event(uid="x@imtrial", start=date(2027, 1, 1), end=date(2027, 1, 2),
                   summary="Visite m12; sujet, «AMY01-LYN-0001» " + "é" * 60, description="line1\nline2")
    text = ics.calendar([ev], date(2027, 1, 1))
    assert all(len(l.encode()) <= 75 for l in text.split("\r\n"))
    back = ics.parse(text)[0]
    assert back["SUMMARY"].startswith("Visite m12\\; sujet\\, «AMY01") and back["DESCRIPTION"] == "line1\\nline2"


def test_calendar_reads_back_with_an_independent_parser(tmp_path):
    """The .ics is checked by the `icalendar` package (an RFC 5545 implementation we do not use to write it)."""
    import icalendar

    out = tmp_path / "out"
    run_reminders(trial(), study_data(), tmp_path / "w", AS_OF, dry_run=True, out_dir=out)
    cal = icalendar.Calendar.from_ical((out / "visit_windows_all.ics").read_bytes())
    assert str(cal["VERSION"]) == "2.0" and str(cal["PRODID"]) == ics.PRODID
    events = {str(e["UID"]): e for e in cal.walk("VEVENT")}
    tok = events["AMY01-TOK-0001-baseline.AMY01@imtrial"]
    assert tok.decoded("DTSTART") == date(2027, 4, 13) and tok.decoded("DTEND") == date(2027, 4, 28)
    (alarm,) = tok.walk("VALARM")
    assert alarm.decoded("TRIGGER").days == -7
    # every window still to come, and none that is received or closed
    assert sorted(events) == sorted([
        "AMY01-BOS-0001-m24.AMY01@imtrial", "AMY01-BOS-0002-m24.AMY01@imtrial", "AMY01-LYN-0001-m24.AMY01@imtrial",
        "AMY01-LYN-0002-m12.AMY01@imtrial", "AMY01-LYN-0002-m24.AMY01@imtrial", "AMY01-TOK-0001-baseline.AMY01@imtrial",
        "AMY01-TOK-0001-m12.AMY01@imtrial", "AMY01-TOK-0001-m24.AMY01@imtrial"])


def _eml(out, who):
    [p] = [p for p in (out / "outbox").iterdir() if who.replace("@", "_at_") in p.name]
    return email.message_from_bytes(p.read_bytes(), policy=policy.default)


def test_no_real_date_reaches_the_central_team(tmp_path, monkeypatch):
    """Issue 9 (no real dates outside the site) for reminders: the central team's message holds each subject's
    shifted dates — the dates its de-identified images carry — and no calendar; the site's own message keeps
    its real dates and calendar."""
    from datetime import timedelta

    from imtrial_dsl.deid import subject_date_shift
    from imtrial_dsl.ops.expected import expected_vs_received
    from ops_data.trial import KEY, KEY_ENV

    monkeypatch.setenv(KEY_ENV, KEY)
    out = tmp_path / "out"
    run = run_reminders(trial(), study_data(), tmp_path / "w", AS_OF, out_dir=out, central_emails=["central@lab.example"])
    status = {(s.subject_id, s.visit): s for s in expected_vs_received(trial(), study_data(), AS_OF)}
    s = status[("AMY01-BOS-0002", "m12")]
    real = {d.isoformat() for d in (s.target, s.opens, s.closes)}
    shift = subject_date_shift(trial(), "AMY01-BOS-0002")
    assert shift is not None and shift < 0
    central = _eml(out, "central@lab.example")
    text = central.as_string()
    assert not any(d in text for d in real), "a real visit date reached the central team"
    assert not [p for p in central.iter_attachments() if p.get_content_type() == "text/calendar"]
    body = central.get_body(("plain",)).get_content()
    assert f"window closed {(s.closes + timedelta(days=shift)).isoformat()}" in body and "shifted dates" in body
    site = _eml(out, "rivera@bgh.example")                     # BOS's own coordinator: real dates, calendar
    assert f"window closed {s.closes.isoformat()}" in site.get_body(("plain",)).get_content()
    assert [p for p in site.iter_attachments() if p.get_content_type() == "text/calendar"]
    assert {m.recipient.email: m.calendar == "" for m in run.messages}["central@lab.example"]


def test_without_the_key_the_central_team_gets_study_days(tmp_path, monkeypatch):
    from ops_data.trial import KEY_ENV

    monkeypatch.delenv(KEY_ENV, raising=False)
    out = tmp_path / "out"
    run_reminders(trial(), study_data(), tmp_path / "w", AS_OF, out_dir=out, central_emails=["central@lab.example"])
    body = _eml(out, "central@lab.example").get_body(("plain",)).get_content()
    assert "window closed day " in body and "study days" in body
    import re

    assert set(re.findall(r"\d{4}-\d{2}-\d{2}", body)) == {AS_OF.isoformat()}     # only today's date, in the heading
