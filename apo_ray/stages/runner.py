"""The driver of a stage: check everything, load the data, run the Ray Train job, export the model.

Everything that can fail on user input (config, data files, the base model's path, the run directory) is
checked before Ray starts. The run directory then holds:

    config.yaml       the stage config (what --resume reads)
    checkpoints/      Ray Train's storage: step_NNNNNNN/{model (HF), engine (DeepSpeed), rng, cursor.json}
    model/            the final model in HF format, with its tokenizer: model.policy_path (sft) or
                      model.reward_path (rm) of `apo-ray train`
    metrics.jsonl, tensorboard/, attempts.jsonl (one line per start of the worker group), summary.json
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from apo_ray.config import ConfigError, StageConfig, read_config_tree, validate_section
from apo_ray.data import DataError, _check_source
from apo_ray.deadlines import probe_cluster
from apo_ray.metrics import METRICS_FILE, read_metrics_jsonl
from apo_ray.model_sources import stage_with_local_model
from apo_ray.named_tensors import checkpoint_bytes
from apo_ray.ray_env import driver_source_env
from apo_ray.stages.cursor import steps_per_epoch
from apo_ray.stages.task import StageData, load_stage_data, task_class
from apo_ray.stages.worker import ATTEMPTS_FILE, EVAL_EPOCH, MODEL_DIR, WorkerSpec, train_worker
from apo_ray.train import CONFIG_FILE, MIN_FREE_BYTES, RunDirError, check_run_dir

CHECKPOINTS = "checkpoints"
SUMMARY_FILE = "summary.json"


class StageFailed(RuntimeError):
    """The Ray Train job failed after its retries; `diverged` when a worker met a non-finite loss or gradient."""

    def __init__(self, message: str, diverged: bool):
        super().__init__(message)
        self.diverged = diverged


@dataclass
class PreparedStage:
    # What the workers read: base_model names what they load (a GGUF file's converted directory).
    cfg: StageConfig
    run_dir: Path
    data: StageData
    resume: bool
    # The config as the user wrote it, which config.yaml keeps (apo_ray.model_sources says why).
    written_cfg: StageConfig


def resolve_run_dir(cfg: StageConfig) -> str:
    """`runs/{stage}-{time}` -> `runs/rm-20261201-154501`."""
    try:
        return cfg.run_dir.format(stage=cfg.STAGE, seed=cfg.seed, time=time.strftime("%Y%m%d-%H%M%S"))
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"run_dir: bad placeholder in {cfg.run_dir!r} (use {{stage}}, {{seed}}, {{time}})") from exc


def load_for_resume(cls: type[StageConfig], run_dir: str, overrides: list[str]) -> StageConfig:
    """The saved config of `run_dir` with `overrides` (e.g. more epochs); the worker count must stay, since
    every rank's optimizer state is its own shard."""
    saved_file = Path(run_dir) / CONFIG_FILE
    if not saved_file.is_file():
        raise RunDirError(f"--resume {run_dir}: not a run directory (no {CONFIG_FILE})")
    saved = yaml.safe_load(saved_file.read_text())
    if saved.get("stage") != cls.STAGE:
        raise RunDirError(f"--resume {run_dir}: a {saved.get('stage')!r} run, not {cls.STAGE!r}")
    tree = read_config_tree(saved_file, overrides)
    del tree["stage"]
    tree["run_dir"] = run_dir
    cfg = validate_section(cls, tree)
    before = saved["workers"]["num_workers"]
    if cfg.workers.num_workers != before:
        raise ConfigError(
            f"workers.num_workers: {run_dir} was trained by {before} workers, whose optimizer shards "
            f"its checkpoints hold; resume it with {before}"
        )
    return cfg


