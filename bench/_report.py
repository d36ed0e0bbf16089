"""The results file every bench writes: ``bench/results/NAME.json`` with the date, the machine, then the
bench's own settings, figures and ``ratio_<figure>_vs_<peer>`` entries."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).with_name("results")


def write_report(name: str, body: dict[str, Any], **machine_extra: Any) -> Path:
    """Write the report for bench ``name``; ``machine_extra`` adds facts such as the load average."""
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            **machine_extra,
        },
        **body,
    }
    path = RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
