"""Online APO: PPO (or the critic-free GRPO / REINFORCE++) with the reward model adapting inside the loop.

The paper plays APO with offline policy steps; here the min player is online PPO. Iteration 0 is the
offline game's round 0 (the RM fitted on human pairs, the SFT policy measured). Each iteration i >= 1:

  1. generate    S samples for the iteration's policy prompts; each rollout carries its policy version;
  2. score       them with the game's RM;
  3. logprobs    recompute per-token log-probs under the policy ("old") and the reference, and the critic's
                 values, on the learners, on the sampled token ids; the sampler's own log-probs measure the
                 gap (rollout/logprob_diff) and, with ppo.tis, weight each token's loss (truncated
                 importance sampling);
  4. advantages  rewards = RM score on the last token - kl_coef * KL on every token, then GAE with the
                 critic (ppo) or batch-normalised returns (reinforce_pp); grpo normalises the scores within
                 each prompt's group and puts the KL into the policy's loss instead;
  5. update      ppo_epochs passes of minibatch updates of the policy and, at the same time, the critic;
  6. sync        the new weights to every rollout worker;
  7. rm_step     every K = ppo.rm_update_every iterations (apo=true): the APO RM step on fresh samples for
                 the gold prompts against the golden answers, plus the human-pair term, so the following
                 iterations optimise the adapted RM;
  8. evaluate every ppo.eval_every iterations, log, checkpoint every ppo.checkpoint_every iterations.

apo=false or K=0 is plain PPO with the RM fixed after iteration 0: the baseline of APO-PPO.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import ray
import torch
from torch import Tensor

from apo_ray.config import ONLINE_METHODS, PPOConfig
from apo_ray.driver import APOGame, SeedStream, round_seed
from apo_ray.game import TokenSample
from apo_ray.losses import masked_mean, sequence_logprob
from apo_ray.ppo import (
    AdaptiveKLController,
    FixedKLController,
    KLController,
    gae_advantages,
    grpo_advantages,
    kl_penalty,
    per_token_rewards,
    reinforce_plus_plus_advantages,
    truncated_importance_weights,
    whiten,
)

# evaluate() measures these on held-out prompts; every iteration measures them on its own rollouts.
_EVAL_RENAMES = {"policy/kl": "eval/kl", "policy/response_length": "eval/response_length"}


def iteration_prompt_indices(n_prompts: int, per_iteration: int, iteration: int, seed: int) -> list[int]:
    """The prompts (indices) of PPO iteration `iteration` >= 1: consecutive slices of a stream of seeded
    permutations, one per pass over the prompts. Every prompt is used once per pass, and a resumed run
    draws the same prompts as an uninterrupted one."""
    if n_prompts < 1 or per_iteration < 1 or iteration < 1:
        raise ValueError(
            f"n_prompts, per_iteration, iteration: must be >= 1, got {n_prompts}, {per_iteration}, {iteration}"
        )
    passes: dict[int, np.ndarray] = {}
    indices = []
    for position in range((iteration - 1) * per_iteration, iteration * per_iteration):
        one_pass, offset = divmod(position, n_prompts)
        if one_pass not in passes:
            passes[one_pass] = np.random.default_rng([seed, one_pass]).permutation(n_prompts)
        indices.append(int(passes[one_pass][offset]))
    return indices


@dataclass
class TokenGrids:
    """Per-token quantities of a batch of rollouts on the policy's token grid, all [N, W]."""

    logps: Tensor  # under the policy that sampled them, recomputed by the learner
    ref_logps: Tensor
    mask: Tensor
    values: Tensor | None  # the critic's, ppo only


