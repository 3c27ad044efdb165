"""Do two runs of the same config and seed log the same numbers? Compares metrics.jsonl row by row.

Every metric the two runs share is compared at every step, except wall-clock ones (timing/*, */tokens_per_s,
*_s, rollout throughput, and the shares of the matmul ceiling: efficiency/*, ceiling/*), which no refactor can
hold equal. Prints the largest difference per metric and exits
1 when any exceeds --tol, or when a step or metric is in one run only (after --rename OLD=NEW, for a metric
that changed its name between the two code versions, and --dropped KEY, for one the newer version no longer
logs).

    python scripts/same_metrics.py RUN_BEFORE RUN_AFTER [--rename policy/kl=eval/kl] [--dropped KEY] [--tol 1e-6]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

WALL_CLOCK = re.compile(
    r"^timing/|^efficiency/|^ceiling/|tokens_per_s|_per_s$|_s$|^rollout/(generate|sync)_|^sync/|/seconds"
)


def read_rows(run_dir: Path, renames: dict[str, str], dropped: set[str]) -> dict[int, dict[str, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        sys.exit(f"{run_dir}: no metrics.jsonl")
    rows: dict[int, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        step = row.pop("step")
        kept = {k: v for k, v in row.items() if not WALL_CLOCK.search(k) and k not in dropped}
        rows.setdefault(step, {}).update({renames.get(k, k): v for k, v in kept.items()})
    return rows


def differences(before: dict[int, dict], after: dict[int, dict]) -> tuple[dict[str, float], list[str]]:
    """({metric: largest |before - after| over steps}, what is in one run only)."""
    largest: dict[str, float] = {}
    unmatched = [f"step {s}: only in {'before' if s in before else 'after'}" for s in sorted(set(before) ^ set(after))]
    for step in sorted(set(before) & set(after)):
        a, b = before[step], after[step]
        unmatched += [f"step {step}: {k} only in {'before' if k in a else 'after'}" for k in sorted(set(a) ^ set(b))]
        for key in set(a) & set(b):
            x, y = a[key], b[key]
            if x is None or y is None or isinstance(x, str) or isinstance(y, str):
                gap = 0.0 if x == y else math.inf
            else:
                gap = abs(float(x) - float(y))
            largest[key] = max(largest.get(key, 0.0), gap)
    return largest, unmatched


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument(
        "--rename",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="a metric the older run logged under another name",
    )
    parser.add_argument(
        "--dropped",
        action="append",
        default=[],
        metavar="KEY",
        help="a metric the older run logged and the newer one no longer does",
    )
    parser.add_argument("--tol", type=float, default=1e-6, help="largest absolute difference that counts as equal")
    args = parser.parse_args(argv)
    renames = dict(item.split("=", 1) for item in args.rename)
    dropped = set(args.dropped)
    before, after = read_rows(args.before, renames, dropped), read_rows(args.after, renames, dropped)
    largest, unmatched = differences(before, after)
    worst = sorted(largest.items(), key=lambda kv: -kv[1])
    print(f"{len(set(before) & set(after))} steps, {len(largest)} metrics compared (wall-clock ones left out)")
    for key, gap in worst[:10]:
        print(f"  {key:40s} max |diff| {gap:.3g}")
    for line in unmatched:
        print(f"  {line}")
    failed = [key for key, gap in worst if gap > args.tol]
    print("same metrics" if not failed and not unmatched else f"DIFFERENT: {', '.join(failed) or 'unmatched keys'}")
    return 1 if failed or unmatched else 0


if __name__ == "__main__":
    sys.exit(main())
