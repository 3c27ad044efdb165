"""The held-out evaluation of a round's policy and RM (the eval section), in place or overlapped with the next
round.

What it measures: the RM's accuracy and ECE on the held-out human pairs; eval.samples_per_prompt samples of
the policy on each of eval.prompts held-out prompts, judged (gold oracle or evaluation RM) and scored by the
game's RM, whose accuracy and ECE are taken on every within-prompt pair the judge tells apart; their KL to the
reference; the RM's score of the gold answers. Every mean carries `<key>_se` (apo_ray/evaluation.py).

**Overlapped** (eval.overlap, the default). Round r's evaluation needs round r's policy and RM, and round r+1
changes both. So at the end of round r the RM keeps a frozen copy of its weights
(RewardLearner.freeze_for_evaluation) and scores the human pairs and gold answers with it; round r+1 samples
the held-out prompts right after its own samples, while its RM step runs (the pool keeps round r's weights
until round r+1's sync, which first collects the call); the frozen RM and the reference score those samples
while the policy trains; and round r's row is logged at the end of round r+1, with the figures an in-place
evaluation gives. Each phase of a round keeps one actor busy, so on 2 cores this moves the evaluation off the
critical path; `timing/evaluate` is what the driver still waited for it.

**In pieces.** Each worker samples the held-out prompts in EVAL_PIECES_PER_WORKER pieces, and every piece goes
to the RM and the reference as it arrives: in place, they score the first pieces while the worker samples the
rest; overlapped, the pieces sampled before the policy step are scored while it trains. vLLM seeds each
prompt's samples by its index, so the pieces draw what one call would.

In place: the last round, ppo.async_rollouts (the pool samples the next round already), ZeRO-3 (the frozen
copy needs whole parameters), and eval.overlap=false.

**The policy's log-probs for eval/kl** are the sampler's when it is vLLM in float32, as the learner is (they
agree to 3e-7 a token: benchmarks/results/sampler_mismatch/); otherwise the policy learner's, asked before
the next policy step changes its weights.

**Resume.** A round's checkpoint is written before its overlapped evaluation ends, so it holds the round's
row (state.json `pending_row`); a resume that finds that row unlogged evaluates the round in place first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from apo_ray.config import Config
from apo_ray.data import GameData
from apo_ray.evaluation import (
    expected_calibration_error,
    mean_and_stderr,
    policy_sample_stats,
    preference_accuracy_and_stderr,
)
from apo_ray.game import Rollout
from apo_ray.learner_group import gather
from apo_ray.rollout_pool import GenerateCall
from apo_ray.seeds import SeedStream, round_seed

if TYPE_CHECKING:
    from apo_ray.driver import APOGame


# Each worker samples the held-out prompts in this many pieces, so that the RM and the reference score the
# first pieces while it samples the rest (an in-place evaluation's sampling and scoring overlap).
EVAL_PIECES_PER_WORKER = 4


def held_out_prompts(data: GameData, wanted: int, warn: Callable[[str], None]) -> list[str]:
    """The first `wanted` distinct prompts of the held-out pairs; all of them, saying so, when there are fewer."""
    prompts = list(dict.fromkeys(p.prompt for p in data.eval_pairs))
    if len(prompts) < wanted:
        warn(f"eval.prompts: {wanted} asked, the held-out pairs have {len(prompts)} distinct prompts; using them all")
    return prompts[:wanted]


def in_place_reason(cfg: Config) -> str:
    """Why every evaluation of this run happens in place; empty when they can overlap the next round."""
    if not cfg.eval.overlap:
        return "eval.overlap=false"
    if cfg.online and cfg.ppo.async_rollouts:
        return "ppo.async_rollouts: the pool is sampling the next round already"
    if cfg.learner.backend == "deepspeed" and cfg.learner.zero_stage == 3:
        return "learner.zero_stage=3: the RM's frozen copy needs whole parameters"
    return ""


def kl_from_sampler(cfg: Config) -> bool:
    return cfg.rollout.backend == "vllm" and cfg.rollout_dtype == "float32" and cfg.learner_dtype == "float32"


@dataclass
class _Evaluation:
    """One round's evaluation while its calls are in flight."""

    round_index: int
    frozen: bool  # scored by the RM's frozen copy (overlapped) or its live weights (in place)
    human_pairs: ray.ObjectRef
    gold_scores: ray.ObjectRef
    frozen_copy: ray.ObjectRef | None = None  # RewardLearner.freeze_for_evaluation's, when overlapped
    call: GenerateCall | None = None
    # The call's pieces as they arrive, each with the scoring calls it was sent to ({actor: ref}).
    pieces: list[tuple[list[Rollout], dict[str, ray.ObjectRef]]] = field(default_factory=list)
    collected: bool = False  # every piece is in `pieces`
    waited_s: float = 0.0


