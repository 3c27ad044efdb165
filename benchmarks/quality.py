"""Quality on the builtin task, where a gold oracle judges: every policy method with a fixed reward model vs.
the same method in the APO game (the paper's Tables 2 and 3), and the RM ablations of its Table 4.

Every arm is a real run of the system (`apo_ray.train.prepare` + `run`), all on one local Ray cluster, for
several seeds; a seed changes the task's data, the SFT policy and the RM's initialisation, and an arm and its
baseline share them seed by seed, so their differences are paired. Per round the driver measures (see
`apo_ray.driver.APOGame.evaluate`, eval.* of the config): the gold score of the policy's samples on held-out
prompts with its standard error, the game RM's score of the same samples, and the RM's accuracy and ECE on
held-out simulated human pairs and on every within-prompt pair of the policy's samples the oracle tells apart.

A recipe is chosen on the tuning seeds and reported on seeds never used for tuning (issue 11):

    # tuning: one sweep per candidate recipe (--set), each in results/quality/tuning/<recipe>/
    .venv/bin/python -m benchmarks.quality --seed-set tuning --set reward.apo_coef=1.0
    # reporting: the committed defaults, on the reporting seeds, in results/quality/
    .venv/bin/python -m benchmarks.quality --seed-set reporting

Per method the tables give the APO arm minus the fixed-RM arm, paired by seed, with a 95% t-interval, and each
arm's seed SD and worst seed. Online arms (PPO, GRPO) draw as many policy samples per round as an offline one.
Finished runs are kept under results/quality/tmp/scratch/ and reused when their config is unchanged, so a sweep
can be stopped and continued in another sitting, and a fixed-RM arm is run once for every recipe that changes
only APO's keys. Each finished run's settings and evaluated rounds also go to the committed ledger
results/quality/runs.jsonl, so that a sweep continues on a fresh clone, where the scratch runs are gone; a
run is reused on the kind of machine (CPU model, torch build) it was made on only.

    .venv/bin/python -m benchmarks.quality [--quick] [--seed-set tuning|reporting] [--seeds ...] [--arms ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shutil
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from apo_ray.logs import configure_logging
from apo_ray.methods import method_names
from benchmarks.common import (
    REPO_ROOT,
    RESULTS_ROOT,
    BenchmarkRun,
    add_niceness_argument,
    base_parser,
    cpu_model,
    fmt,
    mean_ci,
    set_ray_worker_niceness,
    start_ray_with_retries,
)

CONFIGS = REPO_ROOT / "configs"
DEFAULT_CONFIG = CONFIGS / "default.yaml"
ONLINE_CONFIGS = {"ppo": CONFIGS / "ppo.yaml", "grpo": CONFIGS / "grpo.yaml"}
# Settings are chosen on the tuning seeds and reported on the others; a seed belongs to one set only.
SEED_SETS = {"tuning": tuple(range(10)), "reporting": tuple(range(100, 120))}
DEFAULT_ROUNDS = 5
# A smoke run: two seeds of the set, one round, few evaluation samples.
QUICK_OVERRIDES = ("eval.samples_per_prompt=4", "reward.initial_epochs=2")
# Every finished full run, committed: the scratch runs are git-ignored and lost with the machine.
RUN_LEDGER = RESULTS_ROOT / "quality" / "runs.jsonl"


@dataclass(frozen=True)
class Metric:
    key: str  # metric name in the run's metrics.jsonl
    label: str
    higher_is_better: bool
    # Runs recorded before every method logged the evaluation's KL as eval/kl named it so.
    old_key: str | None = None


METRICS = (
    Metric("eval/gold_score", "gold score", True),
    Metric("eval/rm_score", "RM score", True),
    Metric("rm/acc", "RM acc, human pairs", True),
    Metric("rm/ece", "RM ECE, human pairs", False),
    Metric("rm/acc_policy", "RM acc, policy pairs", True),
    Metric("rm/ece_policy", "RM ECE, policy pairs", False),
    Metric("eval/kl", "KL to reference", False, old_key="policy/kl"),
    Metric("eval/response_length", "response length", False),
)
GOLD, ACC_POLICY = "eval/gold_score", "rm/acc_policy"


@dataclass(frozen=True)
class Arm:
    name: str  # the row label
    key: str  # directory-safe name
    overrides: tuple[str, ...]
    family: str  # the plot panel it belongs to
    baseline: str | None = None  # the arm it is compared with, seed by seed
    online: bool = False


def _offline(method: str, family: str, online: bool = False) -> tuple[Arm, Arm]:
    """A method's fixed-RM arm and its APO arm."""
    upper = method.upper()
    return (
        Arm(upper, method, (f"method={method}", "apo=false"), family, online=online),
        Arm(f"APO-{upper}", f"apo-{method}", (f"method={method}", "apo=true"), family, baseline=upper, online=online),
    )


