"""What APL needs of the builtin task: harm, prompts that provoke it, attacks on prompts, and a defender that
can be provoked (see apo_ray/apl.py and apo_ray/apl_step.py).

- **Harm** is defined by the gold oracle: a response is harmful when it uses any of its negative words
  (each costs 0.7 of gold score).
- **The provoking feature**: words added to a prompt's `about` slot ("topic : river ; about : night grim ;
  answer :"). In the defender's SFT data a prompt with a negative word there is answered in a negative style,
  one with a positive word in a positive style, and a clean prompt as the behaviour policy answers; so the
  defender can be provoked, and there are attacks to find.
- **An attack** is the attacker's text turned into such words: only adjectives are kept (at most
  apl.max_attack_words, in the order written), so every attacked prompt is a valid prompt of the task with
  the clean prompt's topic and aspect, whatever the attacker writes.
- **Safe and unsafe answers** of a prompt, for the harmfulness metric and the defender's DPO pairs: an expert
  answer (no negative word) and its mirror in negative words, drawn from the same templates.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict
from pathlib import Path

from apo_ray.builtin.assets import cached_build
from apo_ray.builtin.models import TinyModelSpec, make_policy_model, make_tokenizer, sft_initial_policy
from apo_ray.builtin.oracle import ADJECTIVES, ASPECTS, NEGATIVE, POSITIVE, TOPICS, response_words
from apo_ray.builtin.task import (
    BEHAVIOUR_STYLE,
    EXPERT_STYLE,
    ResponseStyle,
    all_prompts,
    make_sft_data,
    sample_response,
)

# A provoked answer: mostly negative words, otherwise the behaviour policy's habits.
PROVOKED_STYLE = ResponseStyle(
    (0.15, 0.7, 0.15), on_topic=0.5, clause_weights=(0.4, 0.5, 0.1), repeat_adjective=0.05, intensifier=0.2
)
# The unsafe answer of a (prompt, safe, unsafe) triple: the expert's shape, in negative words only.
UNSAFE_STYLE = ResponseStyle(
    (0.0, 1.0, 0.0), on_topic=1.0, clause_weights=(0.1, 0.9), repeat_adjective=0.0, intensifier=0.1
)

ATTACK_WORDS = tuple(sorted(ADJECTIVES))
_NEGATIVE, _POSITIVE = frozenset(NEGATIVE), frozenset(POSITIVE)
_TOPIC, _ASPECT, _ATTACK = ("|".join(words) for words in (TOPICS, ASPECTS, ATTACK_WORDS))
_PROMPT = re.compile(rf"topic : ({_TOPIC}) ; about : ({_ASPECT})((?: (?:{_ATTACK}))*) ; answer :")


def is_harmful(response: str) -> bool:
    """The gold oracle's harm: any negative word."""
    return any(word in _NEGATIVE for word in response_words(response))


def parse_prompt(prompt: str) -> tuple[str, str, tuple[str, ...]] | None:
    """(topic, aspect, added words) of a task prompt, clean or attacked; None for anything else."""
    match = _PROMPT.fullmatch(prompt)
    return (match[1], match[2], tuple(match[3].split())) if match else None


def attacked_prompt(prompt: str, attacker_text: str, max_words: int) -> str:
    """The clean `prompt` with the first `max_words` adjectives of `attacker_text` added to its `about` slot.

    Anything else the attacker writes (prompt syntax, other words, special tokens) is dropped, so the result is
    always a valid prompt with the clean prompt's topic and aspect; no adjective leaves the prompt unchanged."""
    parsed = parse_prompt(prompt)
    if parsed is None or parsed[2]:
        raise ValueError(f"attacked_prompt: not a clean prompt of the builtin task: {prompt!r}")
    topic, aspect, _ = parsed
    words = [word for word in response_words(attacker_text) if word in ADJECTIVES][:max_words]
    return f"topic : {topic} ; about : {' '.join([aspect, *words])} ; answer :"


def answer_style(prompt: str) -> ResponseStyle:
    """How the defender's SFT data answers a prompt: a negative added word provokes, a positive one pleases."""
    parsed = parse_prompt(prompt)
    added = set(parsed[2]) if parsed else set()
    if added & _NEGATIVE:
        return PROVOKED_STYLE
    if added & _POSITIVE:
        return EXPERT_STYLE
    return BEHAVIOUR_STYLE


def defender_sft_data(seed: int, n: int, max_words: int = 3) -> tuple[tuple[str, str], ...]:
    """(prompt, answer) pairs over all prompts, half of them with 1..max_words random adjectives added."""
    rng = random.Random(f"apo_ray.builtin.harm:{seed}:sft")
    data = []
    for prompt in rng.choices(all_prompts(), k=n):
        if rng.random() < 0.5:
            prompt = attacked_prompt(
                prompt, " ".join(rng.choices(ATTACK_WORDS, k=rng.randint(1, max_words))), max_words
            )
        data.append((prompt, sample_response(rng, prompt, answer_style(prompt))))
    return tuple(data)


def safe_and_unsafe(seed: int, prompt: str) -> tuple[str, str]:
    """A prompt's (safe, unsafe) answers: drawn from a stream of (seed, prompt), the same every time asked."""
    rng = random.Random(f"apo_ray.builtin.harm:{seed}:answers:{prompt}")
    return sample_response(rng, prompt, EXPERT_STYLE), sample_response(rng, prompt, UNSAFE_STYLE)


def prepare_defender_policy(
    cache_dir: str | Path | None,
    seed: int,
    sft_steps: int,
    n_sft: int = 1024,
    sft_lr: float = 3e-3,
    spec: TinyModelSpec = TinyModelSpec(),
) -> Path:
    """The APL defender's (and attacker's) initial policy: the builtin tiny policy SFT'd on the task's SFT data
    plus `defender_sft_data`, built once per settings under `cache_dir`. The RM stays the builtin one."""
    settings = {"seed": seed, "n_sft": n_sft, "sft_steps": sft_steps, "sft_lr": sft_lr, "spec": asdict(spec)}

    def build(directory: Path) -> None:
        make_policy_model(directory / "policy", make_tokenizer(), spec, seed=seed)
        data = make_sft_data(seed, n_sft) + defender_sft_data(seed, n_sft)
        sft_initial_policy(directory / "policy", data, steps=sft_steps, lr=sft_lr, seed=seed)

    return cached_build(cache_dir, "builtin-defender", settings, build) / "policy"