class HeldOutEvaluation:
    def __init__(self, game: APOGame):
        self.game, self.cfg, self.actors = game, game.cfg, game.actors
        self.prompts = held_out_prompts(game.data, self.cfg.eval.prompts, game.warn)
        self.sampler_logprobs = kl_from_sampler(self.cfg)
        self.in_place_reason = in_place_reason(self.cfg)
        if self.in_place_reason and self.cfg.eval.overlap:
            game.log(f"  evaluation: in place after each round's sync ({self.in_place_reason})")
        self._pending: tuple[_Evaluation, dict[str, float]] | None = None

    def overlaps(self, r: int) -> bool:
        return not self.in_place_reason and r < self.cfg.rounds

    # ------------------------------------------------------------------ in place

    def in_place(self, r: int) -> dict[str, float]:
        started = time.perf_counter()
        evaluation = self._open(r, frozen=False)
        evaluation.call = self._submit_samples()
        self._take_samples(evaluation)
        stats = self._close(evaluation)
        stats["timing/evaluate"] = time.perf_counter() - started
        return stats

    # ------------------------------------------------------------------ overlapped, in the order a round calls them

    def defer(self, r: int, row: dict[str, float]) -> None:
        """End of round r: keep the RM's weights and start the pieces that need nothing else; `row` (round r's
        stats) is completed and handed back by finish_pending at the end of round r+1."""
        started = time.perf_counter()
        # Submitted before round r+1's RM step, so the actor runs it first.
        frozen_copy = self.actors.reward.freeze_for_evaluation.remote()
        evaluation = self._open(r, frozen=True)
        evaluation.frozen_copy = frozen_copy
        evaluation.waited_s += time.perf_counter() - started
        self._pending = (evaluation, row)

    def sample_pending(self) -> None:
        """After the round's own samples are in: the pending evaluation's samples, on the weights the workers
        still hold."""
        if self._pending is not None:
            self._timed(lambda evaluation: setattr(evaluation, "call", self._submit_samples()))

    def before_policy_step(self) -> None:
        """The policy learner's log-probs, when eval/kl needs them, must see the weights it is evaluated on.
        Otherwise the pieces sampled so far go to their scorers now, queued behind the round's own scoring, and
        are scored while the policy trains."""
        if self._pending is None:
            return
        if self.sampler_logprobs:
            self._timed(lambda evaluation: evaluation.call.poll(lambda piece: self._score_piece(evaluation, piece)))
        else:
            self._timed(self._take_samples)

    def before_sync(self) -> None:
        """The pool takes new weights only after the pending call is collected."""
        if self._pending is not None:
            self._timed(self._take_samples)

    def finish_pending(self) -> tuple[int, dict[str, float]] | None:
        """The pending round's index and its completed row; None when no evaluation was pending."""
        if self._pending is None:
            return None
        evaluation, row = self._pending
        self._timed(lambda ev: row.update(self._close(ev)))
        self._pending = None
        row["timing/evaluate"] = evaluation.waited_s
        return evaluation.round_index, row

    # ------------------------------------------------------------------ pieces

    def _timed(self, step: Callable[[_Evaluation], Any]) -> None:
        assert self._pending is not None
        evaluation = self._pending[0]
        started = time.perf_counter()
        step(evaluation)
        evaluation.waited_s += time.perf_counter() - started

    def _open(self, r: int, frozen: bool) -> _Evaluation:
        reward, gold = self.actors.reward, self.game.data.gold
        return _Evaluation(
            r,
            frozen,
            human_pairs=reward.score_pairs.remote(self.game.data.eval_pairs, frozen=frozen),
            gold_scores=reward.score.remote([g.prompt for g in gold], [g.response for g in gold], frozen=frozen),
        )

    def _submit_samples(self) -> GenerateCall:
        return self.actors.pool.submit(
            self.prompts,
            self.cfg.eval.samples_per_prompt,
            seed=round_seed(self.cfg.seed, 0, SeedStream.EVAL),
            pieces_per_worker=EVAL_PIECES_PER_WORKER,
        )

    def _take_samples(self, evaluation: _Evaluation) -> None:
        """Collect every piece of the samples, each sent to its scorers as it arrives."""
        if evaluation.collected:
            return
        assert evaluation.call is not None, "held-out samples taken before they were submitted"
        evaluation.call.result(on_piece=lambda piece: self._score_piece(evaluation, piece))
        evaluation.collected = True

    def _score_piece(self, evaluation: _Evaluation, piece: list[Rollout]) -> None:
        """Send one piece of the samples to every actor that scores them."""
        prompts, responses = [x.prompt for x in piece], [x.response for x in piece]
        tokens = [x.tokens for x in piece]
        calls = {
            "rm": self.actors.reward.score.remote(prompts, responses, frozen=evaluation.frozen),
            "reference": self.actors.reference.sequence_logprobs.remote(tokens),
        }
        if not self.sampler_logprobs:
            calls["policy"] = self.actors.policy.sequence_logprobs.remote(tokens)
        if self.game.oracle is None:
            calls["judge"] = self.actors.eval_reward.score.remote(prompts, responses)
        evaluation.pieces.append((piece, calls))

    def _close(self, evaluation: _Evaluation) -> dict[str, float]:
        self._take_samples(evaluation)
        game = self.game
        if evaluation.frozen_copy is not None:
            gather(evaluation.frozen_copy)
        # In prompt order, whichever piece arrived first, so that the figures do not depend on arrival order.
        pieces = sorted(evaluation.pieces, key=lambda item: item[0][0].prompt_index)
        samples = [x for piece, _ in pieces for x in piece]
        names = list(pieces[0][1])
        scored = gather([calls[name] for _, calls in pieces for name in names])
        results = {name: [value for part in scored[i :: len(names)] for value in part] for i, name in enumerate(names)}
        prompts, responses = [x.prompt for x in samples], [x.response for x in samples]
        judge = results["judge"] if game.oracle is None else [game.oracle(p, y) for p, y in zip(prompts, responses)]
        policy_logps = results["policy"] if "policy" in results else [sum(x.sampler_logprobs) for x in samples]
        terms = None
        if game.oracle_terms is not None:
            rows = [game.oracle_terms(p, y) for p, y in zip(prompts, responses)]
            terms = {term: [row[term] for row in rows] for term in rows[0]}

        stats: dict[str, float] = {}
        chosen, rejected = gather(evaluation.human_pairs)
        stats["rm/acc"], stats["rm/acc_se"] = preference_accuracy_and_stderr(chosen, rejected)
        stats["rm/ece"] = expected_calibration_error(chosen, rejected)
        stats.update(
            policy_sample_stats(
                [x.prompt_index for x in samples],
                judge,
                results["rm"],
                np.array(policy_logps) - np.array(results["reference"]),
                [len(x.response_token_ids) for x in samples],
                terms,
            )
        )
        stats["rm/reward_gold"], stats["rm/reward_gold_se"] = mean_and_stderr(gather(evaluation.gold_scores))
        return stats
