"""Chaos bench: the harness of tests/chaos with longer windows around each kill, and the parts
the CI suite leaves out (a standalone broker worker, a Ray worker node, a whole serving cluster:
``chaos.EXTRA_PARTS``); writes the table (part killed x kind of call -> ok, failed, cut, refused,
never completed, duplicated, slowest call, duplicate runs discarded, requests the killed worker
held, recovery seconds) to bench/results/chaos.json.

    PYTHONPATH=. .venv/bin/python bench/chaos.py            # every part, 10 s before and after each kill
    PYTHONPATH=. .venv/bin/python bench/chaos.py --quick    # QUICK_PARTS (one of each kind), 1 s windows
"""

from __future__ import annotations

import argparse
import os
import time

from _report import write_report

from servefleet import chaos

#: One part of each kind (a data-plane actor, a direct replica, a platform service, a dependency):
#: the whole CI list with its stack start takes over the 2 minutes a --quick run may take.
QUICK_PARTS = ("replica", "direct", "broker", "redis")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 s windows, QUICK_PARTS only")
    parser.add_argument("--parts", help="comma-separated parts to kill ('cluster' last)")
    args = parser.parse_args()
    window = 1.0 if args.quick else 10.0
    parts = tuple(args.parts.split(",")) if args.parts else QUICK_PARTS if args.quick else chaos.ALL_PARTS
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    outcomes: list[chaos.Outcome] = []
    error = ""
    try:
        chaos.run(parts, before_s=window, after_s=window, progress=print, outcomes=outcomes)
    except Exception as exc:  # the parts done so far are still written, with what stopped the run
        error = f"{type(exc).__name__}: {str(exc)[-1500:]}"
        print(f"run stopped: {error}")
    rows = chaos.table(outcomes)
    for row in rows:
        print({k: v for k, v in row.items() if k not in ("errors", "cut_started")})
    path = write_report(
        "chaos",
        {
            "settings": {
                "window_s": window,
                "deadline_s": 30.0,
                "parts": list(parts),
                "callers": {**chaos.CALLERS, "async": 1},
                "extra_settings": chaos.EXTRA_SETTINGS if set(parts) & set(chaos.EXTRA_PARTS) else {},
            },
            "wall_s": round(time.monotonic() - started, 1),
            "error": error,
            "results": rows,
        },
        load_average_1m_at_start=round(load_before, 2),
    )
    print(f"wrote {path}")
    if error:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
