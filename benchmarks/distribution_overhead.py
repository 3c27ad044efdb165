"""Overhead of the distribution: one APO round through the Ray actors vs the same computations in one
process without Ray.

Both arms run the same driver code, `apo_ray.driver.APOGame` (the embedded default: APO-RJS on the builtin
task, DeepSpeed ZeRO-2 learners, HF rollouts): the Ray arm on the actors `apo_ray.cluster.start_actors`
starts; the local arm on the same classes instantiated as plain objects in this process, reached through
`LocalHandle` (calls run at once) with the game loop's `gather` swapped for the identity while it plays.
So the arms differ only in transport and placement, and equal seeds give equal round metrics (checked).
Checkpoints and metric sinks are left out of both: they are file I/O, the same with or without Ray.

Both arms use one torch thread per model (a Ray actor with num_cpus=1 gets OMP_NUM_THREADS=1) and, by
default, the same CPU priority: Ray starts actors at niceness 15, which on a machine shared with other
work starves them against any nice-0 process; `--ray-worker-niceness 15` measures Ray's default instead.
The HF backend serves both arms: vLLM's CPU worker pins the threads of the process it lives in, which
would change the local arm's learners too. Rounds are interleaved (A B, B A, ...).

    .venv/bin/python -m benchmarks.distribution_overhead [--quick] [--rounds 3] [--ray-worker-niceness 0]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BenchmarkRun,
    Trial,
    actor_process_info,
    add_niceness_argument,
    base_parser,
    interleave,
    median,
    ratio_summary,
    set_ray_worker_niceness,
    start_ray_with_retries,
    timed,
)

PHASES = ("timing/generate", "timing/rm_step", "timing/score", "timing/policy_step", "timing/sync", "timing/round")
COMPARED_METRICS = ("rm/acc", "rm/ece", "eval/gold_score", "eval/rm_score", "eval/kl")


def parse_args() -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="APO rounds per arm after round 0")
    add_niceness_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.rounds = 1
    return args


# ---------------------------------------------------------------------------------------------- local transport


class LocalHandle:
    """Stands in for an actor handle: `handle.method.remote(*args)` calls `obj.method(*args)` at once."""

    def __init__(self, obj: Any):
        self._obj = obj

    def __getattr__(self, name: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(remote=getattr(self._obj, name))


class LocalCall:
    """A GenerateCall over one in-process RolloutWorker: it samples when collected."""

    def __init__(self, worker: Any, prompts: list[str], n: int, seed: int | None):
        self.worker, self.prompts, self.n, self.seed = worker, list(prompts), n, seed
        self.stats: dict[str, float] = {}

    def result(self) -> list[Any]:
        started = time.perf_counter()
        rollouts = self.worker.generate(self.prompts, list(range(len(self.prompts))), self.n, self.seed)
        elapsed = time.perf_counter() - started
        tokens = sum(len(r.response_token_ids) for r in rollouts)
        self.stats = {
            "rollout/tokens_per_s": tokens / elapsed,
            "rollout/tokens": float(tokens),
            "rollout/samples": float(len(rollouts)),
            "rollout/num_workers": 1.0,
        }
        return rollouts


class LocalPool:
    """The part of RolloutPool the driver uses, over one RolloutWorker object."""

    num_workers = 1

    def __init__(self, worker: Any):
        self.worker = worker

    def submit(self, prompts: list[str], n: int, seed: int | None = None) -> LocalCall:
        return LocalCall(self.worker, prompts, n, seed)

    def generate(self, prompts: list[str], n: int, seed: int | None = None) -> list[Any]:
        return self.submit(prompts, n, seed).result()

    def matmul_ceiling(self) -> float:
        return self.worker.matmul_ceiling()

    def sync_from(self, learner: LocalHandle, version: int) -> dict[str, float]:
        from apo_ray.sync_backends import DEFAULT_BUCKET_BYTES

        started = time.perf_counter()
        buckets = learner.stream_weights.remote("object_store", False, DEFAULT_BUCKET_BYTES)
        loaded = self.worker.receive_weights("object_store", version, *buckets)
        return {"timing/sync": time.perf_counter() - started, "sync/bytes": float(loaded), "sync/workers": 1.0}


@contextlib.contextmanager
def local_transport() -> Iterator[None]:
    """While active, the game loop's `gather` (its ray.get) returns what LocalHandle calls already computed."""
    import apo_ray.driver
    import apo_ray.held_out_evaluation
    import apo_ray.offline
    import apo_ray.online
    import apo_ray.round_flops

    modules = (apo_ray.driver, apo_ray.held_out_evaluation, apo_ray.offline, apo_ray.online, apo_ray.round_flops)
    real = [module.gather for module in modules]
    for module in modules:
        module.gather = lambda value: value
    try:
        yield
    finally:
        for module, gather in zip(modules, real):
            module.gather = gather


