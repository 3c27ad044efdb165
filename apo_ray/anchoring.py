"""AAPA in the game loop (apo_ray/aapa.py has the math): the discriminator's one offline fit in round 0, and
the anchoring reward added to every round's RM scores before the policy step, whatever the method.

Round 0, after the RM's fit: S samples per gold prompt from the SFT policy (the rollout workers' weights of
version 0), the discriminator fitted on the gold answers vs those samples for aapa.epochs, then frozen and
saved under checkpoints/discriminator (a resumed run reloads it; it is never fitted again). Rounds r >= 1: the
discriminator scores the round's policy samples, and the policy step receives
w_base(r) * RM score + aapa.coef * r_anchor in place of the RM score (apo_ray.aapa). The APO RM step, when
apo=true, is untouched: AAPA changes the min player's reward only.

Logged per round: aapa/disc_score (mean D(x, y) of the round's policy samples, before their step) with
aapa/disc_score_se, aapa/anchor_reward, aapa/base_weight; round 0 logs the fit (aapa/disc_loss, aapa/disc_acc).
"""

from __future__ import annotations

import time

from typing import TYPE_CHECKING

import numpy as np

from apo_ray.aapa import anchor_reward, anchored_rewards, base_weight, expert_probability
from apo_ray.evaluation import mean_and_stderr
from apo_ray.game import GoldAnswer, Rollout
from apo_ray.learner_group import gather
from apo_ray.seeds import SeedStream, round_seed

if TYPE_CHECKING:
    from apo_ray.driver import APOGame


class Anchoring:
    def __init__(self, game: APOGame):
        if game.actors.discriminator is None:
            raise ValueError("aapa.enabled: the game has no discriminator actor (apo_ray.cluster.start_actors starts one)")
        self.game, self.cfg = game, game.cfg.aapa
        self.discriminator = game.actors.discriminator

    @property
    def saved_dir(self) -> str:
        return str(self.game.checkpointer.root / "discriminator")

    def fit(self) -> dict[str, float]:
        """Round 0: fit the discriminator on the gold answers vs the SFT policy's samples, freeze and save it."""
        game, seed = self.game, round_seed(self.game.cfg.seed, 0, SeedStream.DISCRIMINATOR)
        game._phase("aapa_fit", 0)
        started = time.perf_counter()
        rollouts = game.actors.pool.generate([g.prompt for g in game.data.gold], game.cfg.samples_per_prompt, seed=seed)
        generate_s = time.perf_counter() - started
        samples = [GoldAnswer(x.prompt, x.response) for x in rollouts]
        stats = gather(self.discriminator.fit.remote(list(game.data.gold), samples, epochs=self.cfg.epochs, seed=seed))
        gather(self.discriminator.save.remote(self.saved_dir))
        return {**stats, "timing/aapa_generate": generate_s}

    def restore(self) -> None:
        """A resumed run: the discriminator its first run fitted and saved."""
        gather(self.discriminator.load_frozen.remote(self.saved_dir))

    def anchored_scores(self, r: int, rollouts: list[Rollout], scores: list[float],
                        stats: dict[str, float]) -> list[float]:
        """Round r's policy-step rewards: the RM scores with the anchoring reward added; its stats into `stats`."""
        logits = gather(self.discriminator.score.remote([x.prompt for x in rollouts], [x.response for x in rollouts]))
        anchor = anchor_reward(logits, self.cfg.reward)
        base = base_weight(r, self.cfg.anchor_only_rounds)
        stats["aapa/disc_score"], stats["aapa/disc_score_se"] = mean_and_stderr(expert_probability(logits))
        stats["aapa/anchor_reward"] = float(np.mean(anchor))
        stats["aapa/base_weight"] = base
        return anchored_rewards(scores, anchor, base=base, coef=self.cfg.coef)
