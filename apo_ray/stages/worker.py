"""The loop every Ray Train worker of a stage runs: one DeepSpeed rank training on its share of each batch.

Ray Train has already set up the process group (gloo on CPU, NCCL on GPU) and MASTER_ADDR/MASTER_PORT when
this runs; DeepSpeed joins that group instead of starting its own, and keeps Ray Train's MASTER_PORT (its
CPU shared-memory collectives name their segment after it, so every rank must see the same one).

A checkpoint holds the model in HF format (`model/`, loadable by `from_pretrained` and by `apo-ray train`),
the DeepSpeed state of every rank (`engine/`), every rank's RNG and the data cursor. A worker group that
Ray Train restarts after a failure resumes from the latest one and replays the same batches in the same order.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from apo_ray.config import StageConfig
from apo_ray.stages.cursor import DataCursor, epoch_order, padded_shard, rank_batch, steps_per_epoch
from apo_ray.stages.lr_schedule import learning_rate, warmup_steps

MODEL_DIR = "model"
ENGINE_DIR = "engine"
RNG_DIR = "rng"
CURSOR_FILE = "cursor.json"
ATTEMPTS_FILE = "attempts.jsonl"
# The key that marks an evaluation's row in metrics.jsonl, with the number of epochs done before it.
EVAL_EPOCH = "eval_epoch"
FAILURE_MARKER = "injected_failure"


@dataclass
class WorkerSpec:
    """What the driver hands every worker (through train_loop_config)."""

    cfg: StageConfig
    run_dir: str
    # ObjectRefs of the training and held-out items, loaded and checked by the driver.
    train: Any
    eval: Any
    # Fault injection for the recovery test: the worker of rank 1 (rank 0 alone) exits abruptly after this
    # optimizer step, once per run directory.
    fail_at_step: int | None = None
    # Stop (evaluate, checkpoint, export) at the end of this epoch, a --resume going on from there on the same
    # lr schedule: how a benchmark interleaves runs epoch by epoch. None: at the end of the run.
    stop_after_epoch: int | None = None


def train_worker(config: dict) -> None:
    import ray
    import ray.train

    from apo_ray.actors.engine import TrainEngine
    from apo_ray.metrics import MetricsLogger
    from apo_ray.progress import Progress
    from apo_ray.stages.task import make_task

    spec: WorkerSpec = config["spec"]
    cfg, run_dir = spec.cfg, Path(spec.run_dir)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    task = make_task(cfg)
    train_items, eval_items = ray.get(spec.train), ray.get(spec.eval)
    # Same seed on every rank before the model is built: a freshly initialised head is identical everywhere.
    torch.manual_seed(cfg.seed)
    engine = TrainEngine(
        task.load_model(),
        backend="deepspeed",
        lr=cfg.lr,
        zero_stage=cfg.zero_stage,
        grad_clip=cfg.grad_clip,
        weight_decay=cfg.weight_decay,
        micro_batch_size=cfg.batch_size // world,
        rank=rank,
        world_size=world,
        master_port=int(os.environ["MASTER_PORT"]),
    )
    # Dropout draws from this stream; a restored checkpoint replaces it with the rank's saved state.
    torch.manual_seed(cfg.seed + 1 + rank)
    cursor = _restore(engine, rank)
    logger = MetricsLogger(run_dir, tensorboard=True, ray_metrics=False) if rank == 0 else None
    if logger is not None:
        # Forget what a failed attempt logged after the checkpoint this one resumes from.
        logger.truncate_after(cursor.global_step)
        _record_attempt(run_dir, cursor, world)

    end_epoch = cfg.epochs if spec.stop_after_epoch is None else min(cfg.epochs, spec.stop_after_epoch)
    if cursor.finished(end_epoch):
        # Resumed after its last step: the run's final checkpoint already holds the final metrics.
        if logger is not None:
            logger.close()
        return
    per_epoch = steps_per_epoch(len(train_items), cfg.batch_size)
    total_steps = per_epoch * cfg.epochs
    warmup = warmup_steps(cfg.warmup_ratio, total_steps)
    progress = (
        Progress(f"{cfg.STAGE} train", total=per_epoch * end_epoch - cursor.global_step, unit="steps")
        if rank == 0
        else contextlib.nullcontext()
    )
    step_seconds, items_trained, order_epoch, order = 0.0, 0, None, []
    with progress:
        while not cursor.finished(end_epoch):
            if order_epoch != cursor.epoch:
                order, order_epoch = epoch_order(len(train_items), cfg.seed, cursor.epoch), cursor.epoch
            batch = [train_items[i] for i in rank_batch(order, cursor.step, cfg.batch_size, rank, world)]
            lr = learning_rate(cfg.lr, cfg.lr_scheduler_type, cursor.global_step, total_steps, warmup)
            engine.set_lr(lr)
            started = time.perf_counter()
            engine.module.train()
            loss, stats = task.loss(engine.module, batch)
            engine.step(loss)
            step_seconds += time.perf_counter() - started
            items_trained += cfg.batch_size
            cursor = cursor.advance(per_epoch)
            _maybe_fail(spec, rank, world, cursor.global_step)
            stats = _mean_over_ranks(stats, world)
            if logger is not None:
                logger.log(
                    {**stats, "learning_rate": lr, "epoch": cursor.epoch + cursor.step / per_epoch}, cursor.global_step
                )
                progress.update()
            # Before the epoch's checkpoint, so that a run resumed from it has this evaluation logged already.
            if cfg.eval_every_epoch and eval_items and cursor.step == 0 and not cursor.finished(end_epoch):
                _evaluate_and_log(task, engine, eval_items, rank, world, logger, cursor)
            # The last step's checkpoint is the final one, written after the evaluation with its metrics.
            if cursor.global_step % cfg.checkpoint_every == 0 and not cursor.finished(end_epoch):
                _save_and_report(task, engine, cursor, cfg, rank, {**stats, "global_step": cursor.global_step})
    final = {
        "global_step": cursor.global_step,
        "world_size": world,
        "torch_threads": torch.get_num_threads(),
        f"train/{task.unit}": items_trained,
        "train/step_seconds": step_seconds,
        f"train/{task.unit}_per_s": items_trained / step_seconds,
    }
    if eval_items:
        final.update(_evaluate_and_log(task, engine, eval_items, rank, world, logger, cursor))
    if logger is not None:
        logger.close()
    # Ray Train's result carries the metrics of the latest checkpoint: the final ones go with the final weights.
    _save_and_report(task, engine, cursor, cfg, rank, final)


def _restore(engine, rank: int) -> DataCursor:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return DataCursor()
    with checkpoint.as_directory() as directory:
        directory = Path(directory)
        engine.load_state(directory / ENGINE_DIR)
        torch.set_rng_state(torch.load(directory / RNG_DIR / f"rank_{rank}.pt"))
        return DataCursor.from_dict(json.loads((directory / CURSOR_FILE).read_text()))


def _save_and_report(task, engine, cursor: DataCursor, cfg: StageConfig, rank: int, metrics: dict) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix=f"apo-ray-{cfg.STAGE}-checkpoint-") as tmp:
        tmp = Path(tmp)
        # Collective: every rank writes its own share of the optimizer state.
        engine.save_state(tmp / ENGINE_DIR)
        # ZeRO-3 gathers the partitioned weights, which every rank must join; below it rank 0 has them all.
        state = engine.rank0_state_dict()
        if rank == 0:
            engine.model.save_pretrained(tmp / MODEL_DIR, state_dict=state)
            task.tokenizer.save_pretrained(tmp / MODEL_DIR)
            (tmp / CURSOR_FILE).write_text(json.dumps(cursor.to_dict()))
        (tmp / RNG_DIR).mkdir()
        torch.save(torch.get_rng_state(), tmp / RNG_DIR / f"rank_{rank}.pt")
        # Ray Train merges what the ranks report into one checkpoint directory under the run directory.
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
            checkpoint_dir_name=f"step_{cursor.global_step:07d}",
        )


def _evaluate(task, engine, items: list, rank: int, world: int) -> dict[str, float]:
    indices, n_real = padded_shard(len(items), rank, world)
    engine.module.eval()
    records = task.eval_records(engine.module, [items[i] for i in indices])[:n_real]
    mine = list(zip(indices[:n_real], records))
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, mine)
        mine = [entry for shard in gathered for entry in shard]
    return task.eval_metrics([record for _, record in sorted(mine)])


def _evaluate_and_log(task, engine, items: list, rank: int, world: int, logger, cursor: DataCursor) -> dict[str, float]:
    """Evaluate after the epochs done so far; rank 0 logs it with `eval_epoch` (runner.eval_by_epoch reads it)."""
    evaluation = _evaluate(task, engine, items, rank, world)
    if logger is not None:
        logger.log({**evaluation, EVAL_EPOCH: cursor.epoch}, cursor.global_step)
    return evaluation


def _mean_over_ranks(stats: dict[str, float], world: int) -> dict[str, float]:
    if world == 1:
        return stats
    keys = sorted(stats)
    values = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(values)
    return {k: v / world for k, v in zip(keys, values.tolist())}


def _record_attempt(run_dir: Path, cursor: DataCursor, world: int) -> None:
    record = {
        "started_at": time.time(),
        "resumed_from_step": cursor.global_step,
        "world_size": world,
        "torch_threads": torch.get_num_threads(),
    }
    with (run_dir / ATTEMPTS_FILE).open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _maybe_fail(spec: WorkerSpec, rank: int, world: int, global_step: int) -> None:
    if spec.fail_at_step != global_step or rank != min(1, world - 1):
        return
    marker = Path(spec.run_dir) / FAILURE_MARKER
    if marker.exists():
        return
    marker.write_text(f"worker of rank {rank} exited after step {global_step}\n")
    print(f"[fault injection] rank {rank} exits after step {global_step}", flush=True)
    os._exit(1)