class NoCheckpoints:
    """The Checkpointer calls the driver makes, writing nothing (excluded from both arms)."""

    base_reward_dir = Path("/nonexistent")

    def save_base_reward(self, reward: Any) -> None:
        pass

    def save_round(self, r: int, actors: Any, version: int, extra: dict | None = None) -> None:
        pass


class NoMetrics:
    def set_phase(self, name: str) -> None:
        pass

    def log(self, stats: dict[str, float], step: int) -> None:
        pass


# ---------------------------------------------------------------------------------------------- arms


def ray_game(prepared: Any) -> tuple[Any, Any]:
    from apo_ray.cluster import init_ray, start_actors
    from apo_ray.driver import APOGame
    from apo_ray.game import TokenSample
    from apo_ray.learner_group import gather

    start_ray_with_retries(lambda: init_ray(prepared.cfg))
    actors = start_actors(prepared.cfg, prepared.policy_path, prepared.reward_path)
    gather(actors.policy.sequence_logprobs.remote([TokenSample((1,), (1,))]))  # wait until the learners are built
    game = APOGame(
        prepared.cfg, prepared.data, actors, NoMetrics(), NoCheckpoints(), prepared.oracle, log=lambda line: None
    )
    return game, actors


def worker_spec(cfg: Any, policy_path: str) -> Any:
    """The spec RolloutPool.from_config gives its workers, so the local worker is the Ray arm's worker 0."""
    from apo_ray.rollout_pool import RolloutWorkerSpec

    rollout = cfg.rollout
    return RolloutWorkerSpec(
        model_path=policy_path,
        backend=rollout.backend,
        max_new_tokens=cfg.model.max_response_tokens,
        max_prompt_tokens=cfg.model.max_prompt_tokens,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        seed=cfg.seed,
        max_model_len=rollout.max_model_len,
        dtype=cfg.model.dtype,
        engine_kwargs=dict(rollout.engine_kwargs),
    )


