"""The builtin task's samplers and data: behaviour and expert responses, simulated human preferences (see
apo_ray.builtin)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from apo_ray.builtin.oracle import (
    ASPECTS,
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    RESPONSE_WORDS,
    TOPICS,
    VERBS,
    format_prompt,
    gold_score,
    prompt_topic,
)
from apo_ray.game import GoldAnswer, PreferencePair

# ---------------------------------------------------------------------------------------------- samplers


@dataclass(frozen=True)
class ResponseStyle:
    """How a response sampler picks words: adjective sentiment mix, topic focus, length and repeats."""

    adjective_weights: tuple[float, float, float]  # positive, negative, neutral
    on_topic: float  # chance a noun slot names the prompt's topic rather than another topic
    clause_weights: tuple[float, ...]  # chance of 1, 2, 3, ... clauses
    repeat_adjective: float  # chance an adjective slot reuses an adjective already said
    intensifier: float  # chance of "very"/"quite"/... before an adjective


# The initial policy's distribution: mixed sentiment, mostly on topic, rarely repeats, runs long or wanders off
# topic, so an RM fitted on its pairs sees few of the penalties the policy can later run into. With half of the
# noun slots off topic (before issue 11) a prompt's topic was a weak signal to imitate, and the tiny SFT policy
# never learned to copy it from its prompt (1.5-3% of its samples named it).
BEHAVIOUR_STYLE = ResponseStyle(
    (0.35, 0.30, 0.35), on_topic=0.9, clause_weights=(0.4, 0.5, 0.1), repeat_adjective=0.05, intensifier=0.2
)
# A good but imperfect writer: mostly positive, on topic, never rambling; neutral words cost it points.
EXPERT_STYLE = ResponseStyle(
    (0.85, 0.0, 0.15), on_topic=1.0, clause_weights=(0.1, 0.9), repeat_adjective=0.0, intensifier=0.1
)

_CLAUSE_TEMPLATES = (
    "the {noun} is {adj}",
    "the {noun} {verb} {adj}",
    "it is {adj} and {adj}",
    "there is a {adj} {noun}",
    "in the {aspect} it {verb} {adj}",
    "this {noun} is {adj} , {adj}",
)


def sample_response(rng: random.Random, prompt: str, style: ResponseStyle) -> str:
    """Draw one response for a prompt in the given style."""
    topic = prompt_topic(prompt) or rng.choice(TOPICS)
    said: list[str] = []

    def adjective() -> str:
        if said and rng.random() < style.repeat_adjective:
            word = rng.choice(said)
        else:
            pool = rng.choices((POSITIVE, NEGATIVE, NEUTRAL), weights=style.adjective_weights)[0]
            word = rng.choice([candidate for candidate in pool if candidate not in said] or pool)
        said.append(word)
        if rng.random() < style.intensifier:
            return f"{rng.choice(('very', 'quite', 'really', 'so'))} {word}"
        return word

    def noun() -> str:
        return topic if rng.random() < style.on_topic else rng.choice([t for t in TOPICS if t != topic])

    n_clauses = rng.choices(range(1, len(style.clause_weights) + 1), weights=style.clause_weights)[0]
    clauses = []
    for _ in range(n_clauses):
        template = rng.choice(_CLAUSE_TEMPLATES)
        clause = template.replace("{noun}", noun()).replace("{verb}", rng.choice(VERBS))
        clause = clause.replace("{aspect}", rng.choice(ASPECTS))
        while "{adj}" in clause:
            clause = clause.replace("{adj}", adjective(), 1)
        clauses.append(clause)
    return " and ".join(clauses)


def random_response(rng: random.Random, max_words: int = 12) -> str:
    """Uniformly random response words: the floor any trained policy should beat."""
    return " ".join(rng.choices(sorted(RESPONSE_WORDS), k=rng.randint(1, max_words)))


def simulate_preference(
    rng: random.Random, prompt: str, response_a: str, response_b: str, temperature: float
) -> PreferencePair:
    """A simulated human label: ``a`` wins with probability sigmoid((gold(a) - gold(b)) / temperature)."""
    margin = (gold_score(prompt, response_a) - gold_score(prompt, response_b)) / temperature
    a_wins = rng.random() < 0.5 * (1.0 + math.tanh(margin / 2.0))  # sigmoid that cannot overflow
    chosen, rejected = (response_a, response_b) if a_wins else (response_b, response_a)
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected)


# -------------------------------------------------------------------------------------------------- task


@dataclass(frozen=True)
class BuiltinTask:
    """All data of the synthetic task. Gold, policy and eval prompts are disjoint."""

    pairs: tuple[PreferencePair, ...]  # D_P: simulated human labels on behaviour samples
    gold: tuple[GoldAnswer, ...]  # D_gold: expert answers on their own prompts
    prompts: tuple[str, ...]  # D_Q: policy prompts
    eval_pairs: tuple[PreferencePair, ...]  # held-out simulated pairs on held-out prompts
    sft_data: tuple[tuple[str, str], ...]  # (prompt, mediocre behaviour response) for the initial SFT


def all_prompts() -> list[str]:
    """Every prompt of the task, in a fixed order."""
    return [format_prompt(topic, aspect) for topic in TOPICS for aspect in ASPECTS]


def _stream(seed: int, name: str) -> random.Random:
    """Independent random stream per component, so resizing one part leaves the others unchanged."""
    # The module's name before the split into apo_ray.builtin: the streams, and so the task's data, stay as they were.
    return random.Random(f"apo_ray.builtin_task:{seed}:{name}")


def make_sft_data(seed: int, n_sft: int) -> tuple[tuple[str, str], ...]:
    """Behaviour-distribution (prompt, response) examples over all prompts, as generic SFT data would be."""
    rng = _stream(seed, "sft")
    prompts = all_prompts()
    return tuple((prompt, sample_response(rng, prompt, BEHAVIOUR_STYLE)) for prompt in rng.choices(prompts, k=n_sft))


def _simulated_pairs(
    rng: random.Random, prompt_pool: list[str], n: int, temperature: float
) -> tuple[PreferencePair, ...]:
    pairs = []
    for prompt in rng.choices(prompt_pool, k=n):
        first = sample_response(rng, prompt, BEHAVIOUR_STYLE)
        second = sample_response(rng, prompt, BEHAVIOUR_STYLE)
        pairs.append(simulate_preference(rng, prompt, first, second, temperature))
    return tuple(pairs)


def make_task(
    seed: int = 0,
    *,
    n_pairs: int = 400,
    n_gold: int = 64,
    n_policy_prompts: int = 128,
    n_eval_pairs: int = 200,
    n_sft: int = 4096,
    preference_temperature: float = 0.5,
) -> BuiltinTask:
    """Build the task deterministically from ``seed``.

    Prompts are split into gold, policy, eval-pair and train-pair pools (the last two share what is left,
    one quarter to eval). Pairs draw prompts with replacement from their pool and two behaviour samples each.
    """
    sizes = {
        "n_pairs": n_pairs,
        "n_gold": n_gold,
        "n_policy_prompts": n_policy_prompts,
        "n_eval_pairs": n_eval_pairs,
        "n_sft": n_sft,
    }
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(f"make_task: {name} must be >= 1, got {size}")
    prompts = all_prompts()
    n_rest = len(prompts) - n_gold - n_policy_prompts
    if n_rest < 8:
        raise ValueError(
            f"make_task: n_gold={n_gold} + n_policy_prompts={n_policy_prompts} must leave at least "
            f"8 of the {len(prompts)} prompts for preference pairs"
        )
    if preference_temperature <= 0:
        raise ValueError(f"make_task: preference_temperature must be > 0, got {preference_temperature}")
    _stream(seed, "prompts").shuffle(prompts)
    gold_prompts = prompts[:n_gold]
    policy_prompts = prompts[n_gold : n_gold + n_policy_prompts]
    rest = prompts[n_gold + n_policy_prompts :]
    eval_pool, train_pool = rest[: n_rest // 4], rest[n_rest // 4 :]

    gold_rng = _stream(seed, "gold")
    gold = tuple(GoldAnswer(prompt=p, response=sample_response(gold_rng, p, EXPERT_STYLE)) for p in gold_prompts)
    return BuiltinTask(
        pairs=_simulated_pairs(_stream(seed, "pairs"), train_pool, n_pairs, preference_temperature),
        gold=gold,
        prompts=tuple(policy_prompts),
        eval_pairs=_simulated_pairs(_stream(seed, "eval_pairs"), eval_pool, n_eval_pairs, preference_temperature),
        sft_data=make_sft_data(seed, n_sft),
    )
