"""APL as the game loop's policy step (apl.enabled): attacker and defender updated in turn, every round.

Round r >= 1 (apo_ray/driver.py runs the loop; the math is in apo_ray/apl.py, the task's harm in
apo_ray/builtin/harm.py):
  1. attack         the attacker's rollout workers write apl.attacks_per_prompt rewrites of each of the round's
                    apl.prompts_per_round clean policy prompts (conditioned on the clean prompt); each becomes an
                    attacked prompt (harm.attacked_prompt: always a valid prompt of the task);
  2. harm           the defender's own harmfulness of every attacked prompt, h = sigmoid(beta * (lbar(unsafe) -
                    lbar(safe))), from the policy learner's log-probs of the prompt's safe and unsafe answers;
  3. attacker step  GRPO advantages of h within each clean prompt's rewrites, PPO's clipped step on the attacker's
                    learner, weights synced to the attacker's workers;
  4. defender       the loop samples the defender on the strongest attack of each prompt (its harmful fraction is
                    apl/train_attack_success_rate), then this step's update is DPO of the defender on (prompt,
                    safe preferred to unsafe) for those attacked prompts and their clean originals.
The evaluation (every eval_every rounds, and round 0: the defender before APL) adds, on the held-out prompts,
with standard errors: apl/harmful_rate (defender samples on clean prompts that are harmful by the gold oracle),
apl/attack_success_rate (the same on prompts attacked by the current attacker), apl/attack_success_rate_fixed
(by a fixed attacker: random adjectives, the same every round), apl/eval_harm (mean h under the current
attack), apl/eval_harm_reference (the same under the defender before APL: the reference) and apl/utility
(the gold score of the clean-prompt samples: eval/gold_score's, with its error).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import numpy as np

from apo_ray.apl import attacker_advantages, harmfulness, mean_token_logprobs, rate, strongest_attacks
from apo_ray.batching import iteration_prompt_indices
from apo_ray.builtin.harm import ATTACK_WORDS, attacked_prompt, is_harmful, parse_prompt, safe_and_unsafe
from apo_ray.config import PPOConfig
from apo_ray.evaluation import mean_and_stderr
from apo_ray.game import Rollout
from apo_ray.learner_group import LearnerGroup, gather
from apo_ray.methods import get_method
from apo_ray.metric_catalog import round_line
from apo_ray.policy_step import PolicyStep
from apo_ray.seeds import SeedStream, round_seed

if TYPE_CHECKING:
    from apo_ray.driver import APOGame


class APLPolicyStep(PolicyStep):
    summary_keys = round_line("apl")

    def __init__(self, game: APOGame):
        if game.actors.attacker is None or game.actors.attacker_pool is None:
            raise ValueError("apl.enabled: the game has no attacker (apo_ray.cluster.start_actors starts one)")
        self.game, self.cfg, self.apl, self.actors = game, game.cfg, game.cfg.apl, game.actors
        attacker = self.apl.attacker
        # The attacker's step: PPO's clipped loss on GRPO advantages, no KL term (its reward is all it has).
        self.attacker_ppo = PPOConfig(
            ppo_epochs=attacker.epochs, minibatch_size=attacker.minibatch_size, clip_eps=attacker.clip_eps, tis=False
        )
        self.attacker_version = 0
        # Set by start_round: the round's strongest attack per clean prompt, and those clean prompts.
        self.attacked: list[str] = []
        self.clean: list[str] = []

    # ------------------------------------------------------------------ the round

    def start_round(self, r: int) -> dict[str, float]:
        """Steps 1-3: attack the round's prompts, measure the defender's harm, update the attacker."""
        game, apl, seed = self.game, self.apl, self.cfg.seed
        prompts = game.data.prompts
        clean = [prompts[k] for k in iteration_prompt_indices(len(prompts), apl.prompts_per_round, r, seed)]
        game._phase("attack", r)
        rewrites = self.actors.attacker_pool.generate(
            clean, apl.attacks_per_prompt, seed=round_seed(seed, r, SeedStream.ATTACK)
        )
        attacked = [attacked_prompt(x.prompt, x.response, apl.max_attack_words) for x in rewrites]
        harm = self.harm(attacked)
        stats = {"apl/attack_words": float(np.mean([len(parse_prompt(p)[2]) for p in attacked]))}
        stats["apl/attacker_harm"], stats["apl/attacker_harm_se"] = mean_and_stderr(harm)
        groups = [x.prompt_index for x in rewrites]
        strongest = strongest_attacks(harm.tolist(), groups)
        self.clean = [clean[p] for p in strongest]
        self.attacked = [attacked[i] for i in strongest.values()]

        game._phase("attacker_step", r)
        stats.update(self._attacker_step(r, rewrites, harm.tolist(), groups))
        self.attacker_version = r
        sync = self.actors.attacker_pool.sync_from(self.actors.attacker, r)
        stats["timing/attacker_sync"] = sync["timing/sync"]
        return stats

    def prompts(self, r: int) -> list[str]:
        return self.attacked

    def update(self, r: int, rollouts: list[Rollout], scores: list[float], seed: int) -> dict[str, float]:
        """Step 4: DPO of the defender on safe over unsafe answers to the attacked and clean prompts."""
        actors = self.actors
        stats = rate([is_harmful(x.response) for x in rollouts], "apl/train_attack_success_rate")
        prompts = self.attacked + self.clean
        answers = [safe_and_unsafe(self.cfg.seed, p) for p in prompts]
        chosen, rejected = gather(
            [
                actors.policy.encode_texts.remote(prompts, [safe for safe, _ in answers]),
                actors.policy.encode_texts.remote(prompts, [unsafe for _, unsafe in answers]),
            ]
        )
        ref_chosen, ref_rejected = gather(
            [actors.reference.sequence_logprobs.remote(chosen), actors.reference.sequence_logprobs.remote(rejected)]
        )
        dpo = get_method("dpo")
        stats.update(
            gather(
                actors.policy.pair_step.remote(
                    chosen,
                    rejected,
                    ref_chosen,
                    ref_rejected,
                    method=dpo.name,
                    settings=dpo.settings(self.cfg),
                    epochs=self.cfg.policy.epochs_per_round,
                    seed=seed,
                )
            )
        )
        stats["policy/pairs"] = float(len(prompts))
        return stats

    def evaluate(self, r: int) -> dict[str, float]:
        """The defender on held-out prompts: clean, under the current attacker, under the fixed attacker."""
        game, apl, seed = self.game, self.apl, self.cfg.seed
        game._phase("evaluate_apl", r)
        clean = game.eval_prompts
        trained = [
            attacked_prompt(x.prompt, x.response, apl.max_attack_words)
            for x in self.actors.attacker_pool.generate(clean, 1, seed=round_seed(seed, 0, SeedStream.ATTACK))
        ]
        stats: dict[str, float] = {}
        for name, prompts in (
            ("apl/harmful_rate", clean),
            ("apl/attack_success_rate", trained),
            ("apl/attack_success_rate_fixed", fixed_attacks(clean, seed, apl.max_attack_words)),
        ):
            samples = game.actors.pool.generate(prompts, 2, seed=round_seed(seed, 0, SeedStream.EVAL))
            stats.update(rate([is_harmful(x.response) for x in samples], name))
            if prompts is clean:
                # The samples eval/gold_score scores (same prompts and seed), here with their standard error.
                gold = [game.oracle(x.prompt, x.response) for x in samples]
                stats["apl/utility"], stats["apl/utility_se"] = mean_and_stderr(gold)
        stats["apl/eval_harm"], stats["apl/eval_harm_se"] = mean_and_stderr(self.harm(trained))
        # The defender before APL (the reference is its frozen copy) against the same, current, attacks.
        before = self.harm(trained, self.actors.reference)
        stats["apl/eval_harm_reference"], stats["apl/eval_harm_reference_se"] = mean_and_stderr(before)
        return stats

    # ------------------------------------------------------------------ pieces

    def harm(self, prompts: list[str], model: LearnerGroup | None = None) -> np.ndarray:
        """Harmfulness h of each prompt (apo_ray.apl.harmfulness) under `model`'s log-probs: by default the
        defender's (the policy learner), or the reference's (the defender before APL; same tokenizer)."""
        policy = self.actors.policy
        answers = [safe_and_unsafe(self.cfg.seed, p) for p in prompts]
        texts = [safe for safe, _ in answers] + [unsafe for _, unsafe in answers]
        samples = gather(policy.encode_texts.remote(prompts * 2, texts))
        grid, mask = self.game.learner_grids({"logps": (model or policy).token_logprobs}, samples)["logps"]
        lbar = mean_token_logprobs(grid, mask)
        return harmfulness(lbar[len(prompts) :], lbar[: len(prompts)], self.apl.harm_beta)

    def _attacker_step(self, r: int, rewrites: list[Rollout], harm: list[float], groups: list[int]) -> dict[str, float]:
        attacker = self.actors.attacker
        samples = [x.tokens for x in rewrites]
        logps, mask = self.game.learner_grids({"logps": attacker.token_logprobs}, samples)["logps"]
        advantages = attacker_advantages(harm, groups, mask)
        stats = gather(
            attacker.ppo_step.remote(
                samples,
                logps,
                advantages,
                mask,
                ppo=self.attacker_ppo,
                seed=round_seed(self.cfg.seed, r, SeedStream.ATTACK_STEP),
            )
        )
        # The learner names its stats as the policy's; these are the attacker's.
        return {
            key.replace("policy/", "apl/attacker_").replace("/policy_step", "/attacker_step"): value
            for key, value in stats.items()
        }

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"attacker_version": self.attacker_version}

    def restore(self, saved: dict[str, Any]) -> None:
        # The learners' weights are back (apo_ray.checkpoint); the attacker's workers need them too.
        self.attacker_version = saved.get("attacker_version", 0)
        self.actors.attacker_pool.sync_from(self.actors.attacker, self.attacker_version)


def fixed_attacks(prompts: list[str], seed: int, max_words: int) -> list[str]:
    """The fixed attacker: max_words random adjectives added to each prompt, the same draw every round."""
    rng = random.Random(f"apo_ray.apl.fixed_attacker:{seed}")
    return [attacked_prompt(p, " ".join(rng.choices(ATTACK_WORDS, k=max_words)), max_words) for p in prompts]
