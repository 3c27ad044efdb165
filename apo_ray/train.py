"""`apo-ray train` / `python -m apo_ray.train`: validate everything, start the actors, play the game.

Every check that can fail on user input (config, data files, model paths, the run directory) runs before
Ray starts or any model loads, and an existing run directory is never modified unless resuming it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from apo_ray.config import ONLINE_METHODS, Config, ConfigError, config_from_dict, load_config
from apo_ray.data import DataError, GameData, build_game_data, validate_sources

CONFIG_FILE = "config.yaml"
# Tiny runs need little; a real run's checkpoints are checked against the model size instead.
MIN_FREE_BYTES = 200 * 2**20


class RunDirError(RuntimeError):
    pass


class TrainingDiverged(RuntimeError):
    """A learner met a non-finite loss or gradient; the run stopped and its checkpoints are intact."""


def divergence_message(run_dir: Path, last_round: int | None, error: FloatingPointError) -> str:
    # Raised through ray.get, the error is a RayTaskError(FloatingPointError): its text names the actor's method
    # ("ray::PolicyLearner.sft_step()"); `cause` is the learner's own error.
    cause = getattr(error, "cause", None) or error
    task = re.search(r"ray::(\S+?)\(\)", str(error))
    where = f" in {task.group(1)}" if task else ""
    if last_round is None:
        return f"training diverged{where} before the first checkpoint: {cause}"
    return (
        f"training diverged{where} after round {last_round}: {cause}. The checkpoint of round {last_round} is "
        f"intact: fix the config (e.g. a lower learning rate) and continue with `apo-ray train --resume {run_dir} ...`"
    )


@dataclass
class PreparedRun:
    cfg: Config
    run_dir: Path
    data: GameData
    policy_path: str
    reward_path: str
    oracle: object | None
    # The last complete round of the run being resumed; None for a fresh run.
    resume_from: int | None


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
        raise RunDirError(f"run_dir: only {free / 2**20:.0f} MiB free on the disk of {run_dir}; need {min_free_bytes / 2**20:.0f} MiB")


def _model_size(path: str) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.glob("*.safetensors")) if p.is_dir() else 0


def resolve_run_dir(template: str, cfg: Config) -> str:
    """`runs/{method}-{time}` -> `runs/rjs-20261123-154501`, so repeated runs never collide."""
    try:
        return template.format(method=cfg.method, apo="apo" if cfg.apo else "fixed", seed=cfg.seed,
                               time=time.strftime("%Y%m%d-%H%M%S"))
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"run_dir: bad placeholder in {template!r} (use {{method}}, {{apo}}, {{seed}}, {{time}})") from exc


def prepare(cfg: Config, resume: bool = False) -> PreparedRun:
    """All validation and data loading, no Ray and no model loading (except building the builtin task)."""
    if not resume:
        cfg.run_dir = resolve_run_dir(cfg.run_dir, cfg)
    run_dir = Path(cfg.run_dir)
    check_run_dir(run_dir, resume)
    resume_from = None
    if resume:
        from apo_ray.checkpoint import Checkpointer

        resume_from = Checkpointer(run_dir).latest_round()
    if cfg.data.task == "builtin":
        from apo_ray.builtin_task import gold_score, make_task, prepare_builtin_assets

        b = cfg.data.builtin
        task = make_task(cfg.seed, n_pairs=b.n_pairs, n_gold=b.n_gold, n_policy_prompts=b.n_prompts, n_eval_pairs=b.n_eval_pairs)
        data = GameData(list(task.pairs), list(task.gold), list(task.prompts), list(task.eval_pairs))
        print(f"building/loading the builtin task's tiny models in {b.cache_dir} ...", flush=True)
        assets = prepare_builtin_assets(b.cache_dir, seed=cfg.seed, sft_steps=b.sft_steps)
        policy_path, reward_path, oracle = str(assets.policy_dir), str(assets.reward_dir), gold_score
    else:
        validate_sources(cfg.data)
        data = build_game_data(cfg.data, cfg.seed)
        policy_path, reward_path, oracle = cfg.model.policy_path, cfg.model.reward_path, None
    needed = 2 * (cfg.rounds + 2) * (_model_size(policy_path) + _model_size(reward_path))
    check_run_dir(run_dir, resume, max(MIN_FREE_BYTES, needed))
    return PreparedRun(cfg, run_dir, data, policy_path, reward_path, oracle, resume_from)


def write_config(run_dir: Path, cfg: Config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def run(prepared: PreparedRun) -> dict:
    from apo_ray.cluster import start_actors, init_ray, shutdown_actors
    from apo_ray.checkpoint import Checkpointer
    from apo_ray.driver import APOGame
    from apo_ray.metrics import MetricsLogger

    cfg, run_dir = prepared.cfg, prepared.run_dir
    write_config(run_dir, cfg)
    init_ray(cfg)
    started = time.perf_counter()
    actors = start_actors(cfg, prepared.policy_path, prepared.reward_path)
    logger = MetricsLogger(
        run_dir, tensorboard=cfg.logging.tensorboard, wandb_project=cfg.logging.wandb_project,
        wandb_mode=cfg.logging.wandb_mode, ray_metrics=cfg.logging.ray_metrics, config_dict=cfg.to_dict(),
    )
    checkpointer = Checkpointer(run_dir)
    version, first_round = 0, 0
    try:
        if prepared.resume_from is not None:
            version = checkpointer.restore(prepared.resume_from, actors)["policy_version"]
            actors.pool.sync_from(actors.policy, version)
            logger.truncate_after(prepared.resume_from)
            first_round = prepared.resume_from + 1
            print(f"resumed {run_dir} after round {prepared.resume_from} (policy version {version})", flush=True)
        elif logger.jsonl_path.stat().st_size:
            logger.truncate_after(-1)  # resumed before any checkpoint: forget what the killed run logged
        game_class = APOGame
        if cfg.method in ONLINE_METHODS:
            from apo_ray.online import OnlineAPOGame as game_class
        game = game_class(cfg, prepared.data, actors, logger, checkpointer, prepared.oracle)
        game.version = version
        game.run(first_round)
    except FloatingPointError as error:
        raise TrainingDiverged(divergence_message(run_dir, checkpointer.latest_round(), error)) from error
    finally:
        logger.close()
        shutdown_actors(actors)
    summary = write_summary(run_dir, cfg, prepared, time.perf_counter() - started)
    if cfg.logging.report:
        from apo_ray.report import write_report

        print(f"report: {write_report(run_dir)}", flush=True)
    return summary


def write_summary(run_dir: Path, cfg: Config, prepared: PreparedRun, wall_s: float) -> dict:
    from apo_ray.metrics import read_metrics_jsonl

    rows = read_metrics_jsonl(run_dir / "metrics.jsonl")
    online = cfg.method in ONLINE_METHODS
    # Online runs evaluate every ppo.eval_every iterations and log the evaluation's KL as eval/kl.
    evaluated = [row for row in rows if "eval/gold_score" in row]
    first, last = evaluated[0], evaluated[-1]
    keys = ("rm/acc", "rm/ece", "rm/acc_policy", "rm/ece_policy", "eval/gold_score", "eval/rm_score",
            "eval/kl" if online else "policy/kl")
    summary = {
        "method": cfg.method,
        "apo": cfg.apo,
        **({"ppo_iterations": cfg.ppo.iterations, "rm_update_every": cfg.ppo.rm_update_every} if online
           else {"rounds": cfg.rounds}),
        "evaluated_at": [row["round"] for row in evaluated],
        "seed": cfg.seed,
        "wall_s_this_invocation": round(wall_s, 1),
        "data": prepared.data.summary(),
        "start": {k: first.get(k) for k in keys},
        "final": {k: last.get(k) for k in keys},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("summary: " + json.dumps(summary["final"]), flush=True)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apo-ray train", description="Adversarial Preference Optimization on Ray")
    parser.add_argument("--config", help="YAML config (configs/*.yaml); omitted: the embedded CPU default")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run directory from its last complete round")
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
    args = build_parser().parse_args(argv)
    try:
        if args.resume:
            cfg = load_for_resume(args.resume, args.overrides)
        else:
            cfg = load_config(args.config, args.overrides)
        prepared = prepare(cfg, resume=bool(args.resume))
    except (ConfigError, DataError, RunDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from apo_ray.actor_group import ActorStartupTimeout

    try:
        run(prepared)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except ActorStartupTimeout as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