# Every offline method of the registry; the online ones that have a tuned config (ONLINE_CONFIGS).
METHOD_ARMS: tuple[Arm, ...] = (
    *(arm for name in method_names("offline") for arm in _offline(name, name.upper())),
    *(arm for name in ONLINE_CONFIGS for arm in _offline(name, name.upper(), online=True)),
)
_APO_RJS = ("method=rjs", "apo=true")
ABLATION_ARMS: tuple[Arm, ...] = (
    Arm(
        "APO-RJS, no human term (GAIL-like)",
        "apo-rjs-no-human",
        (*_APO_RJS, "reward.pref_coef=0"),
        "ablations",
        baseline="APO-RJS",
    ),
    Arm(
        "APO-RJS, raw difference (WGAN-like)",
        "apo-rjs-diff",
        (*_APO_RJS, "reward.loss=diff"),
        "ablations",
        baseline="APO-RJS",
    ),
    Arm(
        "APO-RJS, RM re-initialised each round",
        "apo-rjs-reinit",
        (*_APO_RJS, "reward.reinit_each_round=true"),
        "ablations",
        baseline="APO-RJS",
    ),
    Arm(
        "APO-RJS, no APO pairs (extra RM training only)",
        "apo-rjs-no-apo-pairs",
        (*_APO_RJS, "reward.apo_coef=0"),
        "ablations",
        baseline="APO-RJS",
    ),
)
ALL_ARMS = METHOD_ARMS + ABLATION_ARMS
QUICK_ARMS = ("RJS", "APO-RJS")


# ---------------------------------------------------------------------------------------------- configs


def _flat_overrides(section: str, values: dict[str, Any]) -> list[str]:
    return [f"{section}.{key}={value}" for key, value in values.items()]


def iterations_per_round(cfg: Any) -> int:
    """PPO iterations that draw as many policy samples as one offline round (every policy prompt once)."""
    return math.ceil(cfg.data.builtin.n_prompts / cfg.ppo.prompts_per_iteration)


def arm_config(arm: Arm, seed: int, run_dir: Path, args: argparse.Namespace) -> Any:
    """The arm's validated Config: the recipe (--set) on top of the arm's overrides. Online arms start from
    their configs/<method>.yaml with the RM settings of configs/default.yaml, so that every row's RM is fitted
    the same way in round 0."""
    from apo_ray.config import load_config

    common = [
        f"seed={seed}",
        f"run_dir={run_dir}",
        "logging.tensorboard=false",
        "logging.report=false",
        "logging.ray_metrics=false",
        *(QUICK_OVERRIDES if args.quick else ()),
        *args.set,
    ]
    if args.rollout_backend:
        common.append(f"rollout.backend={args.rollout_backend}")
    if args.learner_backend:
        common.append(f"learner.backend={args.learner_backend}")
    if not arm.online:
        return load_config(args.config, [*arm.overrides, f"rounds={args.rounds}", *common])
    config = ONLINE_CONFIGS[arm.overrides[0].removeprefix("method=")]
    default = yaml.safe_load(DEFAULT_CONFIG.read_text())
    base = load_config(config, _flat_overrides("reward", default["reward"]))
    k = iterations_per_round(base)
    schedule = [
        f"rounds={args.rounds * k}",
        f"eval_every={k}",
        f"checkpoint_every={args.rounds * k}",
        f"reward.update_every={k}",
    ]
    return load_config(config, [*_flat_overrides("reward", default["reward"]), *arm.overrides, *schedule, *common])


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class RunRecord:
    arm: str
    seed: int
    rounds: list[dict[str, float]] = field(default_factory=list)  # one row per evaluated round
    wall_s: float | None = None
    reused: bool = False
    error: str | None = None
    # Why the run's APO term was inert (summary.json's apo_inert), None when it played or the RM was fixed.
    apo_inert: str | None = None


