"""`flops/<phase>` and `efficiency/<phase>` next to each round's `timing/<phase>` (the arithmetic: apo_ray/flops.py).

At start-up every process that runs a phase measures its float32 matmul ceiling on its own threads, one after
the other (two at once would share the cores and both read low): each rollout worker, each learner (its ranks
together, as they train), and the driver, on one thread per core of the machine, for the round as a whole. The
ceilings are logged with round 0 as `ceiling/<role>` (FLOP/s), and each process's threads as
`threads/<role>` (learner.threads, rollout.threads).

Each phase's FLOPs come from where its tokens are known: generation from the samples' token counts on the
policy's shape; forward-only passes (scores, log-probs, values) from the learners' own counters, read after the
phase; training steps from the learners' step stats (actors/engine.py train_steps, added over ranks). A
forward-only call runs on every rank of a learner and rank 0's count is the work: the other ranks' copies
show as a lower efficiency. In asynchronous mode `timing/generate` is only the wait for samples drawn during
the previous round, so generation gets FLOPs and no efficiency. The held-out evaluation's work is not counted
yet: `efficiency/round` divides the other phases' FLOPs by the whole round's seconds, evaluation included.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from apo_ray.flops import generation_flops, machine_threads, matmul_ceiling, phase_efficiencies
from apo_ray.game import Rollout
from apo_ray.learner_group import LearnerGroup, RenamedMethods, gather

if TYPE_CHECKING:
    from apo_ray.driver import APOGame

# The learner roles whose ceilings bound the training phases they run.
TRAINING_PHASES = {"rm_step": "reward", "policy_step": "policy", "critic_step": "critic"}


class RoundFlops:
    def __init__(self, game: APOGame):
        actors = game.actors
        self.asynchronous = game.cfg.online and game.cfg.ppo.async_rollouts
        self.learners = {"policy": actors.policy, "reward": actors.reward}
        # A reference that is the policy learner (LoRA) counts its forwards, and has its ceiling, there.
        self.counted_by = {"reference": "policy"} if isinstance(actors.reference, RenamedMethods) else {}
        if not self.counted_by:
            self.learners["reference"] = actors.reference
        if actors.critic is not None:
            self.learners["critic"] = actors.critic
        self.shape = gather(actors.policy.model_shape.remote())
        self.threads = {"machine": machine_threads(), "rollout": actors.pool.worker_threads}
        self.ceilings = {
            "machine": matmul_ceiling(threads=self.threads["machine"]),
            "rollout": actors.pool.matmul_ceiling(),
        }
        for role, group in self.learners.items():
            ranks = group.num_ranks if isinstance(group, LearnerGroup) else 1
            self.ceilings[role] = ranks * gather(group.matmul_ceiling.remote())
            self.threads[role] = gather(group.threads.remote())
        self._phase_ceilings = {
            phase: self.ceilings[role] for phase, role in TRAINING_PHASES.items() if role in self.ceilings
        }
        if not self.asynchronous:
            self._phase_ceilings["generate"] = self.ceilings["rollout"]

    def ceiling_stats(self) -> dict[str, float]:
        """Each role's ceiling and the threads it was measured on (per process)."""
        return {
            **{f"ceiling/{role}": value for role, value in self.ceilings.items()},
            **{f"threads/{role}": float(n) for role, n in self.threads.items()},
        }

    def generation(self, stats: dict[str, float], rollouts: list[Rollout]) -> None:
        """`flops/generate` of the round's samples (policy and gold prompts alike)."""
        stats["flops/generate"] = float(
            generation_flops(
                self.shape, [len(x.prompt_token_ids) for x in rollouts], [len(x.response_token_ids) for x in rollouts]
            )
        )

    @contextmanager
    def forwards(self, stats: dict[str, float], phase: str, roles: tuple[str, ...]) -> Iterator[None]:
        """`timing/<phase>`, the block's seconds, and `flops/<phase>`, the forward-only FLOPs that the learners
        of `roles` count during it."""
        roles = tuple(
            dict.fromkeys(
                learner for learner in (self.counted_by.get(role, role) for role in roles) if learner in self.learners
            )
        )
        self._take(roles)  # what they counted before the phase is not the phase's
        started = time.perf_counter()
        yield
        stats[f"timing/{phase}"] = time.perf_counter() - started
        stats[f"flops/{phase}"] = float(self._take(roles))
        self._phase_ceilings[phase] = sum(self.ceilings[role] for role in roles)

    def _take(self, roles: tuple[str, ...]) -> int:
        return sum(gather([self.learners[role].forward_flops.remote() for role in roles]))

    def finish(self, stats: dict[str, float]) -> None:
        """The round's `efficiency/<phase>` and its `flops/round` and `efficiency/round`."""
        stats.update(phase_efficiencies(stats, self._phase_ceilings, self.ceilings["machine"]))
