"""AAPA in the game loop (apo_ray/aapa.py has the math): the discriminator's one offline fit in round 0, and
the anchoring reward added to every round's RM scores before the policy step, whatever the method.

Round 0, after the RM's fit: S samples per gold prompt from the SFT policy (the rollout workers' weights of
version 0), the discriminator fitted on the gold answers vs those samples for aapa.epochs, then frozen and
saved under checkpoints/discriminator (a resumed run reloads it; it is never fitted again). Rounds r >= 1: the
discriminator scores the round's policy samples, and the policy step receives
w_base(r) * RM score + aapa.coef * r_anchor in place of the RM score (apo_ray.aapa). The APO RM step, when
apo=true, is untouched: AAPA changes the min player's reward only.

Logged per round: aapa/disc_score (mean D(x, y) of the round's policy samples, before their step) with
aapa/disc_score_se, aapa/anchor_reward, aapa/base_weight; round 0 logs the fit (aapa/disc_loss, aapa/disc_acc,
on its own minibatches) and the frozen discriminator on the gold prompts the fit left out (aapa.held_out_fraction):
aapa/disc_acc_heldout, how often it ranks a prompt's expert answer above a policy sample for it, +- _se.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from apo_ray.aapa import (
    anchor_reward,
    anchored_rewards,
    base_weight,
    expert_probability,
    held_out_accuracy,
    held_out_split,
)
from apo_ray.evaluation import mean_and_stderr
from apo_ray.game import GoldAnswer, Rollout
from apo_ray.learner_group import gather
from apo_ray.seeds import SeedStream, round_seed

if TYPE_CHECKING:
    from apo_ray.driver import APOGame


class Anchoring:
    def __init__(self, game: APOGame):
        if game.actors.discriminator is None:
            raise ValueError(
                "aapa.enabled: the game has no discriminator actor (apo_ray.cluster.start_actors starts one)"
            )
        self.game, self.cfg = game, game.cfg.aapa
        self.discriminator = game.actors.discriminator

    @property
    def saved_dir(self) -> str:
        return str(self.game.checkpointer.root / "discriminator")

    def fit(self) -> dict[str, float]:
        """Round 0: fit the discriminator on the gold answers vs the SFT policy's samples, freeze and save it;
        then measure it on the gold prompts left out of the fit (aapa.held_out_fraction)."""
        game, seed = self.game, round_seed(self.game.cfg.seed, 0, SeedStream.DISCRIMINATOR)
        game._phase("aapa_fit", 0)
        started = time.perf_counter()
        gold = game.data.gold
        rollouts = game.actors.pool.generate([g.prompt for g in gold], game.cfg.samples_per_prompt, seed=seed)
        generate_s = time.perf_counter() - started
        fitted, held_out = held_out_split(len(gold), self.cfg.held_out_fraction, seed)
        kept = set(fitted)
        samples = [GoldAnswer(x.prompt, x.response) for x in rollouts if x.prompt_index in kept]
        stats = gather(
            self.discriminator.fit.remote([gold[i] for i in fitted], samples, epochs=self.cfg.epochs, seed=seed)
        )
        gather(self.discriminator.save.remote(self.saved_dir))
        if held_out:
            stats.update(self._held_out_check(held_out, [x for x in rollouts if x.prompt_index not in kept]))
        return {**stats, "timing/aapa_generate": generate_s}

    def _held_out_check(self, prompts: list[int], rollouts: list[Rollout]) -> dict[str, float]:
        gold = self.game.data.gold
        expert, sampled = gather(
            [
                self.discriminator.score.remote([gold[i].prompt for i in prompts], [gold[i].response for i in prompts]),
                self.discriminator.score.remote([x.prompt for x in rollouts], [x.response for x in rollouts]),
            ]
        )
        accuracy, stderr = held_out_accuracy(dict(zip(prompts, expert)), sampled, [x.prompt_index for x in rollouts])
        return {
            "aapa/disc_acc_heldout": accuracy,
            "aapa/disc_acc_heldout_se": stderr,
            "aapa/disc_heldout_pairs": float(len(rollouts)),
        }

    def restore(self) -> None:
        """A resumed run: the discriminator its first run fitted and saved."""
        gather(self.discriminator.load_frozen.remote(self.saved_dir))

    def anchored_scores(
        self, r: int, rollouts: list[Rollout], scores: list[float], stats: dict[str, float]
    ) -> list[float]:
        """Round r's policy-step rewards: the RM scores with the anchoring reward added; its stats into `stats`."""
        logits = gather(self.discriminator.score.remote([x.prompt for x in rollouts], [x.response for x in rollouts]))
        anchor = anchor_reward(logits, self.cfg.reward)
        base = base_weight(r, self.cfg.anchor_only_rounds)
        stats["aapa/disc_score"], stats["aapa/disc_score_se"] = mean_and_stderr(expert_probability(logits))
        stats["aapa/anchor_reward"] = float(np.mean(anchor))
        stats["aapa/base_weight"] = base
        return anchored_rewards(scores, anchor, base=base, coef=self.cfg.coef)