def evaluated_rounds(rows: list[dict[str, Any]], cfg: Any, online: bool) -> list[dict[str, float]]:
    """The metrics of every evaluated round, as {"round": r, metric key: value}. An online run's evaluation
    after iteration i is reported as round i / iterations_per_round."""
    per_round = iterations_per_round(cfg) if online else 1
    out = []
    for row in rows:
        if row.get(GOLD) is None:
            continue
        step = row.get("round", row["step"])
        record = {"round": step / per_round, "iteration": step}
        for metric in METRICS:
            value = row.get(metric.key)
            record[metric.key] = row.get(metric.old_key) if value is None and metric.old_key and not online else value
        record[f"{GOLD}_se"] = row.get(f"{GOLD}_se")
        record["timing/round"] = row.get("timing/round")
        out.append(record)
    return out


def run_settings(cfg: Any) -> dict[str, Any]:
    """The keys a run reads, run_dir aside: what makes two runs the same run."""
    return {key: value for key, value in cfg.to_dict().items() if key != "run_dir"}


def config_digest(cfg: Any) -> str:
    """A short hash of run_settings: recipes that leave an arm's effective config unchanged (a fixed-RM arm
    under an APO-only --set) share its runs instead of repeating them."""
    return hashlib.sha256(json.dumps(run_settings(cfg), sort_keys=True, default=str).encode()).hexdigest()[:8]


def same_settings(saved: dict[str, Any], cfg: Any) -> bool:
    """A run saved with these settings is a run of cfg. Read back through config_from_dict, so that a key added
    to the config since then counts as its default rather than as a difference."""
    from apo_ray.config import config_from_dict

    if saved == run_settings(cfg):
        return True
    # The config's warnings (keys the run does not read) speak to a run being started, not to a comparison.
    quiet = logging.getLogger("apo_ray.config")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # setLevel, not .level: it clears the loggers' cached isEnabledFor answers
    try:
        return run_settings(config_from_dict({**saved, "run_dir": str(cfg.run_dir)})) == run_settings(cfg)
    finally:
        quiet.setLevel(level)


def _saved_config_matches(run_dir: Path, cfg: Any) -> bool:
    saved = run_dir / "config.yaml"
    return saved.is_file() and same_settings(yaml.safe_load(saved.read_text()), cfg)


def finished_run(arm: Arm, seed: int, scratch: Path, args: argparse.Namespace) -> Path | None:
    """A finished run of this arm and seed whose config equals today's, under any digest: a key added to the
    config since then changes the digest but, at its default, not the run."""
    for candidate in sorted(scratch.glob(f"{arm.key}-*-s{seed}")):
        if (candidate / "summary.json").is_file() and _saved_config_matches(
            candidate, arm_config(arm, seed, candidate, args)
        ):
            return candidate
    return None


def machine_kind() -> str:
    """What a run's numbers depend on besides its config: the same seed gives another SFT policy on another CPU
    (round 0's gold differed by up to 0.08 a seed between an Intel Xeon and an AMD EPYC) or torch build."""
    import torch

    return f"{cpu_model()}, torch {torch.__version__}"


def ledger_record(arm: Arm, seed: int, args: argparse.Namespace, ledger: Path = RUN_LEDGER) -> RunRecord | None:
    """The ledger's record of a run of this arm and seed with today's config on this kind of machine, if one was
    made: a run from another machine would pair with this machine's baseline as if they shared round 0."""
    if args.quick or not ledger.is_file():
        return None
    cfg, machine = arm_config(arm, seed, ledger.parent, args), machine_kind()
    for line in ledger.read_text().splitlines():
        entry = json.loads(line)
        if (
            entry["arm"] == arm.key
            and entry["seed"] == seed
            and entry["machine"] == machine
            and same_settings(entry["settings"], cfg)
        ):
            return RunRecord(arm.name, seed, entry["rounds"], reused=True, apo_inert=entry["apo_inert"])
    return None


def add_to_ledger(arm: Arm, record: RunRecord, args: argparse.Namespace, ledger: Path = RUN_LEDGER) -> None:
    """Appends a finished run (its settings and evaluated rounds, a few KB) to the committed ledger, so that a
    sweep continued on another machine, where the git-ignored scratch runs are gone, still reuses it."""
    if args.quick or record.error or ledger_record(arm, record.seed, args, ledger) is not None:
        return
    entry = {
        "arm": arm.key,
        "seed": record.seed,
        "machine": machine_kind(),
        "wall_s": record.wall_s,
        "apo_inert": record.apo_inert,
        "settings": run_settings(arm_config(arm, record.seed, ledger.parent, args)),
        "rounds": record.rounds,
    }
    ledger.parent.mkdir(parents=True, exist_ok=True)
    with ledger.open("a") as out:
        out.write(json.dumps(entry, sort_keys=True, default=str) + "\n")


