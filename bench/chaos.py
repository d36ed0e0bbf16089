"""Chaos bench: the harness of tests/chaos with longer windows around each kill; writes the table
(part killed x kind of call -> ok, failed, cut, refused, never completed, duplicated, slowest call,
duplicate runs discarded, recovery seconds) to bench/results/chaos.json.

    PYTHONPATH=. .venv/bin/python bench/chaos.py            # 10 s before and after each kill
    PYTHONPATH=. .venv/bin/python bench/chaos.py --quick    # 2 s (under 2 minutes on an idle box)
"""

from __future__ import annotations

import argparse
import os

from _report import write_report

from servefleet import chaos


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 s windows instead of 10 s")
    parser.add_argument("--parts", default=",".join(chaos.ALL_PARTS), help="comma-separated parts to kill")
    args = parser.parse_args()
    window = 2.0 if args.quick else 10.0
    load_before = os.getloadavg()[0]
    outcomes = chaos.run(tuple(args.parts.split(",")), before_s=window, after_s=window, progress=print)
    rows = chaos.table(outcomes)
    for row in rows:
        print({k: v for k, v in row.items() if k not in ("errors", "cut_started")})
    path = write_report(
        "chaos",
        {
            "settings": {
                "window_s": window,
                "deadline_s": 30.0,
                "parts": args.parts.split(","),
                "callers": {**chaos.CALLERS, "async": 1},
            },
            "results": rows,
        },
        load_average_1m_at_start=round(load_before, 2),
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
