"""Choosing the recipe on the tuning seeds (issue 11): every candidate recipe against the committed defaults.

The quality benchmark's tuning sweeps (`--seed-set tuning --set KEY=VALUE`) each compare one recipe's APO arm
with the fixed-RM arm. Choosing a default needs the other comparison: the candidate recipe's arm against the
same arm with the defaults, paired by tuning seed. Both come from the runs the sweeps left in the committed
ledger (benchmarks/results/quality/runs.jsonl) on this kind of machine; nothing is run here.

    .venv/bin/python -m benchmarks.recipe_choice --arm apo-rjs \
        --candidates reward.apo_normalization=pooled reward.epochs_per_round=3 reward.reinit_each_round=true rounds=8

A candidate is one `KEY=VALUE` or several joined by `+`. Its rows use the seeds it has runs for.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_ROOT, BenchmarkRun, base_parser
from benchmarks.quality import (
    ALL_ARMS,
    GOLD,
    RUN_LEDGER,
    RunRecord,
    _arm_cell,
    _diff_cell,
    _final,
    _mean_over_game_rounds,
    arm_spread,
    ledger_record,
    paired_difference,
    verdict,
)
from benchmarks.quality import parse_args as quality_args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--arm", default="apo-rjs", choices=[arm.key for arm in ALL_ARMS if arm.baseline])
    parser.add_argument("--candidates", nargs="+", required=True, metavar="KEY=VALUE[+KEY=VALUE]")
    args = parser.parse_args(argv)
    args.out = args.out or RESULTS_ROOT / "quality" / "tuning"
    return args


def ledger_runs(arm_key: str, recipe: Sequence[str], ledger: Path = RUN_LEDGER) -> list[RunRecord]:
    """The ledger's runs of an arm under a recipe (the tuning seeds that have one)."""
    args = quality_args(["--seed-set", "tuning", *(["--set", *recipe] if recipe else [])])
    arm = next(a for a in ALL_ARMS if a.key == arm_key)
    return [record for seed in args.seeds if (record := ledger_record(arm, seed, args, ledger)) is not None]


def candidate_row(
    arm_key: str, baseline_key: str, candidate: str, default: list[RunRecord], ledger: Path = RUN_LEDGER
) -> tuple[list[Any], dict]:
    """A table row for `candidate` ("" for the defaults) and its numbers."""
    recipe = candidate.split("+") if candidate else []
    runs, fixed = ledger_runs(arm_key, recipe, ledger), ledger_runs(baseline_key, recipe, ledger)
    # The defaults' own row compares them with the fixed RM only.
    final = paired_difference(runs, default, GOLD, _final) if recipe else None
    over_rounds = paired_difference(runs, default, GOLD, _mean_over_game_rounds) if recipe else None
    against_fixed = paired_difference(runs, fixed, GOLD, _final)
    spread = arm_spread(runs)

    def diff_cell(diff: dict | None) -> str:
        return "-" if diff is None else f"{_diff_cell(diff)}: {verdict(diff)}"

    row = [
        candidate,
        len(runs),
        _arm_cell(spread),
        diff_cell(final),
        diff_cell(over_rounds),
        diff_cell(against_fixed),
        sum(bool(r.apo_inert) for r in runs),
    ]
    return row, {
        "seeds": [r.seed for r in runs],
        "final_vs_default": final,
        "rounds_vs_default": over_rounds,
        "final_vs_fixed": against_fixed,
        "arm": spread,
    }


def main() -> None:
    args = parse_args()
    run = BenchmarkRun("recipe_choice", "Recipe choice on the tuning seeds: each candidate against the defaults", args)
    arm = next(a for a in ALL_ARMS if a.key == args.arm)
    baseline_key = next(a.key for a in ALL_ARMS if a.name == arm.baseline)
    default = ledger_runs(args.arm, [])
    rows, results = [], {}
    default_row, results["defaults"] = candidate_row(args.arm, baseline_key, "", default)
    rows.append(["the defaults", *default_row[1:]])
    for candidate in args.candidates:
        row, results[candidate] = candidate_row(args.arm, baseline_key, candidate, default)
        rows.append(row)
    run.add_table(
        f"{arm.name}: candidate recipes against the defaults (tuning seeds, final gold score)",
        [
            "recipe",
            "seeds",
            f"{arm.name} final gold",
            "Δ vs defaults, final",
            "Δ vs defaults, mean of rounds ≥ 1",
            f"Δ vs {arm.baseline} (same recipe), final",
            "seeds with the APO term inert",
        ],
        rows,
        note="Δ: paired by tuning seed, mean [95% t-interval] (seeds where the candidate is higher / seeds): "
        "verdict. The defaults are configs/default.yaml as committed; a candidate is the same with its "
        "overrides. 'vs defaults' chooses the recipe; 'vs the fixed RM' is the game's gain under it (its "
        "fixed-RM runs are the defaults' where the recipe changes only APO's keys). Runs from the ledger, "
        "this machine kind only; the inert count is each run's own summary, under the check of its commit.",
    )
    run.finish({"arm": args.arm, "recipes": results})


if __name__ == "__main__":
    main()
