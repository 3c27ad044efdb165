"""Online APO: PPO (or the critic-free GRPO / REINFORCE++) as the game loop's policy step, with the reward
model adapting inside the loop (apo_ray/driver.py runs the loop; a round is one PPO iteration).

The paper plays APO with offline policy steps; here the min player is online PPO. Round 0 fits the RM on the
human pairs and measures the SFT policy. Each round r >= 1 the loop opens with the APO RM step every
K = reward.update_every rounds (apo=true), samples S responses for the round's slice of the policy prompts
and scores them with the game's RM; then this step:

  1. logprobs    recomputes per-token log-probs under the policy ("old") and the reference, and the critic's
                 values, on the learners, on the sampled token ids; the sampler's own log-probs measure the
                 gap (rollout/logprob_diff) and, with ppo.tis, weight each token's loss (truncated
                 importance sampling);
  2. advantages  rewards = RM score on the last token - kl_coef * KL on every token, then GAE with the
                 critic (ppo) or batch-normalised returns (reinforce_pp); grpo normalises the scores within
                 each prompt's group and puts the KL into the policy's loss instead;
  3. update      ppo_epochs passes of minibatch updates of the policy and, at the same time, the critic;
and after the loop's sync the adaptive KL coefficient moves. apo=false is plain PPO with the RM fixed after
round 0: the baseline of APO-PPO.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from apo_ray.batching import iteration_prompt_indices
from apo_ray.game import Rollout, TokenSample
from apo_ray.learner_group import gather
from apo_ray.losses import masked_mean, sequence_logprob
from apo_ray.methods import get_method
from apo_ray.metric_catalog import round_line
from apo_ray.policy_step import PolicyStep
from apo_ray.ppo import AdaptiveKLController, FixedKLController, KLController, TokenGrids, truncated_importance_weights

if TYPE_CHECKING:
    from apo_ray.driver import APOGame


class OnlinePolicyStep(PolicyStep):
    """One PPO / GRPO / REINFORCE++ iteration per round on a slice of the policy prompts; the KL coefficient
    it adapts is checkpointed with the round."""

    summary_keys = round_line("online")

    def __init__(self, game: APOGame):
        cfg, self.method = game.cfg, get_method(game.cfg.method)
        if self.method.family != "online":
            raise ValueError(f"method: {cfg.method!r} is not an online method")
        if "critic" in self.method.roles and game.actors.critic is None:
            raise ValueError(f"method: {cfg.method} needs a critic actor (apo_ray.cluster.start_actors starts one)")
        self.game, self.cfg, self.actors = game, cfg, game.actors
        ppo = cfg.ppo
        self.kl_controller: KLController = (
            AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)
            if ppo.adaptive_kl
            else FixedKLController(ppo.kl_coef)
        )

    def prompts(self, r: int) -> list[str]:
        prompts = self.game.data.prompts
        return [
            prompts[k]
            for k in iteration_prompt_indices(len(prompts), self.cfg.ppo.prompts_per_iteration, r, self.cfg.seed)
        ]

    def start_round(self, r: int) -> dict[str, float]:
        if r == 1 and self.actors.critic is not None and self.cfg.ppo.critic_init == "reward":
            # The critic starts as the RM fitted in round 0 (a run resumed after round 0 comes here too).
            gather(self.actors.critic.reinitialize.remote(str(self.game.checkpointer.base_reward_dir)))
        return {"policy/kl_coef": self.kl_controller.value}

    def update(self, r: int, rollouts: list[Rollout], scores: list[float], seed: int) -> dict[str, float]:
        cfg, ppo, game = self.cfg, self.cfg.ppo, self.game
        samples = [x.tokens for x in rollouts]
        stats = {
            "policy/response_length": float(np.mean([len(x.response_token_ids) for x in rollouts])),
            "rollout/truncated_fraction": float(np.mean([x.finish_reason == "length" for x in rollouts])),
        }
        game._phase("logprobs", r)
        roles = ("policy", "reference", "critic") if cfg.method == "ppo" else ("policy", "reference")
        with game.flops.forwards(stats, "logprobs", roles):
            grids = self._token_grids(samples)
        # Sequence-level k1, the same quantity evaluate() reports, whatever estimator the penalty uses.
        stats["policy/kl"] = sequence_logprob(grids.logps - grids.ref_logps, grids.mask, average=False).mean().item()
        advantages, returns = self.method.advantages(
            torch.tensor(scores),
            grids,
            ppo=ppo,
            kl_coef=self.kl_controller.value,
            group_ids=torch.tensor([x.prompt_index for x in rollouts]),
        )
        sampler_logps = game.sampler_grid(rollouts, grids.logps.shape[1])
        stats.update(game.sampler_mismatch(rollouts, grids.logps, grids.mask))
        # Measured with or without ppo.tis, so a run without it shows what the correction would do.
        weights, tis_stats = truncated_importance_weights(grids.logps, sampler_logps, grids.mask, ppo.tis_cap)
        stats.update(tis_stats)
        if ppo.tis:
            advantages = advantages * weights

        kl_loss_coef = self.kl_controller.value if self.method.kl_in_loss else 0.0
        steps = [
            self.actors.policy.ppo_step.remote(
                samples,
                grids.logps,
                advantages,
                grids.mask,
                ppo=ppo,
                seed=seed,
                ref_logps=grids.ref_logps if kl_loss_coef > 0 or ppo.kl_hard_limit else None,
                kl_loss_coef=kl_loss_coef,
            )
        ]
        if returns is not None:
            steps.append(self.actors.critic.value_step.remote(samples, grids.values, returns, grids.mask, seed=seed))
            stats["critic/values"] = masked_mean(grids.values, grids.mask).item()
            stats["critic/returns"] = masked_mean(returns, grids.mask).item()
        for step_stats in gather(steps):
            stats.update(step_stats)
        return stats

    def after_sync(self, stats: dict[str, float], n_samples: int) -> None:
        self.kl_controller.update(stats["policy/kl"], n_samples)

    def _token_grids(self, samples: list[TokenSample]) -> TokenGrids:
        """Policy and reference log-probs and critic values, from all three learners at once."""
        methods = {"logps": self.actors.policy.token_logprobs, "ref_logps": self.actors.reference.token_logprobs}
        if self.actors.critic is not None and "critic" in self.method.roles:
            methods["values"] = self.actors.critic.values
        results = self.game.learner_grids(methods, samples)
        masks = [mask for _, mask in results.values()]
        if any(not torch.equal(masks[0], mask) for mask in masks[1:]):
            raise RuntimeError(
                "policy, reference and critic lay the samples out differently; they must share the policy's tokenizer"
            )
        grids = {name: grid for name, (grid, _) in results.items()}
        return TokenGrids(logps=grids["logps"], ref_logps=grids["ref_logps"], mask=masks[0], values=grids.get("values"))

    def checkpoint_extra(self) -> dict[str, float]:
        # The KL coefficient adapts; a resumed run continues from the saved one.
        return {"kl_coef": self.kl_controller.value}

    def restore(self, saved: dict) -> None:
        self.kl_controller.value = saved.get("kl_coef", self.kl_controller.value)