def prepare_stage(cfg: StageConfig, resume: bool = False) -> PreparedStage:
    """All checks and data loading; no Ray. Raises ConfigError, DataError or RunDirError."""
    if not resume:
        cfg.run_dir = resolve_run_dir(cfg)
    run_dir = Path(cfg.run_dir).resolve()
    check_run_dir(run_dir, resume)
    _check_source(cfg.train, "train")
    if cfg.eval is not None:
        _check_source(cfg.eval, "eval")
    # GGUF files are converted here, once, so that no worker does.
    written_cfg, cfg = cfg, stage_with_local_model(cfg)
    print(f"[{cfg.STAGE}] loading data from {cfg.train.path} ...", flush=True)
    try:
        data = load_stage_data(cfg)
    except OSError as exc:  # transformers' way of saying the model (or the hub) cannot be reached
        raise ConfigError(f"base_model: cannot load the tokenizer of {cfg.base_model} ({exc})") from None
    if steps_per_epoch(len(data.train), cfg.batch_size) == 0:
        raise DataError(
            f"train.path: {cfg.train.path} has {len(data.train)} items, fewer than one batch "
            f"(batch_size={cfg.batch_size})"
        )
    if cfg.eval is not None and not data.eval:
        raise DataError(f"eval.path: {cfg.eval.path} has no items")
    # Every checkpoint kept holds the HF weights and DeepSpeed's weights plus two Adam moments.
    check_run_dir(
        run_dir, resume, max(MIN_FREE_BYTES, 4 * (cfg.keep_checkpoints + 1) * checkpoint_bytes(cfg.base_model))
    )
    return PreparedStage(cfg, run_dir, data, resume, written_cfg)


