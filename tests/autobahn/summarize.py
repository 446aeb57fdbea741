"""Summarize Autobahn|Testsuite fuzzing-client reports (written by tests/autobahn/run.py).

Reads each report directory's index.json (Autobahn's verdict per agent and case) and the
per-case JSON files it points to, and prints one row per agent: how many cases came out OK,
NON-STRICT, FAILED, INFORMATIONAL, UNIMPLEMENTED (the excluded cases count here), and how
many have a closing behaviour other than OK/INFORMATIONAL; then every case that is not OK,
with Autobahn's description, expectation and result text.

A case an agent should have run but has no result for counts as FAILED: a wstest that
stopped early must not look like a clean run.

    python3 tests/autobahn/summarize.py OUT/summary-input.json

The input names the report directories, the cases each agent must have, the excluded cases,
and the agents whose FAILED or NON-STRICT cases (or a closing behaviour of FAILED, UNCLEAN
or WRONG CODE) make the exit status 1; the others are reported only.
"""
import json
import sys
from pathlib import Path

VERDICTS = ("OK", "NON-STRICT", "FAILED", "INFORMATIONAL", "UNIMPLEMENTED")
# Autobahn's report paints these closing behaviours red or amber; FAILED BY CLIENT ("it is
# preferred that the server close the TCP connection") and INFORMATIONAL are not defects.
BAD_CLOSE = ("FAILED", "UNCLEAN", "WRONG CODE")
FINE_CLOSE = ("OK", "INFORMATIONAL")


def case_key(case_id):
    return tuple(int(part) for part in case_id.split("."))


def load(reports, expected, excluded):
    """{agent: {case id: result dict}} from the report directories."""
    results = {agent: {} for agent in expected}
    for directory in map(Path, reports):
        index = json.loads((directory / "index.json").read_text())
        for agent, cases in index.items():
            for case_id, entry in cases.items():
                detail = json.loads((directory / entry["reportfile"]).read_text())
                results.setdefault(agent, {})[case_id] = {
                    "behavior": entry["behavior"], "behaviorClose": entry["behaviorClose"],
                    "remoteCloseCode": entry["remoteCloseCode"], "duration": entry["duration"],
                    "description": detail.get("description", ""), "expectation": detail.get("expectation", ""),
                    "result": detail.get("result", ""), "resultClose": detail.get("resultClose", ""),
                    "remoteCloseReason": detail.get("remoteCloseReason"),
                    "expectedEvents": detail.get("expected"), "receivedEvents": detail.get("received"),
                    "expectedClose": detail.get("expectedClose"),
                }
    for agent, case_ids in expected.items():
        for case_id in case_ids:
            results[agent].setdefault(case_id, {
                "behavior": "FAILED", "behaviorClose": "FAILED", "remoteCloseCode": None, "duration": 0,
                "description": "", "expectation": "", "result": "no result: wstest did not run this case",
                "resultClose": ""})
        for case_id, description in excluded.items():
            results[agent].setdefault(case_id, {
                "behavior": "UNIMPLEMENTED", "behaviorClose": "UNIMPLEMENTED", "remoteCloseCode": None, "duration": 0,
                "description": description, "expectation": "", "result": "excluded: permessage-deflate (not offered)",
                "resultClose": ""})
    return results


def counts(cases):
    row = {verdict: 0 for verdict in VERDICTS}
    for case in cases.values():
        row[case["behavior"] if case["behavior"] in row else "FAILED"] += 1
    row["close not OK"] = sum(case["behaviorClose"] not in FINE_CLOSE + ("UNIMPLEMENTED",) for case in cases.values())
    return row


def table(results):
    columns = VERDICTS + ("close not OK",)
    lines = ["| agent | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for agent, cases in results.items():
        row = counts(cases)
        lines.append(f"| {agent} | " + " | ".join(str(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def not_ok(cases):
    return [(case_id, case) for case_id, case in sorted(cases.items(), key=lambda item: case_key(item[0]))
            if case["behavior"] not in ("OK", "UNIMPLEMENTED") or case["behaviorClose"] not in FINE_CLOSE + ("UNIMPLEMENTED",)]


def one_line(text, limit=None):
    """Autobahn's descriptions are HTML fragments over several lines."""
    text = " ".join(str(text).replace("<br>", " ").split())
    return text if limit is None or len(text) <= limit else text[:limit] + " ..."


def details(results):
    lines = []
    for agent, cases in results.items():
        listed = not_ok(cases)
        unimplemented = sorted((c for c, case in cases.items() if case["behavior"] == "UNIMPLEMENTED"), key=case_key)
        lines.append(f"\n{agent}: {len(listed)} case(s) not OK"
                     + (f"; UNIMPLEMENTED: {len(unimplemented)} ({unimplemented[0]} to {unimplemented[-1]})"
                        if unimplemented else ""))
        for case_id, case in listed:
            lines.append(f"  {case_id} {case['behavior']}, close {case['behaviorClose']} ({case['duration']} ms): "
                         f"{one_line(case['description'])}")
            lines.append(f"      expectation: {one_line(case['expectation'])}")
            if case.get("expectedEvents") is not None:
                lines.append(f"      events expected: {one_line(case['expectedEvents'], 300)}; "
                             f"close expected: {case['expectedClose']}")
                lines.append(f"      events observed: {one_line(case['receivedEvents'], 300)}; server's close: "
                             f"{case['remoteCloseCode']} {case['remoteCloseReason']!r}")
            lines.append(f"      Autobahn: {case['result']} / {case['resultClose']}")
    return "\n".join(lines)


def failing(results, strict):
    return {agent: [case_id for case_id, case in not_ok(results[agent])
                    if case["behavior"] in ("FAILED", "NON-STRICT") or case["behaviorClose"] in BAD_CLOSE]
            for agent in strict}


def main(argv):
    plan = json.loads(Path(argv[0]).read_text())
    results = load(plan["reports"], plan["expected"], plan["excluded"])
    print(table(results))
    print(details(results))
    Path(argv[0]).with_name("summary.json").write_text(json.dumps(
        {agent: {"counts": counts(cases), "cases": cases} for agent, cases in results.items()}, indent=1))
    bad = {agent: ids for agent, ids in failing(results, plan["strict"]).items() if ids}
    if bad:
        print("\nautobahn: FAILED or NON-STRICT (or a bad close) on " +
              "; ".join(f"{agent}: {len(ids)}" for agent, ids in bad.items()))
        return 1
    if not plan["strict"]:
        print("\nautobahn: report only (no patched-build agents in this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
