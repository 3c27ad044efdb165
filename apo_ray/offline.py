"""The offline min players of Algorithm 1 (RJS, RRHF, DPO) as the game loop's policy step: every round
trains on the RM-scored samples of all policy prompts D_Q (apo_ray/driver.py runs the loop)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from apo_ray.game import Rollout, best_and_worst, best_of_n
from apo_ray.learner_group import gather
from apo_ray.policy_step import PolicyStep

if TYPE_CHECKING:
    from apo_ray.driver import APOGame


class OfflinePolicyStep(PolicyStep):
    summary_keys = ("rm/acc", "rm/ece", "rm/acc_policy", "eval/gold_score", "eval/gold_score_se", "eval/rm_score",
                    "eval/kl", "rm/loss_apo", "rm/apo_share", "timing/round")

    def __init__(self, game: APOGame):
        self.game = game

    def prompts(self, r: int) -> list[str]:
        return self.game.data.prompts

    def update(self, r: int, rollouts: list[Rollout], scores: list[float], seed: int) -> dict[str, float]:
        """RJS (SFT on each prompt's best sample), RRHF (ranking) or DPO (best vs worst) on the policy's own
        token samples; `rollout/logprob_diff` is measured on the samples trained on, before the step."""
        game = self.game
        method, policy, epochs = game.cfg.method, game.actors.policy, game.cfg.policy.epochs_per_round
        if method == "rjs":
            best = best_of_n(rollouts, scores)
            mismatch = game.sampler_mismatch(best)
            return {**mismatch, **gather(policy.sft_step.remote([b.tokens for b in best], epochs=epochs, seed=seed))}
        if method == "rrhf":
            mismatch = game.sampler_mismatch(rollouts)
            return {**mismatch, **gather(policy.rrhf_step.remote(
                [x.tokens for x in rollouts], list(scores), [x.prompt_index for x in rollouts], epochs=epochs, seed=seed,
            ))}
        if method == "dpo":
            pairs = best_and_worst(rollouts, scores, min_margin=game.cfg.policy.dpo_min_margin)
            if not pairs:
                game.log("  dpo: every prompt's samples tied under the RM; policy unchanged this round")
                return {"policy/pairs": 0.0}
            mismatch = game.sampler_mismatch([x for p in pairs for x in (p.chosen, p.rejected)])
            chosen, rejected = [p.chosen.tokens for p in pairs], [p.rejected.tokens for p in pairs]
            stats: dict[str, float] = {}
            with game.flops.forwards(stats, "logprobs", ("reference",)):
                ref_chosen, ref_rejected = gather([
                    game.actors.reference.sequence_logprobs.remote(chosen),
                    game.actors.reference.sequence_logprobs.remote(rejected),
                ])
            stats.update(gather(policy.dpo_step.remote(chosen, rejected, ref_chosen, ref_rejected, epochs=epochs,
                                                       seed=seed)))
            return {**mismatch, **stats, "policy/pairs": float(len(pairs))}
        raise ValueError(f"method: {method!r} is not an offline method (rjs, rrhf, dpo)")