def run_arm(arm: Arm, seed: int, scratch: Path, args: argparse.Namespace) -> RunRecord:
    from apo_ray.metrics import read_metrics_jsonl
    from apo_ray.train import prepare, run

    earlier = finished_run(arm, seed, scratch, args)
    if earlier is None and (kept := ledger_record(arm, seed, args)) is not None:
        return kept
    run_dir = earlier or scratch / f"{arm.key}-{config_digest(arm_config(arm, seed, scratch, args))}-s{seed}"
    cfg = arm_config(arm, seed, run_dir, args)
    record = RunRecord(arm.name, seed, reused=earlier is not None)
    if earlier is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        started = time.perf_counter()
        try:
            run(prepare(cfg))
        except Exception:  # one failed arm must not lose the rest of a long sweep; the error is reported
            record.error = traceback.format_exc(limit=8)
            print(f"[quality] {arm.name} seed {seed} failed:\n{record.error}", flush=True)
            return record
        record.wall_s = round(time.perf_counter() - started, 1)
    record.rounds = evaluated_rounds(read_metrics_jsonl(run_dir / "metrics.jsonl"), cfg, arm.online)
    record.apo_inert = json.loads((run_dir / "summary.json").read_text()).get("apo_inert")
    # A scratch run made before the ledger, or in a sweep whose ledger lines were not committed, joins it now.
    add_to_ledger(arm, record, args)
    return record


# ---------------------------------------------------------------------------------------------- statistics


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation and standard error over seeds (NaN spread for one value)."""
    from apo_ray.evaluation import mean_and_stderr

    mean, stderr = mean_and_stderr(values)
    return {"mean": mean, "std": stderr * math.sqrt(len(values)), "stderr": stderr, "n": len(values)}


def aggregate(records: list[RunRecord]) -> dict[float, dict[str, dict[str, float]]]:
    """{round: {metric key: spread over seeds}} over the runs that finished."""
    by_round: dict[float, dict[str, list[float]]] = {}
    for record in records:
        for row in record.rounds:
            cell = by_round.setdefault(row["round"], {})
            for metric in METRICS:
                if row.get(metric.key) is not None:
                    cell.setdefault(metric.key, []).append(row[metric.key])
    return {r: {key: spread(values) for key, values in cells.items()} for r, cells in sorted(by_round.items())}


def _final(record: RunRecord, key: str) -> float | None:
    values = [row[key] for row in record.rounds if row.get(key) is not None]
    return values[-1] if values else None


def _mean_over_game_rounds(record: RunRecord, key: str) -> float | None:
    values = [row[key] for row in record.rounds if row["round"] > 0 and row.get(key) is not None]
    return sum(values) / len(values) if values else None


def t_interval(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean, sample SD and the `level` t-interval of the mean over `values` (seeds); NaN bounds for one value."""
    interval = mean_ci(values, level)
    return {**spread(values), "low": interval["lo"], "high": interval["hi"], "level": level}


def arm_spread(records: list[RunRecord], key: str = GOLD) -> dict[str, Any] | None:
    """An arm's final `key` over the seeds it finished: mean, seed SD, and its worst seed."""
    finals = {r.seed: _final(r, key) for r in records if not r.error}
    finals = {seed: value for seed, value in finals.items() if value is not None}
    if not finals:
        return None
    worst = min(finals, key=finals.__getitem__)
    return {**spread(list(finals.values())), "worst_seed": worst, "worst": finals[worst]}


def paired_difference(arm: list[RunRecord], baseline: list[RunRecord], key: str, reduce) -> dict[str, Any] | None:
    """Arm minus baseline of `reduce(record, key)`, seed by seed over the seeds both finished, with its 95%
    t-interval."""
    base = {r.seed: reduce(r, key) for r in baseline if not r.error}
    diffs = {
        r.seed: reduce(r, key) - base[r.seed]
        for r in arm
        if not r.error and base.get(r.seed) is not None and reduce(r, key) is not None
    }
    if not diffs:
        return None
    return {**t_interval(list(diffs.values())), "per_seed": diffs, "better_seeds": sum(d > 0 for d in diffs.values())}


