"""Hand-built exams for the operations unit tests (the trial is ``ops_data.trial.trial()``).

Scenario as of 2027-04-25 (m12 window = day 365 -14 .. +28):
- AMY01-BOS-0001: baseline 2026-03-01 complete; m12 2027-04-15 OUT of window (closes 2027-03-29),
  T1w only and failing adherence, scanner software upgraded XA30 -> XA31.
- AMY01-BOS-0002: baseline 2026-03-10; m12 never came (window closed 2027-04-07) -> overdue.
- AMY01-LYN-0001: baseline 2026-02-20; m12 2027-02-25 in window, FLAIR fails QC, SWI missing.
- AMY01-LYN-0002: baseline 2026-05-12; m12 window opens 2027-04-28 -> upcoming (within 7 d).
- AMY01-TOK-0001: enrolled 2027-04-20 (enrolment CSV), nothing received -> baseline window open.
"""
from datetime import date

from imtrial_dsl.ops.model import Enrollment, ExamRecord, SeriesRecord, StudyData

AS_OF = date(2027, 4, 25)
ALL_STEPS = {s: "done" for s in ("ingest", "identify", "deidentify", "classify", "adherence", "qc", "archive")}


def ser(proto, adherence="pass", qc="pass", uid=None):
    return SeriesRecord(series_uid=uid or f"1.2.3.{proto}", description=proto, protocol=proto, adherence=adherence, qc=qc)


def full():
    return [ser("T1w"), ser("FLAIR"), ser("SWI", qc=None)]


def study_data(with_enrollment=True) -> StudyData:
    exams = [
        ExamRecord("bos1base", "AMY01-BOS-0001", "BOS", "BOS_MR1", "baseline", date(2026, 3, 1), ["syngo MR XA30"], full(),
                   dict(ALL_STEPS), {"hipvol": "done"}),
        ExamRecord("bos1m12", "AMY01-BOS-0001", "BOS", "BOS_MR1", "m12", date(2027, 4, 15), ["syngo MR XA31"],
                   [SeriesRecord("1.2.9", "t1w", "T1w", "fail", "pass", ["RepetitionTime: 2500 ms (expected 2300 ms ± 1%)"])],
                   dict(ALL_STEPS), {}),
        ExamRecord("bos2base", "AMY01-BOS-0002", "BOS", "BOS_MR1", "baseline", date(2026, 3, 10), ["syngo MR XA30"], full(),
                   dict(ALL_STEPS), {"hipvol": "done"}),
        ExamRecord("lyn1base", "AMY01-LYN-0001", "LYN", "LYN_MR1", "baseline", date(2026, 2, 20), ["MR30.1"], full(),
                   dict(ALL_STEPS), {"hipvol": "done"}),
        ExamRecord("lyn1m12", "AMY01-LYN-0001", "LYN", "LYN_MR1", "m12", date(2027, 2, 25), ["MR30.1"],
                   [ser("T1w"), ser("FLAIR", qc="fail")], {**ALL_STEPS, "qc": "done"}, {}),
        ExamRecord("lyn2base", "AMY01-LYN-0002", "LYN", "LYN_MR1", "baseline", date(2026, 5, 12), ["MR30.1"], full(),
                   {"ingest": "done", "identify": "done"}, {}),
    ]
    enr = {}
    if with_enrollment:
        enr = {"AMY01-TOK-0001": Enrollment("AMY01-TOK-0001", "TOK", date(2027, 4, 20), "drug_x"),
               "AMY01-BOS-0001": Enrollment("AMY01-BOS-0001", "BOS", date(2026, 3, 1), "placebo"),
               "AMY01-LYN-0001": Enrollment("AMY01-LYN-0001", "LYN", date(2026, 2, 20), "drug_x")}
    return StudyData(exams=exams, enrollments=enr)
