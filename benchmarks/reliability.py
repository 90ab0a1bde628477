"""`make reliability`: the reliability suite's long form, as a table.

    .venv/bin/python benchmarks/reliability.py            # long form (~20 min here)
    .venv/bin/python benchmarks/reliability.py --short    # the CI form (a few minutes)

Runs `pytest tests/reliability` (faults under traffic, fuzzed input, sustained load; see
tests/reliability/*.py) with EMBER_RELIABILITY=long, collects the row each scenario reports,
prints one table (scenario, submitted, completed, rejected, failed, lost, duplicates after
dedup, recovery time) and writes it with the details (latency distribution, memory over time,
the load ramp, dead-letter reasons) to benchmarks/results/reliability.md, every row as JSON
to benchmarks/results/reliability.json. Exits non-zero when a test failed or a row has lost
or duplicated requests.

Columns. submitted: requests (and, for fuzz rows, bad records) sent. completed: requests
answered with their text (stop / length). rejected: refused with a reason (a `rejected`
chunk; for fuzz rows, bad records answered by a dead letter and/or a rejected chunk).
failed: `error` after admission. lost: submitted minus answered; a client time-out counts as
lost (for fuzz rows: bad records missing their dead letter or chunk). duplicates: answers
whose text differs from the greedy reference after the client's dedup, or records answered
twice. recovery: from the fault to the answer of the last request it slowed down (latency
over 3x the pre-fault p95, at least 1 s); 0 when no request noticed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def failures(junit: Path) -> list[str]:
    """`test name: first line of the failure` for each failed or erroring test."""
    import xml.etree.ElementTree as ET

    if not junit.exists():
        return []
    found = []
    for case in ET.parse(junit).iter("testcase"):
        for bad in (*case.findall("failure"), *case.findall("error")):
            message = (bad.get("message") or "").strip().splitlines()
            found.append(f"{case.get('name')}: {message[0][:1500] if message else bad.tag}")
    return found


def run_suite(
    long: bool, pytest_args: list[str]
) -> tuple[int, list[dict[str, Any]], list[str], float]:
    """Run the suite; (pytest exit code, rows, failed tests, seconds)."""
    with tempfile.TemporaryDirectory(prefix="ember-reliability-") as tmp:
        report = Path(tmp) / "rows.jsonl"
        junit = Path(tmp) / "junit.xml"
        env = {**os.environ, "EMBER_RELIABILITY": "long" if long else "short",
               "EMBER_RELIABILITY_REPORT": str(report)}
        command = [sys.executable, "-m", "pytest", "tests/reliability", "-q", "-rA",
                   "-p", "no:cacheprovider", f"--junitxml={junit}", *pytest_args]
        print("$ EMBER_RELIABILITY=%s %s" % (env["EMBER_RELIABILITY"], " ".join(command[2:])),
              flush=True)
        t0 = time.monotonic()
        code = subprocess.call(command, cwd=ROOT, env=env)
        seconds = time.monotonic() - t0
        rows = [json.loads(line) for line in report.read_text().splitlines()] \
            if report.exists() else []
        failed = failures(junit)
    return code, rows, failed, seconds


def _recovery(row: dict[str, Any]) -> str:
    value = row.get("recovery_s")
    return "-" if value is None else f"{value:.1f} s"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("scenario", "submitted", "completed", "rejected", "failed", "lost",
            "duplicates after dedup", "recovery")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = (r["scenario"], r["submitted"], r["completed"], r["rejected"], r["failed"],
                 r["lost"], r["duplicates"], _recovery(r))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def details(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        extra = r.get("extra", {})
        out.append(f"### {r['scenario']}\n\n{r.get('notes') or ''}\n")
        if "codes" in extra and extra["codes"]:
            out.append(f"- outcomes other than completed: {extra['codes']}")
        if "recoveries_s" in extra:
            out.append(f"- recovery per fault (s): {extra['recoveries_s']}; slow = latency > "
                       f"{extra.get('slow_s')} s; requests caught mid-generation per fault: "
                       f"{extra.get('mid_stream')}; queue depth 0 "
                       f"{extra.get('idle_after_traffic_s')} s after the last answer")
        if "counts" in extra:
            c = extra["counts"]
            out.append(f"- client: {c.get('restarts', 0)} restarted streams, "
                       f"{c.get('dropped_chunks', 0)} duplicate chunks dropped by the SDK")
        if extra.get("targets_streamed_again"):
            out.append(f"- the long request each fault aimed at: output streamed again "
                       f"{extra['targets_streamed_again']} times (restarted or repeated chunks)")
        if extra.get("not_recovered"):
            out.append(f"- did not recover: {extra['not_recovered']}")
        if "reasons" in extra:
            out.append(f"- dead letters by reason: {extra['reasons']}")
            out.append(f"- answers by finish reason and code: {extra['answers']}")
            out.append(f"- cases by shape: {extra['kinds']} (seed {extra['seed']})")
            if extra.get("queue_peaks") is not None:
                out.append(f"- placement queue at its highest during the fuzz: "
                           f"{extra['queue_peaks']}; back to 0 {extra.get('idle_after_s')} s "
                           "after the last answer")
        if "hold" in extra:
            hold = extra["hold"]
            out.append(f"- held rate {extra['rate']} req/s " + (
                f"(80 % of the best step, {extra['best_rate']} req/s)" if extra["best_rate"]
                else "(no ramp step held: the floor rate)"))
            out.append(f"- TTFT ms p50/p95/p99: {hold['ttft_ms']['p50']}/"
                       f"{hold['ttft_ms']['p95']}/{hold['ttft_ms']['p99']}; latency s "
                       f"p50/p95/p99: {hold['latency_s']['p50']}/{hold['latency_s']['p95']}/"
                       f"{hold['latency_s']['p99']}")
            out.append("\n| ramp step (req/s) | submitted | completed | rejected | TTFT p50 ms "
                       "| TTFT p95 ms | TTFT p99 ms | held |\n|---|---|---|---|---|---|---|---|")
            for s in extra["ramp"]:
                t = s["ttft_ms"]
                out.append(f"| {s['rate']} | {s['submitted']} | {s['completed']} | "
                           f"{s['rejected']} | {t['p50']} | {t['p95']} | {t['p99']} | "
                           f"{'yes' if s['held'] else 'no'} |")
            out.append("\n| process | RSS after warm-up (MiB) | at the end | peak | growth "
                       "| slope (MiB/min) |\n|---|---|---|---|---|---|")
            for name, m in sorted(extra["memory"].items()):
                out.append(f"| {name} | {m['start_mib']} | {m['end_mib']} | {m['peak_mib']} | "
                           f"{m['growth_pct']:+.2f} % | {m['slope_mib_per_min']:+.2f} |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="the CI form, not the long one")
    parser.add_argument("--out", type=Path, default=RESULTS / "reliability.md")
    parser.add_argument(
        "--rows", type=Path, nargs="+", default=None,
        help="render these saved reliability.json files (rows merged, a later scenario of the "
             "same name replacing an earlier one) instead of running the suite",
    )
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args()
    if args.rows:
        merged: dict[str, dict[str, Any]] = {}
        for path in args.rows:
            for row in json.loads(path.read_text()):
                merged[row["scenario"]] = row
        code, rows, failed, seconds = 0, list(merged.values()), [], 0.0
    else:
        code, rows, failed, seconds = run_suite(not args.short, args.pytest_args)
    text = table(rows) if rows else "(no rows: the suite reported nothing)"
    if failed:
        text += "\n\nFailed (no row, or a row that broke a check):\n\n" + "\n".join(
            f"- {f}" for f in failed)
    print("\n" + text + "\n", flush=True)
    bad = [r["scenario"] for r in rows if r["lost"] or r["duplicates"]]
    form = "short" if args.short else "long"
    doc = [
        "# Reliability",
        "",
        f"`make reliability` ({form} form, `EMBER_RELIABILITY={form}`), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        + (f"rows merged from {', '.join(str(p) for p in args.rows)}; " if args.rows else
           f"{seconds / 60:.1f} min, pytest exit code {code}; ")
        + f"{os.cpu_count()} cores, {platform.machine()}, "
        f"Python {platform.python_version()}; a shared, loaded machine: read the counts, "
        "not the absolute times. Columns: see `benchmarks/reliability.py`.",
        "",
        text,
        "",
        "## Details",
        "",
        details(rows),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(doc))
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    if bad:
        print(f"lost or duplicated requests in: {', '.join(bad)}", file=sys.stderr)
    return 1 if code or bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