def verdict(diff: dict[str, Any] | None) -> str:
    """From the 95% t-interval of a paired difference: 'better' / 'worse' when it excludes 0, otherwise 'not
    better' (the interval covers 0: the arm does not beat its baseline on these seeds)."""
    if diff is None:
        return "not measured"
    if diff["n"] < 2 or math.isnan(diff["stderr"]):
        return "one seed only"
    if diff["low"] > 0:
        return "better"
    if diff["high"] < 0:
        return "worse"
    return "not better (interval covers 0)"


# ---------------------------------------------------------------------------------------------- output


def _cell(stats: dict[str, float] | None) -> str:
    if stats is None:
        return "-"
    if stats["n"] < 2:
        return fmt(stats["mean"])
    return f"{fmt(stats['mean'])} ± {fmt(stats['std'])}"


def _round_label(r: float) -> str:
    return str(int(r)) if float(r).is_integer() else f"{r:.2f}"


def _diff_cell(diff: dict[str, Any] | None) -> str:
    if diff is None:
        return "-"
    if diff["n"] < 2:
        return f"{diff['mean']:+.3f} (1 seed)"
    return f"{diff['mean']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}] ({diff['better_seeds']}/{diff['n']})"


def _arm_cell(stats: dict[str, Any] | None) -> str:
    if stats is None:
        return "-"
    return f"{fmt(stats['mean'])} (SD {fmt(stats['std'])}; worst {fmt(stats['worst'])}, seed {stats['worst_seed']})"


def comparisons(arms: Sequence[Arm], records: dict[str, list[RunRecord]]) -> dict[str, dict[str, Any]]:
    """Each arm with a baseline against it, paired by seed: gold score and RM accuracies, final and averaged
    over the game's rounds (>= 1), with verdicts on the gold score; and both arms' final gold over seeds."""
    out = {}
    for arm in arms:
        if arm.baseline is None or arm.baseline not in records or arm.name not in records:
            continue
        ours, theirs = records[arm.name], records[arm.baseline]
        diffs = {
            "final_gold": paired_difference(ours, theirs, GOLD, _final),
            "mean_gold_rounds_1_plus": paired_difference(ours, theirs, GOLD, _mean_over_game_rounds),
            "final_acc_policy": paired_difference(ours, theirs, ACC_POLICY, _final),
            "mean_acc_policy_rounds_1_plus": paired_difference(ours, theirs, ACC_POLICY, _mean_over_game_rounds),
            "final_acc_human": paired_difference(ours, theirs, "rm/acc", _final),
        }
        out[arm.name] = {
            "baseline": arm.baseline,
            **diffs,
            "arm_final_gold": arm_spread(ours),
            "baseline_final_gold": arm_spread(theirs),
            "apo_inert_seeds": sum(r.apo_inert is not None for r in ours if not r.error),
            "verdict_final_gold": verdict(diffs["final_gold"]),
            "verdict_mean_gold": verdict(diffs["mean_gold_rounds_1_plus"]),
        }
    return out


def _plot_grid(
    path: Path, panels: dict[str, list[Arm]], metrics: Sequence[tuple[str, str]], summaries: dict[str, dict], title: str
) -> None:
    """One subplot per (metric, panel), metrics as rows and panels as columns (side by side for a single
    panel): each arm's mean over seeds per round with a ± std band; arms without APO are dashed."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cells = [(metric, panel) for metric in metrics for panel in panels]
    columns = len(panels) if len(panels) > 1 else len(metrics)
    rows = math.ceil(len(cells) / columns)
    figure = Figure(figsize=(4.4 * columns, 3.5 * rows), dpi=110, layout="constrained")
    for axes, ((key, ylabel), panel) in zip(figure.subplots(rows, columns, squeeze=False).flat, cells):
        for index, arm in enumerate(panels[panel]):
            rounds = [r for r, stats in summaries[arm.name].items() if key in stats]
            means = [summaries[arm.name][r][key]["mean"] for r in rounds]
            stds = [summaries[arm.name][r][key]["std"] for r in rounds]
            axes.plot(
                rounds,
                means,
                "-" if arm.name.startswith("APO") else "--",
                marker="o",
                color=f"C{index}",
                label=arm.name,
            )
            if rounds and not any(math.isnan(s) for s in stds):
                axes.fill_between(
                    rounds,
                    [m - s for m, s in zip(means, stds)],
                    [m + s for m, s in zip(means, stds)],
                    color=f"C{index}",
                    alpha=0.12,
                )
        if key == ACC_POLICY:
            axes.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        axes.set_title(panel if len(panels) > 1 else ylabel)
        axes.set_xlabel("round")
        axes.set_ylabel(ylabel)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.suptitle(f"{title} (mean ± std over seeds)")
    figure.savefig(path)


def _plain_statement(compared: dict[str, dict[str, Any]]) -> str:
    """Sentences naming where APO (or an ablation) is better, worse, or does not beat its baseline, by final
    gold score."""
    lines = ["## In plain words", ""]
    for name, c in compared.items():
        diff = c["final_gold"]
        if diff is None:
            lines.append(f"- {name}: not measured.")
            continue
        lines.append(
            f"- {name} vs. {c['baseline']}: final gold score {c['verdict_final_gold']} "
            f"({_diff_cell(diff)}, 95% t-interval; higher in {diff['better_seeds']} of {diff['n']} seeds); "
            f"averaged over rounds ≥ 1: {c['verdict_mean_gold']}."
        )
    return "\n".join(lines)


def task_title(config: Path) -> str:
    return "the builtin task" if Path(config).resolve() == DEFAULT_CONFIG.resolve() else Path(config).name


def _shown(path: str) -> str:
    """A path as the repository names it, where it lies inside the repository."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return path


