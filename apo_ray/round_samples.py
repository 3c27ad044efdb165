"""The rollout pool's calls for the game's rounds (apo_ray/driver.py plays them).

- **One call a round.** The round's policy prompts and, when its RM step is due, the gold prompts after them
  go to the pool together, under the round's one seed. vLLM seeds every prompt from (seed, its position), so
  the policy samples are the same whether gold prompts follow or not.
- **Asynchronous mode** (`ppo.async_rollouts`, online methods). Round r submits round r+1's call as soon as it
  has its own samples, and collects it before its sync: the pool samples round r+1 with the weights of round
  r-1 while the learners score and train on round r (one-step off-policy: `rollout/policy_version_lag` 1
  from round 2 on; round 2's RM step also meets samples one version old). The first round of a run, or of a
  resumed run, samples on the spot.
- **The pool's size** is set before each call, for the round it samples: `rollout.schedule`, or a request
  that `apo-ray resize` left in the run directory (apo_ray/pool_size.py), checked first against the cluster's
  resources; one that does not fit or cannot be read is logged and dropped, and the run goes on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import ray

from apo_ray.game import Rollout, check_adapter_versions, policy_version_lag, split_rollouts
from apo_ray.placement import actor_plan, cluster_from_ray_nodes, place
from apo_ray.pool_size import ResizeRequestError, scheduled_workers, take_resize_request
from apo_ray.rollout_pool import GenerateCall
from apo_ray.seeds import SeedStream, round_seed

if TYPE_CHECKING:
    from apo_ray.driver import APOGame


@dataclass
class RoundSamples:
    policy: list[Rollout]
    gold: list[Rollout]  # empty unless the round's RM step is due
    stats: dict[str, float]  # the call's: throughput, samples, rollout/num_workers


@dataclass
class _OpenCall:
    round_index: int
    call: GenerateCall
    n_policy_prompts: int


class RoundSampler:
    def __init__(self, game: APOGame):
        self.game, self.cfg, self.pool = game, game.cfg, game.actors.pool
        self.asynchronous = self.cfg.online and self.cfg.ppo.async_rollouts
        self._sized_once = False
        self._open: _OpenCall | None = None
        self._collected: tuple[int, RoundSamples] | None = None

    def take(self, r: int, stats: dict[str, float]) -> RoundSamples:
        """Round r's samples: the ones collected during round r-1 (asynchronous mode), else sampled now. Adds
        the call's stats and the samples' version lag behind the learner to `stats`."""
        if self._collected is not None and self._collected[0] == r:
            samples = self._collected[1]
        else:
            samples = self._collect(self._submit(r), stats)
        self._collected = None
        stats.update(samples.stats)
        check_adapter_versions(samples.policy + samples.gold)
        stats.update(policy_version_lag(samples.policy, self.game.version))
        return samples

    def prefetch(self, r: int) -> None:
        """Asynchronous mode: submit round r's call now, on the weights the workers hold."""
        if self.asynchronous and r <= self.cfg.rounds:
            self._open = self._submit(r)

    def finish_prefetch(self, r: int, stats: dict[str, float]) -> None:
        """Wait for the call `prefetch` submitted during round r; the pool takes weights only after it."""
        if self._open is not None:
            self.game._phase("generate_next", r)
            open_call, self._open = self._open, None
            self._collected = (open_call.round_index, self._collect(open_call, stats))

    # ------------------------------------------------------------------ pieces

    def _submit(self, r: int) -> _OpenCall:
        self._resize_for(r)
        policy_prompts = self.game.policy_step.prompts(r)
        gold_prompts = [g.prompt for g in self.game.data.gold] if self.game.rm_step_due(r) else []
        call = self.pool.submit(
            policy_prompts + gold_prompts,
            self.cfg.samples_per_prompt,
            seed=round_seed(self.cfg.seed, r, SeedStream.POLICY),
        )
        return _OpenCall(r, call, len(policy_prompts))

    def _collect(self, open_call: _OpenCall, stats: dict[str, float]) -> RoundSamples:
        """The call's samples; the time the driver waited for them is this round's timing/generate."""
        started = time.perf_counter()
        rollouts = open_call.call.result()
        stats["timing/generate"] = stats.get("timing/generate", 0.0) + time.perf_counter() - started
        policy, gold = split_rollouts(rollouts, open_call.n_policy_prompts)
        return RoundSamples(policy, gold, dict(open_call.call.stats))

    def _resize_for(self, r: int) -> None:
        """The pool's size for round r's call: the schedule's (at a run's first call and at each entry), or a
        pending request's."""
        schedule, target, why = self.cfg.rollout.schedule, None, ""
        if not self._sized_once or r in schedule:
            target, why = scheduled_workers(self.cfg.rollout.num_workers, schedule, r), "rollout.schedule"
        self._sized_once = True
        try:
            requested = take_resize_request(Path(self.cfg.run_dir))
        except ResizeRequestError as error:
            self.game.log(f"  rollout pool: {error}; request dropped")
            requested = None
        if requested is not None:
            problem = self._cannot_hold(requested)
            if problem:
                self.game.log(f"  rollout pool: request for {requested} workers dropped: {problem}")
            else:
                target, why = requested, "apo-ray resize request"
        if target is not None and target != self.pool.num_workers:
            self.game.log(
                f"  rollout pool: {self.pool.num_workers} -> {target} workers for round {r}'s samples ({why})"
            )
            self.pool.resize(target)

    def _cannot_hold(self, num_workers: int) -> str:
        """Why the cluster cannot hold the run's actors with `num_workers` rollout workers; empty if it can."""
        rollout = self.cfg.rollout.model_copy(update={"num_workers": num_workers, "schedule": {}})
        plan = actor_plan(self.cfg.model_copy(update={"rollout": rollout}))
        placement = place(plan, cluster_from_ray_nodes(ray.nodes(), "the Ray cluster"))
        return "" if placement.fits else placement.summary