def init_ray_for(cfg: StageConfig) -> None:
    """Join the cluster this driver was submitted to (RAY_ADDRESS, or ray.address), else start one that holds
    the workers."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    workers = cfg.workers
    if address:
        probe_cluster(address, cfg.ray.connect_timeout_s, "ray.connect_timeout_s")
        ray.init(address=address)
    else:
        need = workers.num_workers * workers.num_cpus_per_worker
        ray.init(
            num_cpus=cfg.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(need)),
            include_dashboard=False,
            runtime_env={"env_vars": driver_source_env()},
        )
    have = ray.cluster_resources()
    need = {
        "CPU": workers.num_workers * workers.num_cpus_per_worker,
        "GPU": workers.num_workers * workers.num_gpus_per_worker,
    }
    if any(amount > have.get(kind, 0.0) for kind, amount in need.items()):
        # Ray Train would otherwise wait for them without end.
        raise ConfigError(
            f"workers: {workers.num_workers} workers need {need['CPU']:g} CPUs and {need['GPU']:g} GPUs; "
            f"the cluster has {have.get('CPU', 0.0):g} and {have.get('GPU', 0.0):g}"
        )


def run_stage(prepared: PreparedStage, *, fail_at_step: int | None = None, stop_after_epoch: int | None = None) -> dict:
    """Run the stage's Ray Train job to the end (or to the end of epoch `stop_after_epoch`, for a --resume to go
    on from) and export its model; returns the summary."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg, run_dir = prepared.cfg, prepared.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(
        yaml.safe_dump({"stage": cfg.STAGE, **prepared.written_cfg.model_dump()}, sort_keys=False)
    )
    started = time.perf_counter()
    init_ray_for(cfg)
    workers = cfg.workers
    resources = {"CPU": workers.num_cpus_per_worker}
    if workers.num_gpus_per_worker:
        resources["GPU"] = workers.num_gpus_per_worker
    spec = WorkerSpec(
        cfg=cfg,
        run_dir=str(run_dir),
        train=ray.put(prepared.data.train),
        eval=ray.put(prepared.data.eval),
        fail_at_step=fail_at_step,
        stop_after_epoch=stop_after_epoch,
    )
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(
            num_workers=workers.num_workers, use_gpu=workers.num_gpus_per_worker > 0, resources_per_worker=resources
        ),
        # The same storage and name on --resume: Ray Train then starts from the run's latest checkpoint.
        run_config=RunConfig(
            name=CHECKPOINTS,
            storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    print(
        f"[{cfg.STAGE}] Ray Train: {workers.num_workers} worker(s), DeepSpeed ZeRO-{cfg.zero_stage}, "
        f"{len(prepared.data.train)} training {task_class(cfg).unit}; run directory {run_dir}",
        flush=True,
    )
    try:
        result = trainer.fit()
    except Exception as error:
        raise _stage_failure(cfg, error) from error
    model_dir = _export_model(Path(result.checkpoint.path) / MODEL_DIR, run_dir / MODEL_DIR)
    summary = _summary(prepared, result.metrics, model_dir, time.perf_counter() - started)
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    print(f"[{cfg.STAGE}] done: {json.dumps(summary['eval'])}; model in {model_dir}", flush=True)
    return summary


def _stage_failure(cfg: StageConfig, error: Exception) -> StageFailed:
    causes = list(getattr(error, "worker_failures", {}).values()) or [error]
    diverged = any("FloatingPointError" in f"{type(c).__name__}: {c}" for c in causes)
    first = str(causes[0]).strip().splitlines()
    reason = first[-1] if first else type(causes[0]).__name__
    if diverged:
        return StageFailed(
            f"{cfg.STAGE}: training diverged ({reason}); lower lr and resume with "
            f"`apo-ray {cfg.STAGE} --resume {cfg.run_dir} lr=...`",
            diverged=True,
        )
    return StageFailed(
        f"{cfg.STAGE}: the Ray Train job failed after {cfg.max_failures} restart(s): {reason}. "
        f"Continue from its last checkpoint with `apo-ray {cfg.STAGE} --resume {cfg.run_dir}`",
        diverged=False,
    )


def _export_model(checkpoint_model: Path, final: Path) -> Path:
    """Copy the last checkpoint's HF model to <run_dir>/model, replacing an earlier export whole."""
    partial = final.with_name(final.name + ".tmp")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(checkpoint_model, partial)
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final


def eval_by_epoch(run_dir: Path) -> list[dict]:
    """Every evaluation the run logged (after each epoch with eval_every_epoch, else after each invocation's
    last), as {"epoch": epochs done, metric: value}, in order."""
    rows = read_metrics_jsonl(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).exists() else []
    return [
        {"epoch": row[EVAL_EPOCH], **{k: v for k, v in row.items() if k not in ("step", EVAL_EPOCH)}}
        for row in rows
        if EVAL_EPOCH in row
    ]


def _summary(prepared: PreparedStage, metrics: dict, model_dir: Path, wall_s: float) -> dict:
    cfg = prepared.cfg
    attempts_file = prepared.run_dir / ATTEMPTS_FILE
    attempts = [json.loads(line) for line in attempts_file.read_text().splitlines()] if attempts_file.exists() else []
    return {
        "stage": cfg.STAGE,
        "base_model": prepared.written_cfg.base_model,
        "model": str(model_dir),
        "workers": cfg.workers.model_dump(),
        "zero_stage": cfg.zero_stage,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "warmup_ratio": cfg.warmup_ratio,
        "seed": cfg.seed,
        "data": prepared.data.summary,
        "global_step": metrics["global_step"],
        "epochs_done": metrics["global_step"] / steps_per_epoch(len(prepared.data.train), cfg.batch_size),
        "eval": {k: v for k, v in metrics.items() if k.startswith(("rm/", "sft/"))},
        "eval_by_epoch": eval_by_epoch(prepared.run_dir),
        # Of the invocation that took the last step: items trained and seconds spent in training steps
        # (forward, backward, optimizer; not start-up, checkpoints or evaluation).
        "train": {k: v for k, v in metrics.items() if k.startswith("train/")},
        "torch_threads_per_worker": metrics["torch_threads"],
        "attempts": attempts,
        "wall_s_this_invocation": round(wall_s, 1),
    }