def estimate_advantages(
    method: str,
    scores: Tensor,
    grids: TokenGrids,
    *,
    ppo: PPOConfig,
    kl_coef: float,
    group_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Per-token advantages [N, W], and the critic's regression targets (ppo) or None.

    ppo and reinforce_pp penalise KL inside the rewards (score on the last token, -kl_coef * KL on every
    token); grpo gives every token its sample's group-normalised score, and its KL is a loss term.
    """
    mask = grids.mask.to(grids.logps.dtype)
    if method == "grpo":
        if group_ids is None:
            raise ValueError("estimate_advantages: grpo needs group_ids (the prompt of each sample)")
        return grpo_advantages(scores, group_ids)[:, None] * mask, None
    rewards = per_token_rewards(scores, kl_penalty(grids.logps, grids.ref_logps, ppo.kl_estimator), mask, kl_coef)
    if method == "reinforce_pp":
        return reinforce_plus_plus_advantages(rewards, mask, ppo.gamma), None
    if method == "ppo":
        if grids.values is None:
            raise ValueError("estimate_advantages: ppo needs the critic's values")
        advantages, returns = gae_advantages(rewards, grids.values, mask, ppo.gamma, ppo.lam)
        return (whiten(advantages, mask) if ppo.whiten_advantages else advantages), returns
    raise ValueError(f"method: {method!r} is not an online method ({', '.join(ONLINE_METHODS)})")


class OnlineAPOGame(APOGame):
    """The APO game whose min player is online PPO / GRPO / REINFORCE++ and whose max player steps every
    K iterations. The metric step and "round" are the PPO iteration."""

    step_name = "iteration"
    summary_keys = ("eval/gold_score", "eval/kl", "policy/reward_mean", "policy/kl", "policy/kl_coef",
                    "policy/clipfrac", "policy/entropy", "critic/loss", "rm/acc", "rm/acc_policy", "timing/round")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        if cfg.method not in ONLINE_METHODS:
            raise ValueError(f"method: {cfg.method!r} is an offline method; run it with apo_ray.driver.APOGame")
        if cfg.method == "ppo" and self.actors.critic is None:
            raise ValueError("method: ppo needs a critic actor (apo_ray.cluster.start_actors starts one)")
        ppo = cfg.ppo
        self.kl_controller: KLController = (
            AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon) if ppo.adaptive_kl
            else FixedKLController(ppo.kl_coef)
        )

    @property
    def rm_update_every(self) -> int:
        """K, or 0 when the RM stays as fitted in iteration 0 (apo=false or ppo.rm_update_every=0)."""
        return self.cfg.ppo.rm_update_every if self.cfg.apo else 0

    def run(self, first_round: int = 0) -> list[dict[str, float]]:
        """Play iterations first_round..ppo.iterations; iteration 0 is the offline game's round 0."""
        if first_round > 0:
            saved = self.checkpointer.read_state(first_round - 1)
            self.kl_controller.value = saved.get("kl_coef", self.kl_controller.value)
        iterations = range(first_round, self.cfg.ppo.iterations + 1)
        return [self.initial_round() if i == 0 else self.iteration(i) for i in iterations]

    def iteration(self, i: int) -> dict[str, float]:
        started = time.perf_counter()
        cfg, ppo = self.cfg, self.cfg.ppo
        stats: dict[str, float] = {"policy/kl_coef": self.kl_controller.value}
        if i == 1 and self.actors.critic is not None and ppo.critic_init == "reward":
            # The critic starts as the RM fitted in iteration 0; iteration 1 runs on resume from 0 too.
            ray.get(self.actors.critic.reinitialize.remote(str(self.checkpointer.base_reward_dir)))

        self._phase("generate", i)
        indices = iteration_prompt_indices(len(self.data.prompts), ppo.prompts_per_iteration, i, cfg.seed)
        rollouts = self._generate([self.data.prompts[k] for k in indices], cfg.samples_per_prompt,
                                  round_seed(cfg.seed, i, SeedStream.POLICY), stats)
        prompts, responses = [x.prompt for x in rollouts], [x.response for x in rollouts]
        samples = [x.tokens for x in rollouts]
        stats["policy/response_length"] = float(np.mean([len(x.response_token_ids) for x in rollouts]))
        stats["rollout/truncated_fraction"] = float(np.mean([x.finish_reason == "length" for x in rollouts]))

        self._phase("score", i)
        t = time.perf_counter()
        scores = torch.tensor(ray.get(self.actors.reward.score.remote(prompts, responses)))
        stats["timing/score"] = time.perf_counter() - t
        stats["policy/reward_mean"] = scores.mean().item()
        stats["policy/reward_std"] = scores.std(unbiased=False).item()

        self._phase("logprobs", i)
        t = time.perf_counter()
        grids = self._token_grids(samples)
        stats["timing/logprobs"] = time.perf_counter() - t
        # Sequence-level k1, the same quantity evaluate() reports, whatever estimator the penalty uses.
        stats["policy/kl"] = sequence_logprob(grids.logps - grids.ref_logps, grids.mask, average=False).mean().item()
        advantages, returns = estimate_advantages(
            cfg.method, scores, grids, ppo=ppo, kl_coef=self.kl_controller.value,
            group_ids=torch.tensor([x.prompt_index for x in rollouts]),
        )
        sampler_logps = self.sampler_grid(rollouts, grids.logps.shape[1])
        stats.update(self.sampler_mismatch(rollouts, grids.logps, grids.mask))
        # Measured with or without ppo.tis, so a run without it shows what the correction would do.
        weights, tis_stats = truncated_importance_weights(grids.logps, sampler_logps, grids.mask, ppo.tis_cap)
        stats.update(tis_stats)
        if ppo.tis:
            advantages = advantages * weights

        self._phase("policy_step", i)
        seed = round_seed(cfg.seed, i, SeedStream.POLICY_STEP)
        kl_loss_coef = self.kl_controller.value if cfg.method == "grpo" else 0.0
        steps = [self.actors.policy.ppo_step.remote(
            samples, grids.logps, advantages, grids.mask, ppo=ppo, seed=seed,
            ref_logps=grids.ref_logps if kl_loss_coef > 0 or ppo.kl_hard_limit else None, kl_loss_coef=kl_loss_coef,
        )]
        if returns is not None:
            steps.append(self.actors.critic.value_step.remote(samples, grids.values, returns, grids.mask, seed=seed))
            stats["critic/values"] = masked_mean(grids.values, grids.mask).item()
            stats["critic/returns"] = masked_mean(returns, grids.mask).item()
        for step_stats in ray.get(steps):
            stats.update(step_stats)

        self._phase("sync", i)
        self.version = i
        stats.update(self.actors.pool.sync_from(self.actors.policy, self.version))
        self.kl_controller.update(stats["policy/kl"], len(rollouts))

        if self.rm_update_every and i % self.rm_update_every == 0:
            stats.update(self.rm_step(i))
        if i % ppo.eval_every == 0 or i == ppo.iterations:
            stats.update(self.evaluate(i))
        self._finish_round(i, stats, started)
        return stats

    def evaluate(self, r: int) -> dict[str, float]:
        # Iteration 0 (the offline round 0) included, so the held-out series never mixes with the rollouts'.
        return {_EVAL_RENAMES.get(k, k): v for k, v in super().evaluate(r).items()}

    def _token_grids(self, samples: list[TokenSample]) -> TokenGrids:
        """Policy and reference log-probs and critic values, from all three learners at once."""
        methods = {"logps": self.actors.policy.token_logprobs, "ref_logps": self.actors.reference.token_logprobs}
        if self.actors.critic is not None and self.cfg.method == "ppo":
            methods["values"] = self.actors.critic.values
        results = self.learner_grids(methods, samples)
        masks = [mask for _, mask in results.values()]
        if any(not torch.equal(masks[0], mask) for mask in masks[1:]):
            raise RuntimeError("policy, reference and critic lay the samples out differently; they must share "
                               "the policy's tokenizer")
        grids = {name: grid for name, (grid, _) in results.items()}
        return TokenGrids(logps=grids["logps"], ref_logps=grids["ref_logps"], mask=masks[0], values=grids.get("values"))

    @property
    def total_steps(self) -> int:
        return self.cfg.ppo.iterations

    def should_checkpoint(self, i: int) -> bool:
        return i % self.cfg.ppo.checkpoint_every == 0 or i == self.cfg.ppo.iterations

    def checkpoint_extra(self) -> dict[str, float]:
        # The KL coefficient adapts; a resumed run continues from the saved one.
        return {"kl_coef": self.kl_controller.value}
