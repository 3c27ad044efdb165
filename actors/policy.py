"""PolicyLearner: the min player. It holds the policy, its engine and its log-probs of token samples, and
takes the offline policy steps, one per kind of batch (samples, groups, pairs; apo_ray/methods/), with the loss
of the method named in the call, and the online PPO step; the losses are in apo_ray/methods/, apo_ray.losses and
apo_ray.ppo, the minibatch plans in apo_ray.batching. Every step trains on token samples exactly as the
rollout workers drew them.

With several ranks (a LearnerGroup) every rank gets the same call and trains on its share of each minibatch
(actors/engine.py train_steps); each loss is scaled by the share's fraction of what it averages over
(response tokens, groups, pairs), so the step is the one a single rank takes on the whole batch.
It is a plain class: usable in-process, without Ray (the `nccl` sync alone needs it). Its weight-sync methods are
shells around the backends' learner sides (apo_ray/sync_backends/)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from apo_ray.actors.engine import CountsFlops, LearnerCheckpoint, Rendezvous, build_engine, train_steps
from apo_ray.batching import fraction, grouped_minibatch_groups, shuffled_minibatches
from apo_ray.chat import AUTO, resolve_template
from apo_ray.config import LearnerConfig, ModelConfig, PolicyConfig, PPOConfig
from apo_ray.fingerprint import Fingerprint, fingerprint
from apo_ray.game import TokenSample
from apo_ray.lora import adapter_config, is_adapted
from apo_ray.losses import masked_mean, sequence_logprob
from apo_ray.methods import get_method
from apo_ray.modeling import SampleLogprobs, load_causal_lm, load_tokenizer, predicted_response_tokens, text_samples
from apo_ray.ppo import GridRows, entropy_from_logits, kl_limited_loss, kl_penalty, ppo_policy_loss
from apo_ray.sync_backends import get_backend


class PolicyLearner(LearnerCheckpoint, CountsFlops):
    def __init__(
        self,
        model_path: str,
        *,
        model: ModelConfig,
        policy: PolicyConfig,
        learner: LearnerConfig,
        seed: int = 0,
        micro_batch_size: int | None = None,
        rendezvous: Rendezvous | None = None,
        chat_template: str = AUTO,
        engine_role: str = "policy",
    ):
        """micro_batch_size: rows per step; policy.batch_size unless given (online runs pass
        ppo.minibatch_size, their minibatch). rendezvous: this rank of a multi-rank learner (None: one rank).
        chat_template: "auto", "none" or a template's text (apo_ray.chat): written texts are encoded as the
        rollout workers encode prompts, and the checkpoints' tokenizer keeps the template. engine_role: "policy",
        or "attacker" for APL's attacker, which never takes learner.lora's adapter."""
        torch.manual_seed(seed)
        self.policy_cfg = policy
        self.model_cfg = model
        self.tokenizer = load_tokenizer(model_path, model.trust_remote_code)
        self.chat_template = resolve_template(chat_template, self.tokenizer)
        if self.chat_template is not None:
            # Saved with every checkpoint: the trained policy is served and reloaded with the template it learned.
            self.tokenizer.chat_template = self.chat_template
        lm = load_causal_lm(model_path, model.dtype, model.trust_remote_code, model.disable_dropout).eval()
        self.engine = build_engine(
            lm,
            learner,
            lr=policy.lr,
            micro_batch_size=micro_batch_size or policy.batch_size,
            rendezvous=rendezvous,
            role=engine_role,
        )
        self.model = self.engine.model
        self.flop_counter = self.engine.flops
        self.logprobs = SampleLogprobs(self.model, self.tokenizer.pad_token_id)
        # LoRA's reference: the frozen base weights are the initial policy's, read with the adapter off.
        self.base_logprobs = (
            SampleLogprobs(self.model, self.tokenizer.pad_token_id, self.model.disable_adapter)
            if is_adapted(self.model)
            else None
        )
        # Each weight-sync backend's state kept between syncs (the nccl sender's NCCL group).
        self.sync_state: dict[str, object] = {}
        self._verify_send = False
        self._sent: tuple[dict[str, torch.Tensor] | None] | None = None

    def token_logprobs(self, samples: list[TokenSample]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logprobs.tokens(samples)

    def sequence_logprobs(self, samples: list[TokenSample]) -> list[float]:
        return self.logprobs.sequences(samples)

    def reference_token_logprobs(self, samples: list[TokenSample]) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's `token_logprobs` (ReferenceModel's) from a LoRA policy's base weights."""
        return self._base().tokens(samples)

    def reference_sequence_logprobs(self, samples: list[TokenSample]) -> list[float]:
        """The reference's `sequence_logprobs` (ReferenceModel's) from a LoRA policy's base weights."""
        return self._base().sequences(samples)

    def _base(self) -> SampleLogprobs:
        if self.base_logprobs is None:
            raise RuntimeError(
                "reference log-probs from the policy need learner.lora on the policy; without it the "
                "reference is a ReferenceModel actor"
            )
        return self.base_logprobs

    def encode_texts(self, prompts: list[str], responses: list[str]) -> list[TokenSample]:
        """Written (prompt, response) texts as this policy's token samples (apo_ray.modeling.text_samples)."""
        return text_samples(
            self.tokenizer,
            prompts,
            responses,
            self.model_cfg.max_prompt_tokens,
            self.model_cfg.max_response_tokens,
            chat_template=self.chat_template,
        )

    def _offline_step(self, groups: list[list[int]], epochs: int, seed: int, loss_fn) -> dict[str, float]:
        """`loss_fn(items, groups_of_share, groups_of_minibatch)`: ranks share minibatches in whole groups."""
        plan = grouped_minibatch_groups(groups, self.policy_cfg.batch_size, epochs, seed)

        def share_loss(share: list[list[int]], minibatch: list[list[int]]):
            return loss_fn([i for group in share for i in group], share, minibatch)

        return train_steps(self.engine, plan, share_loss, role="policy")

    def sample_step(
        self, samples: list[TokenSample], *, method: str, settings: dict, epochs: int, seed: int
    ) -> dict[str, float]:
        """A "samples" method's step (RJS's SFT on the best-of-S): its loss on each selected sample's tokens."""
        loss_of, tokens = get_method(method).loss, [predicted_response_tokens(sample) for sample in samples]

        def loss_fn(idx: list[int], share: list[list[int]], minibatch: list[list[int]]):
            logps, mask = self.logprobs.with_grad([samples[i] for i in idx])
            loss, stats = loss_of(logps, mask, **settings)
            # A mean over the minibatch's response tokens.
            return loss * fraction(sum(tokens[i] for i in idx), sum(tokens[i] for g in minibatch for i in g)), stats

        return self._offline_step([[i] for i in range(len(samples))], epochs, seed, loss_fn)

    def sft_step(self, samples: list[TokenSample], *, epochs: int, seed: int) -> dict[str, float]:
        """Supervised fine-tuning on `samples`: RJS's step."""
        return self.sample_step(samples, method="rjs", settings={}, epochs=epochs, seed=seed)

    def group_step(
        self,
        samples: list[TokenSample],
        rewards: list[float],
        group_ids: list[int],
        *,
        method: str,
        settings: dict,
        epochs: int,
        seed: int,
    ) -> dict[str, float]:
        """A "groups" method's step (RRHF): its loss on scored samples, a prompt's samples kept in one share."""
        loss_of, groups = get_method(method).loss, {}
        for i, g in enumerate(group_ids):
            groups.setdefault(g, []).append(i)

        def loss_fn(idx: list[int], share: list[list[int]], minibatch: list[list[int]]):
            logps, mask = self.logprobs.with_grad([samples[i] for i in idx])
            loss, stats = loss_of(
                logps,
                mask,
                torch.tensor([rewards[i] for i in idx]),
                torch.tensor([group_ids[i] for i in idx]),
                **settings,
            )
            # A mean over the prompts' groups.
            return loss * fraction(len(share), len(minibatch)), stats

        return self._offline_step(list(groups.values()), epochs, seed, loss_fn)

    def pair_step(
        self,
        chosen: list[TokenSample],
        rejected: list[TokenSample],
        ref_chosen: list[float],
        ref_rejected: list[float],
        *,
        method: str,
        settings: dict,
        epochs: int,
        seed: int,
    ) -> dict[str, float]:
        """A "pairs" method's step (DPO, IPO): its loss on the pairs' sequence log-probs and the reference's."""
        loss_of = get_method(method).loss

        def loss_fn(idx: list[int], share: list[list[int]], minibatch: list[list[int]]):
            logps, mask = self.logprobs.with_grad([chosen[i] for i in idx] + [rejected[i] for i in idx])
            seq = sequence_logprob(logps, mask, average=False)
            n = len(idx)
            loss, stats = loss_of(
                seq[:n],
                seq[n:],
                torch.tensor([ref_chosen[i] for i in idx]),
                torch.tensor([ref_rejected[i] for i in idx]),
                **settings,
            )
            # A mean over pairs.
            return loss * fraction(len(share), len(minibatch)), stats

        return self._offline_step([[i] for i in range(len(chosen))], epochs, seed, loss_fn)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights from rank 0; None from the other ranks."""
        return self.engine.rank0_state_dict()

    # ------------------------------------------------------------------ weight sync (apo_ray/sync_backends/)
    # Shells: each runs backend `backend`'s learner side, `send(self, *args)`; which one a backend's send runs in is
    # its declaration's (SyncBackend.learner_method). `verify`: the driver asks for `weights_fingerprint` next.

    def send_weights(self, backend: str, verify: bool, *args):
        """On every rank of a group (ZeRO-3's gather of the weights needs them all)."""
        self._start_send(verify)
        return get_backend(backend).send(self, *args)

    def stream_weights(self, backend: str, verify: bool, *args) -> Iterator:
        """On every rank, a generator: as a Ray actor method each item it yields becomes an object of its own."""
        self._start_send(verify)
        yield from get_backend(backend).send(self, *args)

    def send_weights_rank0(self, backend: str, verify: bool, *args):
        """On rank 0 of a group alone (apo_ray.cluster's rank-zero methods): below ZeRO-3 it holds every weight."""
        return self.send_weights(backend, verify, *args)

    def _start_send(self, verify: bool) -> None:
        # A send that is not checked drops what an earlier one kept (a sync that failed before its check).
        self._verify_send, self._sent = verify, None

    def exported_weights(self) -> dict[str, torch.Tensor] | None:
        """What a backend's send sends: rank 0's copy of the whole model (None on the other ranks, which join
        ZeRO-3's gather). A checked send keeps it (no copy) until `weights_fingerprint` reads it, so that a sync
        gathers and copies the weights once, and the fingerprint is still taken while the workers load."""
        state = self.engine.rank0_state_dict()
        if self._verify_send:
            # Every rank keeps its own (None beside rank 0), so that no rank joins another gather for the fingerprint.
            self._sent = (state,)
        return state

    def exported_adapter(self) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """What an adapter-only send sends (learner.lora.sync 'adapter'): the adapter's PEFT config and its tensors
        in PEFT's names, on rank 0 (None on the other ranks, which join ZeRO-3's gather)."""
        if not is_adapted(self.model):
            raise RuntimeError("learner.lora.sync: an adapter-only sync needs learner.lora on the policy")
        state = self.engine.rank0_state_dict(adapter=True)
        return None if state is None else (adapter_config(self.model), state)

    def probe_logprobs(self, sample: TokenSample) -> tuple[list[float], list[float]]:
        """The log-probs of `sample`'s response tokens with the adapter on and off (the base model's): what the
        check after an adapter sync compares each worker's with (apo_ray.lora.probe_mismatch)."""
        on, mask = self.token_logprobs([sample])
        off, _ = self.reference_token_logprobs([sample])
        picked = mask[0].bool()
        return on[0][picked].tolist(), off[0][picked].tolist()

    def weights_fingerprint(self, dtype: str) -> Fingerprint | None:
        """The reference a sync's workers are checked against (apo_ray/fingerprint.py): the weights the workers
        were sent, as engines of precision `dtype` hold them; None from ranks other than 0. Those the last send
        exported, or, after a backend that sends the parameters themselves (nccl), the weights as they are."""
        sent, self._sent = self._sent, None
        state = sent[0] if sent is not None else self.engine.rank0_state_dict()
        return None if state is None else fingerprint(state.items(), getattr(torch, dtype))

    # ------------------------------------------------------------------ online (apo_ray.online)

    def ppo_step(
        self,
        samples: list[TokenSample],
        old_logps: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        *,
        ppo: PPOConfig,
        seed: int,
        ref_logps: torch.Tensor | None = None,
        kl_loss_coef: float = 0.0,
    ) -> dict[str, float]:
        """PPO's clipped update: ppo.ppo_epochs passes of shuffled minibatches of ppo.minibatch_size rollouts.

        old_logps, advantages, mask are [N, W] grids as `token_logprobs(samples)` lays them out.
        With `ref_logps` and kl_loss_coef > 0 the KL to the reference is a loss term (GRPO's way) rather
        than a penalty inside the rewards. Entropy is measured, not optimised.
        """
        if (kl_loss_coef > 0 or ppo.kl_hard_limit) and ref_logps is None:
            raise ValueError("ppo_step: kl_loss_coef > 0 and ppo.kl_hard_limit need ref_logps")
        device = self.model.device

        def loss_fn(idx: list[int], minibatch: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
            forward = self.logprobs.forward([samples[i] for i in idx])
            logps, m = forward.logps, forward.mask
            rows = GridRows(idx, logps.shape[1], device)
            if not torch.equal(m, rows.of(mask)):
                raise RuntimeError("ppo_step: the samples' response positions differ from the rollout grid's")
            loss, clipfrac, approx_kl = ppo_policy_loss(logps, rows.of(old_logps), rows.of(advantages), m, ppo.clip_eps)
            stats = {"policy/loss": loss.item(), "policy/clipfrac": clipfrac, "policy/approx_kl": approx_kl}
            if kl_loss_coef > 0:
                kl = masked_mean(kl_penalty(logps, rows.of(ref_logps), ppo.kl_estimator), m)
                loss = loss + kl_loss_coef * kl
                stats["policy/kl_loss"] = kl.item()
            if ppo.kl_hard_limit:
                # Measured on the policy as it is before this minibatch's step: the KL the update has reached.
                loss, stats["policy/kl_during_update"], limited = kl_limited_loss(
                    loss, logps, rows.of(old_logps), rows.of(ref_logps), m, ppo.kl_hard_limit_at * ppo.kl_target
                )
                stats["policy/kl_limited_fraction"] = float(limited)
            with torch.no_grad():
                stats["policy/entropy"] = entropy_from_logits(forward.logits[:, :-1], forward.logits_mask).item()
            # Every term is a mean over the minibatch's response tokens.
            return loss * fraction(mask[idx].sum().item(), mask[minibatch].sum().item()), stats

        plan = shuffled_minibatches(len(samples), ppo.minibatch_size, ppo.ppo_epochs, seed)
        return train_steps(self.engine, plan, loss_fn, role="policy")
