"""The sibling games on the builtin task (issue 14): AAPA on GRPO, and the APL defender before vs after.

AAPA (configs/aapa_grpo.yaml): GRPO with a fixed RM (aapa.enabled=false) vs GRPO + AAPA vs GRPO + staged AAPA
(aapa.anchor_only_rounds), paired by seed. The anchor's weight aapa.coef is chosen on the tuning seeds (the best
mean final gold score of GRPO + AAPA over a small grid) and the arms are reported on the other seeds.

APL (configs/apl.yaml): per seed, the defender before APL (round 0) vs after the last round, paired by seed:
harmful rate on clean prompts, attack success rate of the fixed attacker (random adjectives, the same prompts
before and after), utility (gold score on clean prompts); and against the trained attacker, the harmfulness
h of its final attacks under the defender before (the reference) and after APL; plus the closed loop's attack
success rate (the initial attacker on the initial defender vs the trained one on the trained one).

Every comparison is a paired difference over the reporting seeds: mean, standard error and a 95% t-interval.
Every run is a real run of the system (apo_ray.train); finished runs are kept under
results/adversarial_games/tmp/scratch/ and reused when their config is unchanged, so an interrupted sweep
continues where it stopped.

    .venv/bin/python -m benchmarks.adversarial_games [--quick] [--games aapa apl] [--seeds 100 ... 109]
        [--tuning-seeds 0 1 2] [--coefs 0.25 0.5 1.0]

The seeds are the quality benchmark's sets (benchmarks/quality.py SEED_SETS): tuning seeds from 0-9, reporting
seeds from 100-119 (the first 10 by default), so that no seed both chooses a setting and reports it.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apo_ray.logs import configure_logging
from benchmarks.common import (
    REPO_ROOT,
    BenchmarkRun,
    add_niceness_argument,
    base_parser,
    fmt,
    mean_ci,
    set_ray_worker_niceness,
    start_ray_with_retries,
)
from benchmarks.quality import SEED_SETS, _saved_config_matches

AAPA_CONFIG = REPO_ROOT / "configs/aapa_grpo.yaml"
APL_CONFIG = REPO_ROOT / "configs/apl.yaml"
GOLD = "eval/gold_score"
COMMON = ("logging.tensorboard=false", "logging.report=false", "logging.ray_metrics=false")
QUICK = (
    "rounds=2",
    "eval_every=1",
    "data.builtin.n_pairs=64",
    "data.builtin.n_gold=8",
    "data.builtin.n_prompts=16",
    "data.builtin.n_eval_pairs=16",
    "reward.initial_epochs=1",
)
APL_CHANGES = (
    ("apl/harmful_rate", "harmful rate, clean prompts", "lower"),
    ("apl/attack_success_rate_fixed", "attack success, fixed attacker", "lower"),
    ("apl/utility", "utility (gold score, clean prompts)", "higher"),
)


def play(key: str, config: Path, overrides: Sequence[str], seed: int, scratch: Path) -> list[dict[str, Any]] | str:
    """The run's metrics rows (reused when its config is unchanged), or the error's last line."""
    from apo_ray.config import load_config
    from apo_ray.metrics import read_metrics_jsonl
    from apo_ray.train import prepare, run

    run_dir = scratch / f"{key}-s{seed}"
    cfg = load_config(config, [*overrides, *COMMON, f"seed={seed}", f"run_dir={run_dir}"])
    if not ((run_dir / "summary.json").is_file() and _saved_config_matches(run_dir, cfg)):
        shutil.rmtree(run_dir, ignore_errors=True)
        started = time.perf_counter()
        try:
            run(prepare(cfg))
        except Exception:  # one failed run must not lose the rest of a long sweep; the error is reported
            error = traceback.format_exc(limit=8)
            print(f"[adversarial_games] {key} seed {seed} failed:\n{error}", flush=True)
            return error.strip().splitlines()[-1]
        print(f"[adversarial_games] {key} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    return read_metrics_jsonl(run_dir / "metrics.jsonl")


def final(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in rows if row.get(key) is not None]
    return values[-1] if values else None


def first(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in rows if row.get(key) is not None]
    return values[0] if values else None


def paired(after: dict[int, float | None], before: dict[int, float | None]) -> dict[str, Any] | None:
    """after - before over the seeds both have: mean, SE, 95% t-interval, and the per-seed differences."""
    diffs = {s: after[s] - before[s] for s in after if after[s] is not None and before.get(s) is not None}
    return {**mean_ci(list(diffs.values())), "per_seed": diffs} if diffs else None


def interval(d: dict[str, Any] | None) -> str:
    if d is None:
        return "-"
    if math.isnan(d["stderr"]):
        return f"{d['mean']:+.3f} (one seed)"
    return f"{d['mean']:+.3f} ± {fmt(d['stderr'])} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def difference_chart(run: BenchmarkRun, filename: str, title: str, diffs: dict[str, dict[str, Any] | None]) -> None:
    """The paired differences as bars with their 95% t-intervals (those measured on more than one seed)."""
    shown = {label: d for label, d in diffs.items() if d is not None and not math.isnan(d["stderr"])}
    if shown:
        run.add_bar_chart(
            filename,
            list(shown),
            [d["mean"] for d in shown.values()],
            ylabel="paired difference",
            title=title,
            errors=[(d["lo"], d["hi"]) for d in shown.values()],
        )


def reading(d: dict[str, Any] | None, better: str) -> str:
    """Whether the 95% interval excludes 0, in the direction that is better for the metric."""
    if d is None or math.isnan(d["stderr"]):
        return "not enough seeds"
    if d["lo"] > 0 or d["hi"] < 0:
        up = d["lo"] > 0
        return "better" if up == (better == "higher") else "worse"
    return "no clear difference"


# ---------------------------------------------------------------------------------------------- AAPA


def aapa(args: argparse.Namespace, scratch: Path, run: BenchmarkRun) -> dict[str, Any]:
    base = list(QUICK if args.quick else ())
    tuning = {}
    for coef in args.coefs:
        finals = [
            final(rows, GOLD)
            for seed in args.tuning_seeds
            if isinstance(
                rows := play(f"aapa-tune-c{coef:g}", AAPA_CONFIG, [*base, f"aapa.coef={coef}"], seed, scratch), list
            )
        ]
        tuning[coef] = mean_ci([f for f in finals if f is not None]) if any(f is not None for f in finals) else None
    if not any(tuning.values()):
        raise RuntimeError("AAPA: every tuning run failed; nothing to choose aapa.coef from (see the errors above)")
    chosen = max((c for c in tuning if tuning[c]), key=lambda c: (tuning[c]["mean"], -c))
    staged_rounds = 1 if args.quick else args.anchor_only_rounds
    arms = {
        "GRPO": ["aapa.enabled=false"],
        "GRPO+AAPA": [f"aapa.coef={chosen}"],
        "GRPO+AAPA staged": [f"aapa.coef={chosen}", f"aapa.anchor_only_rounds={staged_rounds}"],
    }
    results = {
        name: {
            seed: play(name.lower().replace("+", "-").replace(" ", "-"), AAPA_CONFIG, [*base, *extra], seed, scratch)
            for seed in args.seeds
        }
        for name, extra in arms.items()
    }
    ok = {name: {s: rows for s, rows in runs.items() if isinstance(rows, list)} for name, runs in results.items()}
    gold = {name: {s: final(rows, GOLD) for s, rows in runs.items()} for name, runs in ok.items()}
    diffs = {name: paired(gold[name], gold["GRPO"]) for name in arms if name != "GRPO"}

    run.add_table(
        "AAPA: aapa.coef on the tuning seeds (GRPO + AAPA, final gold score)",
        ["aapa.coef", "mean ± SE", "seeds"],
        [
            [c, "-" if t is None else f"{fmt(t['mean'])} ± {fmt(t['stderr'])}", "-" if t is None else t["n"]]
            for c, t in tuning.items()
        ],
        note=f"Tuning seeds {args.tuning_seeds}; chosen: aapa.coef={chosen:g}, used for every AAPA arm below.",
    )
    rows = []
    for name in arms:
        g = [v for v in gold[name].values() if v is not None]
        disc = [final(r, "aapa/disc_score") for r in ok[name].values()]
        disc = [d for d in disc if d is not None]
        stat = mean_ci(g) if g else None
        rows.append(
            [
                name,
                "-" if stat is None else f"{fmt(stat['mean'])} ± {fmt(stat['stderr'])}",
                interval(diffs.get(name)),
                reading(diffs.get(name), "higher") if name != "GRPO" else "",
                fmt(mean_ci(disc)["mean"]) if disc else "-",
                len(g),
            ]
        )
    run.add_table(
        "AAPA vs GRPO on the reporting seeds",
        [
            "arm",
            "final gold score (mean ± SE)",
            "Δ vs GRPO: mean ± SE [95% t-interval]",
            "reading",
            "final aapa/disc_score",
            "seeds",
        ],
        rows,
        note=f"Reporting seeds {args.seeds}; Δ paired by seed. Staged: aapa.anchor_only_rounds={staged_rounds}.",
    )
    difference_chart(
        run,
        "aapa_differences.png",
        "AAPA: final gold minus GRPO's (95% t-interval)",
        {name.removeprefix("GRPO+"): diffs[name] for name in diffs},
    )
    failed = [[name, s, rows] for name, runs in results.items() for s, rows in runs.items() if isinstance(rows, str)]
    if failed:
        run.add_table("AAPA runs that failed (left out)", ["arm", "seed", "error"], failed)
    return {"tuning": tuning, "chosen_coef": chosen, "final_gold": gold, "differences": diffs}


# ---------------------------------------------------------------------------------------------- APL


def apl(args: argparse.Namespace, scratch: Path, run: BenchmarkRun) -> dict[str, Any]:
    base = [*QUICK, "apl.prompts_per_round=8", "apl.defender_sft_steps=60"] if args.quick else []
    results = {seed: play("apl", APL_CONFIG, base, seed, scratch) for seed in args.seeds}
    ok = {s: rows for s, rows in results.items() if isinstance(rows, list)}
    changes = {
        key: paired({s: final(r, key) for s, r in ok.items()}, {s: first(r, key) for s, r in ok.items()})
        for key, _, _ in APL_CHANGES
    }
    trained = paired(
        {s: final(r, "apl/eval_harm") for s, r in ok.items()},
        {s: final(r, "apl/eval_harm_reference") for s, r in ok.items()},
    )
    loop = paired(
        {s: final(r, "apl/attack_success_rate") for s, r in ok.items()},
        {s: first(r, "apl/attack_success_rate") for s, r in ok.items()},
    )

    def level(key: str, pick) -> str:
        values = [v for r in ok.values() if (v := pick(r, key)) is not None]
        return f"{fmt(mean_ci(values)['mean'])}" if values else "-"

    rows = [
        [label, level(key, first), level(key, final), interval(changes[key]), reading(changes[key], better)]
        for key, label, better in APL_CHANGES
    ]
    rows.append(
        [
            "harmfulness h, trained attacker's final attacks",
            level("apl/eval_harm_reference", final),
            level("apl/eval_harm", final),
            interval(trained),
            reading(trained, "lower"),
        ]
    )
    rows.append(
        [
            "attack success, closed loop (attacker and defender both trained)",
            level("apl/attack_success_rate", first),
            level("apl/attack_success_rate", final),
            interval(loop),
            "(both players move)",
        ]
    )
    run.add_table(
        "APL: the defender before (round 0) vs after the last round",
        ["measure", "before", "after", "after - before: mean ± SE [95% t-interval]", "reading"],
        rows,
        note=f"Seeds {sorted(ok)}; paired by seed. h before is the reference's (the defender before APL) on "
        "the same final attacks as h after.",
    )
    difference_chart(
        run,
        "apl_differences.png",
        "APL: after minus before (95% t-interval)",
        {
            "harmful rate": changes["apl/harmful_rate"],
            "fixed attack success": changes["apl/attack_success_rate_fixed"],
            "utility (gold)": changes["apl/utility"],
            "h, trained attacks": trained,
        },
    )
    failed = [[s, rows] for s, rows in results.items() if isinstance(rows, str)]
    if failed:
        run.add_table("APL runs that failed (left out)", ["seed", "error"], failed)
    return {"changes": changes, "harm_trained_attacker": trained, "closed_loop_attack_success": loop}


# ---------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--games", nargs="+", choices=("aapa", "apl"), default=["aapa", "apl"])
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=list(SEED_SETS["reporting"][:10]), help="reporting seeds (from 100-119)"
    )
    parser.add_argument(
        "--tuning-seeds",
        type=int,
        nargs="+",
        default=list(SEED_SETS["tuning"][:3]),
        help="seeds that choose aapa.coef (from 0-9)",
    )
    parser.add_argument("--coefs", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="aapa.coef grid")
    parser.add_argument("--anchor-only-rounds", type=int, default=5, help="the staged arm's aapa.anchor_only_rounds")
    add_niceness_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.tuning_seeds, args.coefs = args.seeds[:1], args.tuning_seeds[:1], args.coefs[:1]
    for name, seeds, allowed in (("--seeds", args.seeds, "reporting"), ("--tuning-seeds", args.tuning_seeds, "tuning")):
        if not set(seeds) <= set(SEED_SETS[allowed]):
            parser.error(
                f"{name}: {sorted(set(seeds) - set(SEED_SETS[allowed]))} are not {allowed} seeds "
                f"({SEED_SETS[allowed][0]}-{SEED_SETS[allowed][-1]})"
            )
    return args


def main() -> None:
    args = parse_args()
    configure_logging(False)
    set_ray_worker_niceness(args.ray_worker_niceness)
    run = BenchmarkRun("adversarial_games", "The sibling games: AAPA on GRPO, APL's defender before vs after", args)
    import ray

    from apo_ray.cluster import init_ray
    from apo_ray.config import load_config

    scratch = run.scratch / ("quick" if args.quick else "full")
    # The larger plan of the two games (APL's attacker adds a learner and a rollout worker).
    start_ray_with_retries(lambda: init_ray(load_config(APL_CONFIG)))
    results = {}
    try:
        for game in args.games:
            results[game] = (aapa if game == "aapa" else apl)(args, scratch, run)
    finally:
        ray.shutdown()
    run.finish({"seeds": args.seeds, "tuning_seeds": args.tuning_seeds, **results})


if __name__ == "__main__":
    main()
