"""RewardLearner: the max player. Holds the RM, scores text, takes the APO step.

The math lives in apo_ray.losses; this actor only batches text, runs the model and steps the engine. With
several ranks each trains on its share of every minibatch's APO and human pairs, each term averaged over the
whole minibatch's pairs (actors/engine.py train_steps).
"""

from __future__ import annotations

import torch

from apo_ray.actors.engine import CountsFlops, LearnerCheckpoint, Rendezvous, TrainEngine, build_engine, train_steps
from apo_ray.batching import proportional_minibatches
from apo_ray.config import LearnerConfig, RewardConfig
from apo_ray.flops import FlopCounter
from apo_ray.game import PreferencePair
from apo_ray.losses import apo_reward_loss, minibatch_stats
from apo_ray.modeling import encode_for_reward, load_reward_model, load_tokenizer


class RewardLearner(LearnerCheckpoint, CountsFlops):
    def __init__(
        self,
        model_path: str,
        *,
        reward: RewardConfig,
        learner: LearnerConfig,
        dtype: str = "auto",
        seed: int = 0,
        trainable: bool = True,
        trust_remote_code: bool = False,
        rendezvous: Rendezvous | None = None,
    ):
        # The same seed on every rank: a freshly initialised score head is the same everywhere.
        torch.manual_seed(seed)
        self.reward_cfg, self.learner_cfg, self.rendezvous = reward, learner, rendezvous
        self.dtype, self.trust_remote_code = dtype, trust_remote_code
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.engine: TrainEngine | None = None
        self._frozen: torch.nn.Module | None = None  # freeze_for_evaluation's copy
        self._load(model_path, trainable)

    def _load(self, path: str, trainable: bool) -> None:
        model = load_reward_model(path, self.dtype, self.trust_remote_code)
        if not trainable:
            self.model = model.eval()
            self.flop_counter = FlopCounter(self.model)
            return
        self.engine = build_engine(
            model,
            self.learner_cfg,
            lr=self.reward_cfg.lr,
            role="reward",
            micro_batch_size=self.reward_cfg.batch_size,
            rendezvous=self.rendezvous,
        )
        self.model = self.engine.model
        self.flop_counter = self.engine.flops

    def _forward(self, prompts: list[str], responses: list[str], model: torch.nn.Module | None = None) -> torch.Tensor:
        model = self.model if model is None else model
        batch = encode_for_reward(self.tokenizer, prompts, responses, self.reward_cfg.max_length).to(model.device)
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1).float()

    @torch.no_grad()
    def score(
        self, prompts: list[str], responses: list[str], batch_size: int = 64, *, frozen: bool = False
    ) -> list[float]:
        """The RM's scores; with `frozen`, those of the weights `freeze_for_evaluation` kept."""
        model = self._frozen_model() if frozen else self.model
        model.eval()
        scores: list[float] = []
        for i in range(0, len(prompts), batch_size):
            scores.extend(self._forward(prompts[i : i + batch_size], responses[i : i + batch_size], model).tolist())
        return scores

    def score_pairs(self, pairs: list[PreferencePair], *, frozen: bool = False) -> tuple[list[float], list[float]]:
        prompts = [p.prompt for p in pairs]
        chosen = self.score(prompts, [p.chosen for p in pairs], frozen=frozen)
        rejected = self.score(prompts, [p.rejected for p in pairs], frozen=frozen)
        return chosen, rejected

    def freeze_for_evaluation(self) -> None:
        """Keep a copy of the current weights, for the driver's overlapped evaluation to score a round's
        samples with while the next round's RM step changes the live ones. Built from the config and the
        state dict rather than deep-copied: the live module carries the engine's hooks. Needs whole
        parameters, so not ZeRO-3 (the driver evaluates in place there)."""
        frozen = type(self.model)(self.model.config).to(dtype=self.model.dtype, device=self.model.device)
        frozen.load_state_dict(self.model.state_dict())
        self._frozen = frozen.eval().requires_grad_(False)

    def _frozen_model(self) -> torch.nn.Module:
        if self._frozen is None:
            raise RuntimeError("RewardLearner.score(frozen=True) before freeze_for_evaluation()")
        return self._frozen

    def apo_step(
        self,
        apo_pairs: list[PreferencePair],
        human_pairs: list[PreferencePair],
        *,
        apo_coef: float,
        pref_coef: float,
        epochs: int,
        seed: int,
    ) -> dict[str, float]:
        """Minimise apo_coef * pair_loss(gold > sample) + pref_coef * BT(chosen > rejected), each term averaged
        as reward.apo_normalization says (apo_reward_loss).

        Each minibatch mixes both sets in proportion, so both terms are seen at every step. With no APO
        pairs this is plain RM training on human pairs (the initial RM and the fixed-RM baseline).
        """
        assert self.engine is not None, "this RewardLearner was created with trainable=False"

        def loss_fn(
            share: tuple[list[int], list[int]], minibatch: tuple[list[int], list[int]]
        ) -> tuple[torch.Tensor, dict[str, float]]:
            apo = [apo_pairs[i] for i in share[0]]
            human = [human_pairs[i] for i in share[1]]
            n_apo, n_human = len(apo), len(human)
            # One forward over gold, sample, chosen and rejected texts, in that order.
            r = self._forward(
                [p.prompt for p in apo] * 2 + [p.prompt for p in human] * 2,
                [p.chosen for p in apo]
                + [p.rejected for p in apo]
                + [p.chosen for p in human]
                + [p.rejected for p in human],
            )
            # Averaged over the whole minibatch's pairs, so that the ranks' shares add up to its loss.
            return apo_reward_loss(
                r[:n_apo],
                r[n_apo : 2 * n_apo],
                r[2 * n_apo : 2 * n_apo + n_human],
                r[2 * n_apo + n_human :],
                apo_coef=apo_coef,
                pref_coef=pref_coef,
                kind=self.reward_cfg.loss,
                normalization=self.reward_cfg.apo_normalization,
                minibatch_pairs=(len(minibatch[0]), len(minibatch[1])),
            )

        plan = proportional_minibatches(len(apo_pairs), len(human_pairs), self.reward_cfg.batch_size, epochs, seed)
        return train_steps(self.engine, plan, loss_fn, role="rm", step_stats=minibatch_stats)

    def reinitialize(self, path: str) -> None:
        """The paper's non-`seq` setting: start this round's RM afresh from `path` (weights and optimizer)."""
        self._load(path, trainable=True)
