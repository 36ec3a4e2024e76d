"""Write the fault suite's outcomes (`pytest tests/faults --fault-report R.json`) into RELIABILITY.md.

    python -m tests.faults.report R.json [RELIABILITY.md]

Only the part between the `<!-- fault-table -->` markers is replaced; the prose around it is kept.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

START, END = "<!-- fault-table:start -->", "<!-- fault-table:end -->"
GROUPS = ["build", "fetch", "strangers", "serve", "swarm", "network", "trainer"]


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(report: dict) -> str:
    """The outcome table, as Markdown."""
    cases = sorted(
        report["cases"],
        key=lambda c: (GROUPS.index(c["group"]) if c["group"] in GROUPS else len(GROUPS), c["test"]),
    )
    total = sum(c["seconds"] for c in cases)
    lines = [
        f"Last full run: {report['finished']} on {report['machine']}, Python {report['python']}; "
        f"`--fault-runs {report['fault_runs']} --fault-seed {report['seed']}`; "
        f"{len(cases)} cases in {total / 60:.1f} min.",
        "",
        "| Area | Case | Runs | Failures | Data lost | What counts as lost | Rerun |",
        "|---|---|--:|--:|--:|---|---|",
    ]
    for c in cases:
        rerun = f"`pytest '{c['nodeid'] or c['test']}' --fault-runs {report['fault_runs']} --fault-seed {report['seed']}`"
        status = "" if c["status"] == "passed" else f" ({c['status']})"
        lines.append(
            f"| {c['group']} | {_cell(c['case'])}{status} | {c['runs']} | {c['failures']} | {c['lost']} "
            f"| {_cell(c['lost_means'])} | {rerun} |"
        )
    failed = [c for c in cases if c["failures"] or c["lost"] or c["status"] == "failed"]
    lines += [
        "",
        f"**{sum(c['runs'] for c in cases)} runs, {sum(c['failures'] for c in cases)} failures, "
        f"{sum(c['lost'] for c in cases)} units of data lost.**"
        + ("" if not failed else " Failing: " + ", ".join(c["test"] for c in failed) + "."),
    ]
    return "\n".join(lines)


def update(markdown: str, report: dict) -> str:
    """`markdown` with the text between the markers replaced by the table of `report`."""
    head, start, rest = markdown.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise SystemExit(f"the markers {START} and {END} are missing")
    return f"{head}{START}\n{table(report)}\n{END}{tail}"


def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    report = json.loads(Path(argv[0]).read_text())
    target = Path(argv[1] if len(argv) > 1 else "RELIABILITY.md")
    target.write_text(update(target.read_text(), report))
    print(f"{target}: {len(report['cases'])} cases written")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
