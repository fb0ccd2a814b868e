"""What the commands show: diagnostics (coloured or not), data to stdout or ``-o``, and the human-readable
summaries of a run, an exam's status and a transfer. Library code returns the values; this renders them."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..diagnostics import Diagnostic, Severity, render

_color_mode = "auto"


def set_color(mode: str) -> None:
    """``--color``: ``always``, ``never`` or ``auto`` (a terminal without NO_COLOR)."""
    global _color_mode
    _color_mode = mode


def use_color(stream=None) -> bool:
    """Colour for ``stream``: --color always/never, else a TTY without NO_COLOR."""
    stream = stream or sys.stderr
    if _color_mode == "always":
        return True
    if _color_mode == "never" or os.environ.get("NO_COLOR"):
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def print_diagnostics(diags: Sequence[Diagnostic], sources: dict[str, str], stream=None) -> None:
    stream = stream or sys.stderr
    if diags:
        stream.write(render(diags, sources, color=use_color(stream)) + "\n")


def counts(diags: Sequence[Diagnostic]) -> tuple[int, int]:
    """(errors, warnings); a summary ("… and N more") counts for the N it stands for."""
    e = sum(d.omitted or 1 for d in diags if d.severity == Severity.ERROR)
    w = sum(d.omitted or 1 for d in diags if d.severity == Severity.WARNING)
    return e, w


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def write_out(data: str | bytes, out: Optional[str]) -> None:
    """``data`` to the file ``out`` (folders created), or to stdout when ``out`` is None or ``-``."""
    if out and out != "-":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            Path(out).write_bytes(data)
        else:
            Path(out).write_text(data, encoding="utf-8")
        return
    if isinstance(data, bytes):
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
    else:
        sys.stdout.write(data)


# --------------------------------------------------------------------------- progress

def progress_bar(desc: str, total: int):
    """A progress bar on stderr (the runner asks for one per phase)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, leave=False)


def progress_for(args):
    """:func:`progress_bar` for a long command, or None with --no-progress or when stderr is not a terminal.

    The library takes ``progress(desc, total)`` returning an object with ``update(n)`` and ``close()``."""
    return None if getattr(args, "no_progress", False) or not sys.stderr.isatty() else progress_bar


# --------------------------------------------------------------------------- summaries

