"""The offline min players of Algorithm 1 (RJS, RRHF, DPO, IPO: apo_ray/methods/) as the game loop's policy step:
every round trains on the RM-scored samples of all policy prompts D_Q (apo_ray/driver.py runs the loop)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from apo_ray.game import Rollout
from apo_ray.learner_group import gather
from apo_ray.methods import get_method
from apo_ray.metric_catalog import round_line
from apo_ray.policy_step import PolicyStep

if TYPE_CHECKING:
    from apo_ray.driver import APOGame


class OfflinePolicyStep(PolicyStep):
    summary_keys = round_line("offline")

    def __init__(self, game: APOGame):
        self.game = game
        self.method = get_method(game.cfg.method)
        if self.method.family != "offline":
            raise ValueError(f"method: {self.method.name!r} is not an offline method")

    def prompts(self, r: int) -> list[str]:
        return self.game.data.prompts

    def update(self, r: int, rollouts: list[Rollout], scores: list[float], seed: int) -> dict[str, float]:
        """The method's step on the examples its selection takes from the policy's own token samples;
        `rollout/logprob_diff` is measured on the samples trained on, before the step."""
        game, method = self.game, self.method
        policy, cfg = game.actors.policy, game.cfg
        selected = method.select(rollouts, scores, cfg)
        step = {
            "method": method.name,
            "settings": method.settings(cfg),
            "epochs": cfg.policy.epochs_per_round,
            "seed": seed,
        }
        if method.batch == "samples":
            mismatch = game.sampler_mismatch(selected)
            return {**mismatch, **gather(policy.sample_step.remote([x.tokens for x in selected], **step))}
        if method.batch == "groups":
            samples = [x for x, _ in selected]
            mismatch = game.sampler_mismatch(samples)
            return {
                **mismatch,
                **gather(
                    policy.group_step.remote(
                        [x.tokens for x in samples],
                        [score for _, score in selected],
                        [x.prompt_index for x in samples],
                        **step,
                    )
                ),
            }
        if not selected:
            game.log(f"  {method.name}: every prompt's samples tied under the RM; policy unchanged this round")
            return {"policy/pairs": 0.0}
        mismatch = game.sampler_mismatch([x for p in selected for x in (p.chosen, p.rejected)])
        chosen, rejected = [p.chosen.tokens for p in selected], [p.rejected.tokens for p in selected]
        stats: dict[str, float] = {}
        with game.flops.forwards(stats, "logprobs", ("reference",)):
            ref_chosen, ref_rejected = gather(
                [
                    game.actors.reference.sequence_logprobs.remote(chosen),
                    game.actors.reference.sequence_logprobs.remote(rejected),
                ]
            )
        stats.update(gather(policy.pair_step.remote(chosen, rejected, ref_chosen, ref_rejected, **step)))
        return {**mismatch, **stats, "policy/pairs": float(len(selected))}
