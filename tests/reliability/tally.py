"""How many fuzz cases the reliability tests tried, by outcome (printed at the end of the run)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

TALLY: dict[str, Counter] = {}
REPORT = Path(__file__).resolve().parents[1] / "artifacts" / "fuzz_counts.json"


def count(suite: str, outcome: str) -> None:
    """Count one case of `suite` that ended in `outcome`."""
    TALLY.setdefault(suite, Counter())[outcome] += 1


def summary() -> list[str]:
    """One line per suite; this run's counts replace those suites' in fuzz_counts.json."""
    if not TALLY:
        return []
    REPORT.parent.mkdir(exist_ok=True)
    try:
        recorded = json.loads(REPORT.read_text())
    except (OSError, ValueError):
        recorded = {}
    recorded.update({k: dict(v) for k, v in TALLY.items()})
    REPORT.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    return [f"{suite}: {sum(c.values())} cases tried ("
            + ", ".join(f"{k} {v}" for k, v in sorted(c.items())) + ")"
            for suite, c in sorted(TALLY.items())]
