"""The driver: plays the APO game (paper, Algorithm 1) over the Ray actors. It holds no model.

Round 0 fits the RM on the human pairs D_P and measures the SFT policy. Each round r >= 1:
  1. sample S responses per policy prompt of the round and, when the RM step is due, per gold prompt, in one
     pool call (apo_ray/round_samples.py; with ppo.async_rollouts the call was made during round r-1);
  2. RM step (the max player; apo=true, every reward.update_every rounds) on D_APO = {(x, y_gold, y_sample)}
     plus the human pairs D_P; then score the policy samples with the RM;
  3. policy step (the min player), one strategy per method: RJS, RRHF or DPO on all of D_Q
     (apo_ray/offline.py), or one PPO / GRPO / REINFORCE++ iteration on a slice of it (apo_ray/online.py);
  4. sync the weights to every rollout worker; evaluate (by default during round r+1, on the CPUs it leaves
     idle: apo_ray/held_out_evaluation.py) and checkpoint (every eval_every / checkpoint_every rounds, and
     the last).
With `apo=false` step 1 never runs: the RM stays as trained on D_P, the paper's baseline.

The sibling games hook in at two places: AAPA (aapa.enabled, apo_ray/anchoring.py) fits its discriminator in
round 0 and adds its anchoring reward to the RM scores before step 3; APL (apl.enabled, apo_ray/apl_step.py) is
step 3's strategy, with its attacker's round in the strategy's start_round and its measurements in its evaluate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from apo_ray.anchoring import Anchoring
from apo_ray.apl_step import APLPolicyStep
from apo_ray.apo_activity import inert_apo_reason
from apo_ray.checkpoint import Checkpointer
from apo_ray.config import Config
from apo_ray.data import GameData
from apo_ray.game import Rollout, TokenSample, build_apo_pairs
from apo_ray.held_out_evaluation import HeldOutEvaluation
from apo_ray.learner_group import LearnerGroup, RenamedMethods, gather
from apo_ray.metric_catalog import round_line
from apo_ray.metrics import MetricsLogger, read_metrics_jsonl
from apo_ray.offline import OfflinePolicyStep
from apo_ray.online import OnlinePolicyStep
from apo_ray.policy_step import PolicyStep
from apo_ray.ppo import concat_right_padded, evenly_spread, logprob_mismatch, sampler_logprob_grid
from apo_ray.rollout_pool import RolloutPool
from apo_ray.round_flops import RoundFlops
from apo_ray.round_samples import RoundSampler
from apo_ray.seeds import SeedStream, round_seed

Oracle = Callable[[str, str], float]
# The oracle's score split into named terms that sum to its raw score (the builtin task's gold_terms).
OracleTerms = Callable[[str, str], dict[str, float]]


@dataclass
class Actors:
    """The game's actors. Each learner is a LearnerGroup of its ranks, called like one actor handle
    (`x.method.remote(...)`, waited for with `gather`)."""

    pool: RolloutPool
    reward: LearnerGroup
    policy: LearnerGroup
    # The policy learner's base weights under LoRA (learner.lora.reference_actor false): no actor of its own.
    reference: LearnerGroup | RenamedMethods
    eval_reward: LearnerGroup | None = None  # None: the task's gold oracle judges
    critic: LearnerGroup | None = None  # online PPO only
    discriminator: LearnerGroup | None = None  # AAPA only
    attacker: LearnerGroup | None = None  # APL only: the attacker's learner
    attacker_pool: RolloutPool | None = None  # APL only: the attacker's rollout workers

    @property
    def learners(self) -> list[LearnerGroup]:
        return [
            g
            for g in (
                self.policy,
                self.reward,
                self.reference,
                self.eval_reward,
                self.critic,
                self.discriminator,
                self.attacker,
            )
            if g is not None and not isinstance(g, RenamedMethods)
        ]


class APOGame:
    def __init__(
        self,
        cfg: Config,
        data: GameData,
        actors: Actors,
        logger: MetricsLogger,
        checkpointer: Checkpointer,
        oracle: Oracle | None,
        log: Callable[[str], None] = print,
        oracle_terms: OracleTerms | None = None,
        warn: Callable[[str], None] = print,
    ):
        self.cfg, self.data, self.actors = cfg, data, actors
        self.logger, self.checkpointer, self.oracle, self.log, self.warn = logger, checkpointer, oracle, log, warn
        self.oracle_terms = oracle_terms
        self.version = 0
        self.evaluation = HeldOutEvaluation(self)
        self.eval_prompts = self.evaluation.prompts
        # This invocation's APO RM steps, for the inert-term warning (given once).
        self.rm_steps: list[dict[str, float]] = []
        self.warned_inert = False
        self.policy_step: PolicyStep = policy_step_for(self)
        self.sampler = RoundSampler(self)
        self.flops = RoundFlops(self)
        # AAPA: a frozen discriminator's anchoring reward added to the policy step's (aapa.enabled).
        self.anchoring = Anchoring(self) if cfg.aapa.enabled else None

    # ------------------------------------------------------------------ Algorithm 1

    def run(self, first_round: int = 0) -> list[dict[str, float]]:
        """Play rounds first_round..cfg.rounds; round 0 is the initial RM fit and the baseline measurement."""
        if first_round > 0:
            state = self.checkpointer.read_state(first_round - 1)
            self.policy_step.restore(state)
            if self.anchoring is not None:
                self.anchoring.restore()
            self._complete_pending_row(first_round - 1, state.get("pending_row"))
        return [self.initial_round() if r == 0 else self.play_round(r) for r in range(first_round, self.cfg.rounds + 1)]

    def initial_round(self) -> dict[str, float]:
        """Round 0: fit the RM on human pairs D_P, then measure the SFT policy and that RM."""
        started = time.perf_counter()
        self._phase("rm_init", 0)
        stats = {}
        if self.cfg.reward.initial_epochs > 0:
            stats = self._rm_update([], epochs=self.cfg.reward.initial_epochs, round_index=0)
        stats.update(self.flops.ceiling_stats())
        self.checkpointer.save_base_reward(self.actors.reward)
        if self.anchoring is not None:
            stats.update(self.anchoring.fit())
        self._finish_round(0, stats, started, evaluate=True)
        return stats

    def play_round(self, r: int) -> dict[str, float]:
        started = time.perf_counter()
        cfg = self.cfg
        stats = self.policy_step.start_round(r)
        self._phase("generate", r)
        samples = self.sampler.take(r, stats)
        self.flops.generation(stats, samples.policy + samples.gold)
        # Round r-1's held-out samples (an overlapped evaluation), drawn while this round's RM step runs.
        self.evaluation.sample_pending()
        # Asynchronous mode: the pool samples round r + 1 while this round's RM step, scoring and training run.
        self.sampler.prefetch(r + 1)
        if self.rm_step_due(r):
            stats.update(self.rm_step(r, samples.gold))

        rollouts = samples.policy
        self._phase("score", r)
        with self.flops.forwards(stats, "score", ("reward",)):
            scores = gather(
                self.actors.reward.score.remote([x.prompt for x in rollouts], [x.response for x in rollouts])
            )
        stats["policy/reward_mean"] = float(np.mean(scores))
        stats["policy/reward_std"] = float(np.std(scores))
        if self.anchoring is not None:
            scores = self.anchoring.anchored_scores(r, rollouts, scores, stats)

        self._phase("policy_step", r)
        self.evaluation.before_policy_step()
        stats.update(self.policy_step.update(r, rollouts, scores, round_seed(cfg.seed, r, SeedStream.POLICY_STEP)))
        self.sampler.finish_prefetch(r, stats)

        self.evaluation.before_sync()
        self._phase("sync", r)
        self.version = r
        stats.update(self.actors.pool.sync_from(self.actors.policy, self.version))
        self.policy_step.after_sync(stats, len(rollouts))
        self._finish_round(r, stats, started, evaluate=r % cfg.eval_every == 0 or r == cfg.rounds)
        return stats

    def rm_step_due(self, r: int) -> bool:
        """The APO RM step opens rounds 1, 1 + K, 1 + 2K, ... (K = reward.update_every), with apo=true."""
        every = self.cfg.reward.update_every
        return self.cfg.apo and every > 0 and (r - 1) % every == 0

    def rm_step(self, r: int, gold_rollouts: list[Rollout]) -> dict[str, float]:
        """The max player (Algorithm 1, step 2): S policy samples per gold prompt (from the round's call), each
        paired against its golden answer, plus the human pairs D_P."""
        self._phase("rm_step", r)
        if self.cfg.reward.reinit_each_round:
            gather(self.actors.reward.reinitialize.remote(str(self.checkpointer.base_reward_dir)))
        stats = self._rm_update(build_apo_pairs(self.data.gold, gold_rollouts), self.cfg.reward.epochs_per_round, r)
        self._check_apo_term(stats)
        return stats

    def _check_apo_term(self, stats: dict[str, float]) -> None:
        self.rm_steps.append(stats)
        reason = inert_apo_reason(
            self.rm_steps, self.cfg.reward.apo_inert_share, restarts_each_round=self.cfg.reward.reinit_each_round
        )
        if reason and not self.warned_inert:
            self.warned_inert = True
            self.warn(f"the APO term is inert: {reason}")

    def learner_grids(
        self, methods: dict[str, Callable], samples: list[TokenSample]
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """{name: (grid, mask)} of learner actor methods (token_logprobs, values) on `samples`, each in chunks
        of ppo.minibatch_size rows (a whole batch's logits may not fit) joined on one [N, W] grid. Every
        chunk of every learner is submitted before any is awaited, so the learners compute side by side."""
        chunk = self.cfg.ppo.minibatch_size
        spans = range(0, len(samples), chunk)
        calls = {name: [method.remote(samples[a : a + chunk]) for a in spans] for name, method in methods.items()}
        results = {name: gather(refs) for name, refs in calls.items()}
        return {
            name: (concat_right_padded([grid for grid, _ in parts]), concat_right_padded([mask for _, mask in parts]))
            for name, parts in results.items()
        }

    def sampler_mismatch(
        self, rollouts: list[Rollout], learner_logps: Tensor | None = None, mask: Tensor | None = None
    ) -> dict[str, float]:
        """rollout/logprob_diff(_max): the rollout engine's log-probs of its samples against the policy
        learner's on the same weights (taken here unless given)."""
        timed: dict[str, float] = {}
        if learner_logps is None or mask is None:
            rollouts = evenly_spread(rollouts, self.cfg.rollout.logprob_check_samples)
            # A forward pass of its own, about a third of an SFT step's time on SmolLM2 when it takes every
            # sample: a phase of its own, so that it does not hide in a round's unaccounted seconds.
            with self.flops.forwards(timed, "logprob_check", ("policy",)):
                learner_logps, mask = self.learner_grids(
                    {"logps": self.actors.policy.token_logprobs}, [x.tokens for x in rollouts]
                )["logps"]
        sampler = self.sampler_grid(rollouts, learner_logps.shape[1])
        return {**timed, **logprob_mismatch(sampler, learner_logps, mask)}

    @staticmethod
    def sampler_grid(rollouts: list[Rollout], width: int) -> Tensor:
        return sampler_logprob_grid(
            [len(x.prompt_token_ids) for x in rollouts], [list(x.sampler_logprobs) for x in rollouts], width
        )

    # ------------------------------------------------------------------ pieces

    def _rm_update(self, apo_pairs, epochs: int, round_index: int) -> dict[str, float]:
        return gather(
            self.actors.reward.apo_step.remote(
                apo_pairs,
                self.data.pairs,
                apo_coef=self.cfg.apo_coef,
                pref_coef=self.cfg.reward.pref_coef,
                epochs=epochs,
                seed=round_seed(self.cfg.seed, round_index, SeedStream.RM),
            )
        )

    def _phase(self, name: str, r: int) -> None:
        # Where the game is, for a deadline's message.
        self.at = f"round {r}, phase {name}"
        self.logger.set_phase(name)
        self.log(f"[round {r}/{self.cfg.rounds}] {name}")

    def _finish_round(self, r: int, stats: dict[str, float], started: float, evaluate: bool) -> None:
        """Evaluate round r (in place, or started here to finish in round r+1), log the rows that are complete,
        and checkpoint. A deferred row travels in the checkpoint until it is logged."""
        finished = self.evaluation.finish_pending()
        deferred = evaluate and self.evaluation.overlaps(r)
        if evaluate:
            self._phase("evaluate", r)
            if deferred:
                self.evaluation.defer(r, stats)
            else:
                stats.update(self.evaluation.in_place(r))
            stats.update(self.policy_step.evaluate(r))
        stats["timing/round"] = time.perf_counter() - started
        self.flops.finish(stats)
        # Round 0 samples only for its evaluation, from the pool as it started.
        stats.setdefault("rollout/num_workers", float(self.actors.pool.num_workers))
        stats["round"] = r
        # Logged before the checkpoint: a driver killed in between leaves a row that --resume truncates. The
        # other order can leave a checkpointed round whose row is lost for good.
        if finished is not None:
            self._log_row(*finished)
        if not deferred:
            self._log_row(r, stats)
        if r % self.cfg.checkpoint_every == 0 or r == self.cfg.rounds:
            self._phase("checkpoint", r)
            extra = self.policy_step.checkpoint_extra()
            if deferred:
                # Ints stay ints, so that the row a resume logs from here reads as the uninterrupted run's.
                extra["pending_row"] = {
                    key: value if type(value) is int else float(value) for key, value in stats.items()
                }
            self.checkpointer.save_round(r, self.actors, version=self.version, extra=extra)

    def _log_row(self, r: int, stats: dict[str, float]) -> None:
        self.logger.log(stats, step=r)
        anchored = round_line("aapa") if self.anchoring is not None else ()
        self.log(format_round(r, stats, self.policy_step.summary_keys + anchored))

    def _complete_pending_row(self, r: int, row: dict[str, float] | None) -> None:
        """A resume after round r whose checkpoint holds its row, unlogged: the run stopped during round r+1,
        before round r's overlapped evaluation ended. Evaluate round r in place (its weights are restored)."""
        if row is None or any(logged["step"] == r for logged in read_metrics_jsonl(self.logger.jsonl_path)):
            return
        self._phase("evaluate", r)
        row.update(self.evaluation.in_place(r))
        row.update(self.policy_step.evaluate(r))
        self._log_row(r, row)


def policy_step_for(game: APOGame) -> PolicyStep:
    """The min player's strategy for the configured method; APL's attacker/defender rounds when apl.enabled."""
    if game.cfg.apl.enabled:
        return APLPolicyStep(game)
    return OnlinePolicyStep(game) if game.cfg.online else OfflinePolicyStep(game)


def format_round(r: int, stats: dict[str, float], keys: tuple[str, ...]) -> str:
    shown = "  ".join(f"{k}={stats[k]:.3f}" for k in keys if k in stats)
    return f"[round {r}] {shown}"
