"""Discriminator: AAPA's sequence classifier. A RewardLearner (the RM architecture: one logit per
(prompt, response)) fitted once on expert answers vs policy samples, then frozen; the game reads its logits.

The loss is apo_ray.aapa.discriminator_loss; this actor only batches text and steps the engine.
"""

from __future__ import annotations

from apo_ray.aapa import discriminator_loss
from apo_ray.actors.engine import train_steps
from apo_ray.actors.reward import RewardLearner
from apo_ray.batching import proportional_minibatches
from apo_ray.config import AAPAConfig, LearnerConfig, RewardConfig
from apo_ray.game import GoldAnswer


class Discriminator(RewardLearner):
    def __init__(
        self,
        model_path: str,
        *,
        aapa: AAPAConfig,
        learner: LearnerConfig,
        dtype: str = "auto",
        seed: int = 0,
        trust_remote_code: bool = False,
    ):
        # The RM's machinery (tokenisation, truncation, engine) with the discriminator's own optimiser settings.
        reward = RewardConfig(lr=aapa.lr, batch_size=aapa.batch_size, max_length=aapa.max_length)
        super().__init__(
            model_path, reward=reward, learner=learner, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code
        )
        self.frozen = False

    def fit(self, expert: list[GoldAnswer], policy: list[GoldAnswer], *, epochs: int, seed: int) -> dict[str, float]:
        """The one offline fit: expert answers (label 1) vs policy samples (label 0); frozen afterwards."""
        if self.frozen:
            raise RuntimeError("Discriminator.fit: the discriminator is frozen; AAPA fits it once, before the game")

        # One rank (its LearnerGroup is not distributed): a minibatch's share is all of it.
        def loss_fn(share: tuple[list[int], list[int]], minibatch: tuple[list[int], list[int]]):
            e, p = [expert[i] for i in share[0]], [policy[i] for i in share[1]]
            logits = self._forward([x.prompt for x in e + p], [x.response for x in e + p])
            return discriminator_loss(logits[: len(e)], logits[len(e) :])

        plan = proportional_minibatches(len(expert), len(policy), self.reward_cfg.batch_size, epochs, seed)
        stats = train_steps(self.engine, plan, loss_fn, role="aapa")
        self.freeze()
        return stats

    def freeze(self) -> None:
        self.frozen = True
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def load_frozen(self, path: str) -> None:
        """A resumed run's discriminator: the weights its first run fitted, frozen."""
        self._load(path, trainable=False)
        self.engine = None
        self.freeze()