def local_game(prepared: Any) -> Any:
    from apo_ray.actors.policy import PolicyLearner
    from apo_ray.actors.reference import ReferenceModel
    from apo_ray.actors.reward import RewardLearner
    from apo_ray.actors.rollout import RolloutWorker
    from apo_ray.driver import Actors, APOGame

    cfg = prepared.cfg
    policy = PolicyLearner(prepared.policy_path, model=cfg.model, policy=cfg.policy, learner=cfg.learner, seed=cfg.seed)
    reward = RewardLearner(
        prepared.reward_path,
        reward=cfg.reward,
        learner=cfg.learner,
        dtype=cfg.model.dtype,
        seed=cfg.seed,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    reference = ReferenceModel(prepared.policy_path, model=cfg.model)
    worker = RolloutWorker(**worker_spec(cfg, prepared.policy_path).worker_kwargs(0))
    actors = Actors(
        pool=LocalPool(worker),
        reward=LocalHandle(reward),
        policy=LocalHandle(policy),
        reference=LocalHandle(reference),
        eval_reward=None,
    )
    # The game asks its actors for their matmul ceilings as it starts.
    with local_transport():
        return APOGame(cfg, prepared.data, actors, NoMetrics(), NoCheckpoints(), prepared.oracle, log=lambda line: None)


def actor_processes(actors: Any) -> dict[str, dict[str, int]]:
    # Rank 0 of each learner group.
    return actor_process_info(
        {
            "policy": actors.policy.ranks[0],
            "reward": actors.reward.ranks[0],
            "reference": actors.reference.ranks[0],
            "rollout worker": actors.pool.workers[0],
        }
    )


# ---------------------------------------------------------------------------------------------- run


def prepare_run(scratch: Path) -> Any:
    from apo_ray.config import load_config
    from apo_ray.train import prepare

    overrides = ["rollout.backend=hf", f"run_dir={scratch / ('run-' + uuid.uuid4().hex[:6])}"]
    return prepare(load_config(Path(__file__).resolve().parent.parent / "configs" / "default.yaml", overrides))


def main() -> None:
    args = parse_args()
    set_ray_worker_niceness(args.ray_worker_niceness)
    run = BenchmarkRun(
        "distribution_overhead", "Overhead of the distribution: an APO round on Ray vs in one process", args
    )
    import ray
    import torch

    from apo_ray.cluster import shutdown_actors

    prepared = prepare_run(run.scratch)
    # The local arm's models share this process: one thread each, as the actors get.
    torch.set_num_threads(1)
    with timed() as ray_start:
        ray_arm, actors = ray_game(prepared)
    with timed() as local_start:
        local_arm = local_game(prepared)
    processes = {
        **actor_processes(actors),
        "local process": {"torch_threads": torch.get_num_threads(), "niceness": os.getpriority(os.PRIO_PROCESS, 0)},
    }

    def play(game: Any, local: bool):
        def call(r: int) -> dict[str, float]:
            with local_transport() if local else contextlib.nullcontext():
                return game.initial_round() if r == 0 else game.play_round(r)

        return call

    try:
        trials = interleave(
            {"ray": play(ray_arm, local=False), "local": play(local_arm, local=True)}, repeats=args.rounds + 1
        )
    finally:
        shutdown_actors(actors)
        ray.shutdown()
    run.finish(summarize(args, run, trials, processes, ray_start.timing, local_start.timing, prepared))


def summarize(
    args: argparse.Namespace,
    run: BenchmarkRun,
    trials: list[Trial],
    processes: dict,
    ray_start: Any,
    local_start: Any,
    prepared: Any,
) -> dict[str, Any]:
    by_arm = {arm: sorted((t for t in trials if t.arm == arm), key=lambda t: t.repeat) for arm in ("ray", "local")}
    game_rounds = range(1, args.rounds + 1)
    wall = {arm: [by_arm[arm][r].timing.seconds for r in game_rounds] for arm in by_arm}
    overall = ratio_summary(wall["ray"], wall["local"])
    phase_rows, phases = [], {}
    for phase in PHASES:
        values = {arm: [by_arm[arm][r].result.get(phase, 0.0) for r in game_rounds] for arm in by_arm}
        ratio = ratio_summary(values["ray"], values["local"]) if all(values["local"]) else None
        phases[phase] = {"ray": values["ray"], "local": values["local"], "ray_over_local": ratio}
        phase_rows.append(
            [
                phase,
                median(values["ray"]),
                median(values["local"]),
                median(values["ray"]) - median(values["local"]),
                ratio["median"] if ratio else None,
            ]
        )
    phase_rows.append(
        [
            "round wall (driver)",
            median(wall["ray"]),
            median(wall["local"]),
            median(wall["ray"]) - median(wall["local"]),
            overall["median"],
        ]
    )
    agreement = []
    for r in range(args.rounds + 1):
        ray_stats, local_stats = by_arm["ray"][r].result, by_arm["local"][r].result
        agreement.append(
            [r]
            + [
                f"{ray_stats.get(k, float('nan')):.4f} / {local_stats.get(k, float('nan')):.4f}"
                for k in COMPARED_METRICS
            ]
        )
    round_rows = [[t.repeat, t.arm, t.timing.seconds, t.timing.load_start, t.timing.load_end] for t in trials]

    cfg = prepared.cfg
    run.add_text(
        f"Config: configs/default.yaml with rollout.backend=hf: method {cfg.method}, apo {cfg.apo}, "
        f"{cfg.samples_per_prompt} samples per prompt, learner backend {cfg.learner.backend} "
        f"(ZeRO-{cfg.learner.zero_stage}), "
        f"{len(prepared.data.gold)} gold prompts, {len(prepared.data.prompts)} policy prompts, "
        f"{len(prepared.data.pairs)} human pairs. Round 0 (RM fit on human pairs + evaluation) then {args.rounds} "
        f"APO round(s) per arm, interleaved. Processes (torch threads, niceness): {processes}. One-time start: "
        f"Ray cluster + actors "
        f"{ray_start.seconds:.1f} s, local objects {local_start.seconds:.1f} s."
    )
    run.add_table(
        "One APO round, Ray actors vs one process (median over rounds 1..N)",
        ["phase", "Ray s", "local s", "Ray - local s", "Ray / local"],
        phase_rows,
        note=f"Round wall ratio Ray / local per round: median {overall['median']:.3f} "
        f"(range {overall['min']:.3f}-{overall['max']:.3f}). The round wall time also covers evaluation "
        "(held-out RM accuracy, fresh samples, KL), which has no timing/ key of its own.",
    )
    run.add_table(
        "Same computations: round metrics, Ray / local",
        ["round", *COMPARED_METRICS],
        agreement,
        note="Equal seeds and one thread per model in both arms; small differences can come from "
        "floating-point reduction order.",
    )
    run.add_table("Rounds in run order", ["round", "arm", "seconds", "load start", "load end"], round_rows)
    run.add_bar_chart(
        "distribution_overhead.png",
        [f"{arm} round {r}" for r in game_rounds for arm in ("ray", "local")],
        [by_arm[arm][r].timing.seconds for r in game_rounds for arm in ("ray", "local")],
        ylabel="seconds per APO round",
        title="APO round: Ray actors vs one process",
    )
    return {
        "settings": {k: str(v) if k == "out" else v for k, v in vars(args).items()},
        "processes": processes,
        "startup": {"ray": ray_start.to_dict(), "local": local_start.to_dict()},
        "round_wall_ray_over_local": overall,
        "phases": phases,
        "rounds": [{"arm": t.arm, "round": t.repeat, "timing": t.timing.to_dict(), "stats": t.result} for t in trials],
    }


if __name__ == "__main__":
    main()