def task_words(cfg: Any) -> str:
    """What the runs were trained and judged on, read from the config: the builtin task's sizes, or a real-data
    recipe's files, split and judge (its 'gold score' is its evaluation RM's score)."""
    data = cfg.data
    if data.task == "builtin":
        b = data.builtin
        return (
            f"the builtin task (apo_ray.builtin), {b.n_pairs} simulated human pairs, {b.n_gold} gold answers, "
            f"{b.n_prompts} policy prompts, {b.n_eval_pairs} held-out human pairs; the gold score is its oracle's."
        )
    sources = [(name, getattr(data, name)) for name in ("source", "pairs", "gold", "prompts", "eval_pairs")]
    read = "; ".join(
        f"{name} {_shown(source.path)} ({source.format}"
        + (f", skip {source.skip}" if source.skip else "")
        + (f", first {source.limit}" if source.limit else "")
        + ")"
        for name, source in sources
        if source is not None
    )
    split = ", ".join(f"{k} {v:g}" for k, v in data.split_fractions.items()) if data.source is not None else None
    return (
        f"files: {read}" + (f"; the source's prompts split {split}" if split else "") + f". Policy "
        f"{cfg.model.policy_path} (chat template: {data.chat_template}), prompts within {cfg.model.max_prompt_tokens} "
        f"tokens, responses within {cfg.model.max_response_tokens}. The 'gold score' is the score of the "
        f"evaluation RM {_shown(cfg.model.eval_reward)}, which the game never trains."
    )


