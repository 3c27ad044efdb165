"""CriticLearner: PPO's value model. A decoder sequence classifier (the RM's architecture) whose score head
is read at every token instead of only the last, so it starts either as a copy of the RM (its values are
then the RM's score of each prefix) or as the policy's backbone with a fresh head.

Values are laid out on the policy's token grid (`token_logprobs`): column t is the state that emits
token t + 1, i.e. the hidden state at position t. That needs the policy's tokens, hence its tokenizer.
"""

from __future__ import annotations

import torch

from apo_ray.actors.engine import CountsFlops, LearnerCheckpoint, Rendezvous, TrainEngine, build_engine, train_steps
from apo_ray.batching import fraction, shuffled_minibatches
from apo_ray.config import ConfigError, LearnerConfig, ModelConfig, PPOConfig
from apo_ray.game import TokenSample
from apo_ray.modeling import EncodedBatch, encode_samples, load_reward_model, load_tokenizer
from apo_ray.ppo import GridRows, ppo_value_loss


def check_same_vocabulary(policy_tokenizer, other_tokenizer, other_path: str) -> None:
    if policy_tokenizer.get_vocab() != other_tokenizer.get_vocab():
        raise ConfigError(
            f"ppo.critic_init: the model at {other_path} has another tokenizer than the policy; per-token "
            "values must be read on the policy's tokens. Use ppo.critic_init=policy, or an RM that shares "
            "the policy's tokenizer"
        )


class CriticLearner(LearnerCheckpoint, CountsFlops):
    def __init__(
        self,
        model_path: str,
        *,
        tokenizer_path: str,
        model: ModelConfig,
        ppo: PPOConfig,
        learner: LearnerConfig,
        seed: int = 0,
        rendezvous: Rendezvous | None = None,
    ):
        torch.manual_seed(seed)
        self.model_cfg, self.ppo_cfg, self.learner_cfg, self.rendezvous = model, ppo, learner, rendezvous
        self.tokenizer = load_tokenizer(tokenizer_path, model.trust_remote_code)
        self.engine: TrainEngine
        self._load(model_path)

    def _load(self, path: str) -> None:
        check_same_vocabulary(self.tokenizer, load_tokenizer(path, self.model_cfg.trust_remote_code), path)
        model = load_reward_model(
            path, self.model_cfg.dtype, self.model_cfg.trust_remote_code, disable_dropout=self.model_cfg.disable_dropout
        )
        if not isinstance(getattr(model, "score", None), torch.nn.Linear):
            raise ValueError(
                f"ppo.critic_init: {type(model).__name__} from {path} has no per-token `score` head; the critic "
                "needs a decoder sequence classifier (e.g. LlamaForSequenceClassification)"
            )
        self.engine = build_engine(
            model,
            self.learner_cfg,
            lr=self.ppo_cfg.critic_lr,
            role="critic",
            micro_batch_size=self.ppo_cfg.minibatch_size,
            rendezvous=self.rendezvous,
        )
        self.model = self.engine.model.eval()
        self.flop_counter = self.engine.flops

    def reinitialize(self, path: str) -> None:
        """Start afresh from `path` (weights and optimizer): the RM as fitted before the first iteration."""
        self._load(path)

    def _encode(self, samples: list[TokenSample]) -> EncodedBatch:
        return encode_samples(samples, self.tokenizer.pad_token_id).to(self.model.device)

    def _token_values(self, batch: EncodedBatch) -> torch.Tensor:
        hidden = self.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        return self.model.score(hidden).squeeze(-1).float()[:, :-1]

    @torch.no_grad()
    def values(self, samples: list[TokenSample]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token values and the response mask, both [B, T-1] like `token_logprobs`."""
        batch = self._encode(samples)
        return self._token_values(batch).cpu(), batch.response_mask[:, 1:].cpu()

    def value_step(
        self,
        samples: list[TokenSample],
        old_values: torch.Tensor,
        returns: torch.Tensor,
        mask: torch.Tensor,
        *,
        seed: int,
    ) -> dict[str, float]:
        """Clipped value regression towards `returns`, same epochs and minibatches as the policy's step."""
        ppo = self.ppo_cfg

        def loss_fn(idx: list[int], minibatch: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
            batch = self._encode([samples[i] for i in idx])
            values = self._token_values(batch)
            m = batch.response_mask[:, 1:]
            rows = GridRows(idx, values.shape[1], values.device)
            loss, clipfrac = ppo_value_loss(values, rows.of(old_values), rows.of(returns), m, ppo.value_clip_eps)
            # A mean over the minibatch's response tokens.
            part = fraction(mask[idx].sum().item(), mask[minibatch].sum().item())
            return loss * part, {"critic/loss": loss.item(), "critic/clipfrac": clipfrac}

        plan = shuffled_minibatches(len(samples), ppo.minibatch_size, ppo.ppo_epochs, seed)
        return train_steps(self.engine, plan, loss_fn, role="critic")