def run_summary(s: dict) -> str:
    """A run's summary (``imtrial_dsl.runner.run.summarize``) as the aligned lines ``imtrial run``/``status`` print."""
    def kv(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"

    lines = [
        f"exams        {s['exams']} ({kv(s['exam_status'])}), subjects {s['subjects']}, series {s['series']}, instances {s['instances']}",
        f"this run     {s['this_run']['ingest'].get('ingested', 0)} new instance(s), {s['this_run']['exams_processed']} exam(s) processed"
        + (f" in {s['this_run']['seconds']} s" if s['this_run'].get('seconds') is not None else ""),
        f"classified   {kv(s['classification'])}",
        f"adherence    {kv(s['adherence'])}",
        f"qc           {kv(s['qc'])}",
        f"quarantined  {s['quarantined']}" + (f" ({kv(s['quarantine_reasons'])})" if s['quarantined'] else "")
        + f", duplicates {s['duplicates']}",
        *([f"not read     {s['skipped']} inbox entr{'y' if s['skipped'] == 1 else 'ies'} ({kv(s['skip_reasons'])})"]
          + [f"  - {k['path']}: {k['reason']}: {k['detail']}" for k in s["skipped_entries"][:20]]
          if s.get("skipped") else []),
        *([f"not removed  {len(s['this_run']['ingest']['not_removed'])} inbox file(s) (--move): "
           f"{s['this_run']['ingest']['not_removed'][0]['reason']}"] if s["this_run"]["ingest"].get("not_removed") else []),
        f"unmatched    {len(s['unmatched'])}" + (f": {', '.join(s['unmatched'])}" if s['unmatched'] else ""),
        f"measurements {s['measurements']}",
    ]
    waiting = s.get("waiting") or []
    if waiting:
        kinds: dict[str, int] = {}
        for w in waiting:
            kinds[w["waiting"]] = kinds.get(w["waiting"], 0) + 1
        lines.append(f"waiting      {len(waiting)} for imtrial assign ({kv(kinds)})")
        for w in waiting:
            lines.append(f"  - {w['exam_key']} {w['waiting']}: {w['detail']}")
    incomplete = s.get("incomplete") or []
    if incomplete:
        lines.append(f"incomplete   {plural(len(incomplete), 'exam')} missing a protocol of its visit")
        for i in incomplete[:10]:
            lines.append(f"  - {i.get('subject') or i['exam_key']} {i.get('visit') or ''}: missing {', '.join(i['missing'])}")
        if len(incomplete) > 10:
            lines.append(f"  … {len(incomplete) - 10} more (imtrial status --all --workdir W)")
    study = s["this_run"].get("study") or {}
    if study.get("changed"):
        lines.append(f"warning      the compiled study changed since the last run ({study['previous_sha256'][:12]} -> "
                     f"{study['compiled_sha256'][:12]}): {study['nodes_rerun']} node(s) re-run on "
                     f"{study['exams_rejudged']} exam(s); changed archive sidecars are new versions")
    if s["warnings"]:
        lines.append(f"warnings     {kv(s['warnings'])}")
        lines += grouped_findings(s["warning_list"], limit=20)
    for f in s["failed"]:
        lines.append(f"FAILED       exam {f['exam_key']} ({f['subject']}) at step {f['step']}: {f['error']}")
    return "\n".join(lines)


def grouped_findings(findings: Sequence[dict], limit: int = 20) -> list[str]:
    """Findings grouped by code, the rarest first, so that one software upgrade is not buried under
    twenty routine ones: a code seen once is one line, a repeated one is ``code ×N`` with its first cases."""
    groups: dict[str, list[dict]] = {}
    for w in findings:
        groups.setdefault(w.get("code") or "warning", []).append(w)
    lines = []
    for code, ws in sorted(groups.items(), key=lambda kv: (len(kv[1]), kv[0]))[:limit]:
        def who(w: dict) -> str:
            return f"{w.get('subject') or w.get('exam_key', '')} {w.get('visit') or ''}".strip()

        if len(ws) == 1:
            lines.append(f"  - {code}: {who(ws[0])}: {ws[0].get('detail', '')}")
            continue
        details = list(dict.fromkeys(str(w.get("detail", "")) for w in ws))
        same = f": {details[0]}" if len(details) == 1 else f": {details[0]} (and {len(details) - 1} other message(s))"
        shown = ", ".join(who(w) for w in ws[:3]) + (f", … {len(ws) - 3} more" if len(ws) > 3 else "")
        lines.append(f"  - {code} ×{len(ws)}{same} [{shown}]")
    if len(groups) > limit:
        lines.append(f"  … {len(groups) - limit} more kinds of finding (imtrial status --all --workdir W)")
    return lines


def exam_status(e: dict, detailed: bool) -> list[str]:
    """One exam of the state database (``Store.exams()``): its line and its steps; ``detailed`` adds failures,
    series verdicts and warnings."""
    win = "" if e["in_window"] is None else (" in window" if e["in_window"] else " OUT OF WINDOW")
    lines = [f"{e['exam_key']}  {e['subject_id'] or '-'}  {e['site'] or '-'}/{e['device'] or '-'}  "
             f"{e['visit'] or '-'}{win}  {e['exam_date'] or ''}  [{e['status']}]"]
    steps = e["steps"]
    lines.append("   " + "  ".join(f"{n}:{v['status']}" for n, v in steps.items()))
    if detailed:
        for n, v in steps.items():
            if v["status"] == "failed":
                lines.append(f"   {n} failed: {v['detail'].get('error') or v['detail'].get('detail')}")
        for s in e["series"]:
            a = (s.get("adherence") or {}).get("verdict", "-")
            q = (s.get("qc") or {}).get("verdict", "-")
            lines.append(f"   series {s['series_number']!s:>4} {s['description'] or '':30s} {s['protocol'] or '-':10s} "
                         f"adherence {a:5s} qc {q}")
        for w in e["warnings"]:
            lines.append(f"   warning {w.get('code')}: {w.get('detail')}")
    return lines


def assign_summary(res: dict) -> str:
    """What ``imtrial assign`` recorded and where the exam stands after processing it onward."""
    what = ", ".join(f"{k} {v}" for k, v in res["assigned"].items())
    lines = [f"assigned {what} to exam {res['exam_key']} (by {res['by']})"]
    e = res.get("status")
    if e:
        lines += exam_status(e, detailed=True)
    return "\n".join(lines)


def transfer_summary(s: dict) -> str:
    """A transfer's summary (``imtrial_dsl.transfer.send.transfer``): counts, warnings, problems grouped by reason."""
    head = "DRY RUN: " if s["dry_run"] else ""
    route = f" via {' -> '.join(s['via'])}" if s["via"] else ""
    lines = [f"{head}transfer to {s['destination']}{route} ({s['kind']} {s['endpoint']})"]
    if s["dry_run"]:
        lines.append(f"  archived {s['archived']}, already sent {s['already_sent']}, would send {s['to_send']} "
                     f"({s.get('would_send_bytes', 0)} bytes), would refuse {s['refused']}")
    else:
        lines.append(f"  archived {s['archived']}, already sent {s['already_sent']}, sent {s['sent']}, "
                     f"failed {s['failed']}, refused {s['refused']}")
    for w in s["warnings"]:
        lines.append(f"  warning: {w}")
    groups: dict[tuple[str, str], list[dict]] = {}
    for p in s["problems"]:
        groups.setdefault((p["status"], p["reason"]), []).append(p)
    for (status, reason), ps in groups.items():
        if len(ps) == 1:
            what = ps[0].get("sop_uid") or (ps[0].get("sha256") or "")[:16]
            lines.append(f"  {status}: " + (f"{what}: " if what else "") + reason)
        else:
            lines.append(f"  {status} ({len(ps)} instances): {reason}")
    return "\n".join(lines)