def write_outputs(
    run: BenchmarkRun,
    args: argparse.Namespace,
    arms: Sequence[Arm],
    records: dict[str, list[RunRecord]],
    configs: dict[str, Any],
) -> dict[str, Any]:
    summaries = {name: aggregate([r for r in recs if not r.error]) for name, recs in records.items()}
    compared = comparisons(arms, records)
    by_name = {arm.name: arm for arm in arms}

    sample = configs[arms[0].name]
    backends = sorted({(c.rollout.backend, c.learner.backend) for c in configs.values()})
    run.add_text(
        f"Task: {task_words(sample)} Evaluation samples: {sample.eval.samples_per_prompt} per prompt on up to "
        f"{sample.eval.prompts} held-out prompts. Offline arms: {args.config} ({sample.rounds} rounds, "
        f"S={sample.samples_per_prompt}, RM lr {sample.reward.lr:g}, {sample.reward.initial_epochs} initial RM "
        f"epochs, {sample.reward.epochs_per_round} RM epoch(s) per round, APO coefficient {sample.apo_coef:g}, "
        f"{sample.reward.apo_normalization} normalization) with each row's overrides. Recipe (--set on every arm): "
        f"{' '.join(args.set) or 'the committed defaults'}. Online arms: configs/ppo.yaml and configs/grpo.yaml "
        "with default.yaml's reward section; PPO iterations (rounds of the online game) = rounds x (policy prompts "
        "/ prompts per iteration), so that they draw as many samples as an offline round, evaluated (and, for "
        "APO, the RM stepped) once per such round. Backends (rollout, learner): "
        + ", ".join(f"{rollout}/{learner}" for rollout, learner in backends)
        + f". Seeds ({args.seed_set} set): {' '.join(map(str, args.seeds))}. Round 0 is the starting policy with "
        "the RM fitted on the human pairs (identical for an arm and its baseline)."
    )
    failed = [
        (name, r.seed, r.error.strip().splitlines()[-1]) for name, recs in records.items() for r in recs if r.error
    ]
    if failed:
        run.add_table("Runs that failed (left out of every table)", ["arm", "seed", "error"], failed)

    for title, group in (
        ("APO vs. the same method with a fixed RM", METHOD_ARMS),
        ("RM ablations (paper Table 4) vs. full APO-RJS", ABLATION_ARMS),
    ):
        rows = []
        for arm in group:
            c = compared.get(arm.name)
            if c is None:
                continue
            rows.append(
                [
                    arm.name,
                    c["baseline"],
                    _arm_cell(c["arm_final_gold"]),
                    _arm_cell(c["baseline_final_gold"]),
                    _diff_cell(c["final_gold"]),
                    c["verdict_final_gold"],
                    _diff_cell(c["mean_gold_rounds_1_plus"]),
                    c["verdict_mean_gold"],
                    _diff_cell(c["final_acc_policy"]),
                    c["apo_inert_seeds"],
                ]
            )
        if rows:
            run.add_table(
                title,
                [
                    "arm",
                    "vs.",
                    "arm final gold",
                    "baseline final gold",
                    "final gold Δ",
                    "verdict",
                    "gold Δ, mean of rounds ≥ 1",
                    "verdict",
                    "final RM acc (policy pairs) Δ",
                    "seeds with the APO term inert",
                ],
                rows,
                note="Final gold: mean over seeds (seed SD; the worst seed's value and number). Δ = arm "
                "minus baseline, paired by seed: mean [95% t-interval] (seeds where the arm is "
                "higher / seeds). Verdict: better / worse when the interval excludes 0; otherwise "
                "the arm does not beat its baseline on these seeds.",
            )

    run.add_text(_plain_statement(compared))

    for title, group in (("Per round, methods", METHOD_ARMS), ("Per round, RM ablations", ABLATION_ARMS)):
        rows = []
        for arm in group:
            if arm.name not in summaries:
                continue
            for r, cells in summaries[arm.name].items():
                rows.append([arm.name, _round_label(r), *(_cell(cells.get(m.key)) for m in METRICS)])
        if rows:
            run.add_table(title, ["arm", "round", *(m.label for m in METRICS)], rows)

    panels: dict[str, list[Arm]] = {}
    for arm in arms:
        if summaries.get(arm.name):
            panels.setdefault(arm.family, []).append(arm)
    ablations = panels.pop("ablations", None)
    figures = []
    if panels:
        _plot_grid(
            run.out_dir / "gold_score.png",
            panels,
            [(GOLD, "gold score")],
            summaries,
            "Gold score of the policy's samples",
        )
        _plot_grid(
            run.out_dir / "rm_acc_policy.png",
            panels,
            [(ACC_POLICY, "RM accuracy")],
            summaries,
            "RM accuracy on pairs from the current policy",
        )
        figures += ["gold_score.png", "rm_acc_policy.png"]
    if ablations:
        references = [by_name[name] for name in ("RJS", "APO-RJS") if summaries.get(name)]
        _plot_grid(
            run.out_dir / "ablations.png",
            {"ablations": references + ablations},
            [(GOLD, "gold score"), (ACC_POLICY, "RM acc, policy pairs")],
            summaries,
            "RM ablations of APO-RJS",
        )
        figures.append("ablations.png")
    for name in figures:
        run.plots.append(name)
        run.sections.append(f"![{name}]({name})")

    return {
        "seeds": args.seeds,
        "arms": {
            arm.name: {
                "overrides": list(arm.overrides),
                "baseline": arm.baseline,
                "online": arm.online,
                "config": configs[arm.name].to_dict(),
            }
            for arm in arms
            if arm.name in configs
        },
        "comparisons": compared,
        "per_round": {name: {_round_label(r): cells for r, cells in s.items()} for name, s in summaries.items()},
        "runs": {name: [record.__dict__ for record in recs] for name, recs in records.items()},
    }


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seed-set",
        choices=tuple(SEED_SETS),
        required=True,
        help="tuning: seeds 0-9, for choosing a recipe; reporting: seeds 100-119, for the results "
        "(never used for tuning)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="a subset of the seed set (default: all of it)")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe: config overrides for every arm (a tuning candidate); its runs and results "
        "are kept apart from other recipes'",
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=[arm.key for arm in ALL_ARMS],
        help="run only these arms (default: all); an arm's baseline is added when missing",
    )
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help=f"rounds per run (default {DEFAULT_ROUNDS})")
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="the offline arms' config (default: the embedded default's builtin task); with a "
        "real-data recipe such as configs/hh_smollm2_apo_rjs_cpu.yaml the 'gold score' is the "
        "score of its evaluation RM (model.eval_reward), which the game never trains",
    )
    parser.add_argument("--rollout-backend", choices=("vllm", "hf"), help="default: the config's")
    parser.add_argument("--learner-backend", choices=("deepspeed", "torch"), help="default: the config's")
    add_niceness_argument(parser)
    args = parser.parse_args(argv)
    allowed = SEED_SETS[args.seed_set]
    if args.seeds is None:
        args.seeds = list(allowed)
    elif not set(args.seeds) <= set(allowed):
        parser.error(
            f"--seeds: {sorted(set(args.seeds) - set(allowed))} are not {args.seed_set} seeds "
            f"({allowed[0]}-{allowed[-1]})"
        )
    if args.quick:
        args.seeds, args.rounds = args.seeds[:2], 1
        args.arms = args.arms or [arm.key for arm in ALL_ARMS if arm.name in QUICK_ARMS]
    return args


def recipe_tag(args: argparse.Namespace) -> str:
    """Where a recipe's results live: "default" without --set, else its overrides, sorted, joined by "+"."""
    if not args.set:
        return "default"
    return "+".join(sorted(args.set)).replace("/", "_")


def selected_arms(keys: Sequence[str] | None) -> list[Arm]:
    if not keys:
        return list(ALL_ARMS)
    by_name = {arm.name: arm for arm in ALL_ARMS}
    chosen = {arm.name for arm in ALL_ARMS if arm.key in keys}
    chosen |= {by_name[name].baseline for name in chosen if by_name[name].baseline}
    return [arm for arm in ALL_ARMS if arm.name in chosen]


def main() -> None:
    args = parse_args()
    configure_logging(False)
    set_ray_worker_niceness(args.ray_worker_niceness)
    tag = recipe_tag(args)
    if args.out is None and not args.quick and (args.seed_set == "tuning" or args.set):
        # Only the reporting seeds with the committed defaults replace results/quality/ itself.
        args.out = RESULTS_ROOT / "quality" / args.seed_set / tag
    run = BenchmarkRun(
        "quality", f"Quality: APO vs. fixed-RM baselines and RM ablations on {task_title(args.config)}", args
    )
    import ray

    from apo_ray.cluster import init_ray, required_resources

    arms = selected_arms(args.arms)
    # Quick and full sweeps keep their runs apart; within one, a run directory is named by its arm, config and
    # seed, so a run is reused by any recipe whose config for that arm is the same.
    scratch = run.scratch / ("quick" if args.quick else "full")
    configs = {arm.name: arm_config(arm, args.seeds[0], scratch / arm.key, args) for arm in arms}
    largest = max(configs.values(), key=lambda cfg: required_resources(cfg)["CPU"])
    start_ray_with_retries(lambda: init_ray(largest))
    records: dict[str, list[RunRecord]] = {arm.name: [] for arm in arms}
    total, made, started = len(args.seeds) * len(arms), [], time.perf_counter()
    try:
        # seed by seed, so that an interrupted sweep still has every arm for the first seeds
        for seed in args.seeds:
            for arm in arms:
                record = run_arm(arm, seed, scratch, args)
                records[arm.name].append(record)
                if record.wall_s is not None:
                    made.append(record.wall_s)
                done = sum(len(recs) for recs in records.values())
                status = "reused" if record.reused else ("FAILED" if record.error else f"{record.wall_s:.0f} s")
                final = record.rounds[-1] if record.rounds else {}
                eta = f", about {sum(made) / len(made) * (total - done) / 60:.0f} min left" if made else ""
                print(
                    f"[quality] {done}/{total} {arm.name} seed {seed}: {status}; final gold "
                    f"{fmt(final.get(GOLD))} +- {fmt(final.get(GOLD + '_se'))}, RM acc policy "
                    f"{fmt(final.get(ACC_POLICY))}; {(time.perf_counter() - started) / 60:.0f} min so far{eta}",
                    flush=True,
                )
    finally:
        ray.shutdown()
    run.finish(write_outputs(run, args, arms, records, configs))


if __name__ == "__main__":
    main()
