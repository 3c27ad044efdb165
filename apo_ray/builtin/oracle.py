"""The builtin task's vocabulary, prompt format and hidden gold reward (see apo_ray.builtin)."""

from __future__ import annotations

import math
import re

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
PROMPT_WORDS = ("topic", "about", "answer", ":", ";")

TOPICS = (
    "river",
    "mountain",
    "city",
    "garden",
    "forest",
    "ocean",
    "village",
    "bridge",
    "library",
    "market",
    "kitchen",
    "school",
    "harbor",
    "desert",
    "island",
    "meadow",
    "castle",
    "station",
    "museum",
    "park",
    "lake",
    "valley",
    "farm",
    "beach",
    "street",
    "church",
    "tower",
    "cave",
    "field",
    "road",
    "hill",
    "temple",
    "palace",
    "bakery",
    "theater",
    "stadium",
    "airport",
    "hospital",
    "factory",
    "canal",
    "orchard",
    "vineyard",
    "glacier",
    "volcano",
    "jungle",
    "prairie",
    "cottage",
    "lighthouse",
    "pond",
    "cliff",
    "camp",
    "zoo",
    "mall",
    "office",
    "studio",
    "garage",
    "barn",
    "tunnel",
    "square",
    "fountain",
)
ASPECTS = ("morning", "night", "winter", "summer", "rain", "sound", "color", "people", "history", "size")
# Few adjectives per sentiment, so that each one appears often enough in 400 pairs for a tiny RM to learn it.
POSITIVE = (
    "good",
    "great",
    "lovely",
    "beautiful",
    "calm",
    "bright",
    "pleasant",
    "wonderful",
    "peaceful",
    "charming",
    "warm",
    "fresh",
)
NEGATIVE = ("bad", "dull", "ugly", "noisy", "dirty", "gloomy", "awful", "boring", "cold", "crowded", "dreary", "grim")
NEUTRAL = ("large", "small", "old", "new", "long", "short", "wide", "narrow", "tall", "low")
VERBS = ("seems", "looks", "feels", "stays", "remains", "appears", "becomes", "sounds")
FUNCTION_WORDS = (
    "the",
    "a",
    "and",
    "is",
    "in",
    "it",
    "very",
    "quite",
    "so",
    "really",
    "there",
    "this",
    "at",
    "also",
    ",",
    ".",
)

VOCABULARY: tuple[str, ...] = (
    SPECIAL_TOKENS + PROMPT_WORDS + TOPICS + ASPECTS + POSITIVE + NEGATIVE + NEUTRAL + VERBS + FUNCTION_WORDS
)
RESPONSE_WORDS = frozenset(TOPICS + ASPECTS + POSITIVE + NEGATIVE + NEUTRAL + VERBS + FUNCTION_WORDS)
ADJECTIVES = frozenset(POSITIVE + NEGATIVE + NEUTRAL)
_POSITIVE, _NEGATIVE, _TOPICS = frozenset(POSITIVE), frozenset(NEGATIVE), frozenset(TOPICS)

# Same split as the tokenizer's Whitespace pre-tokenizer, so the gold reward sees the words the model sees.
_WORD_PATTERN = re.compile(r"\w+|[^\w\s]+")
_PROMPT_PATTERN = re.compile(r"topic\s*:\s*(\w+)")

MAX_GOOD_LENGTH = 14
MIN_GOOD_LENGTH = 3


def format_prompt(topic: str, aspect: str) -> str:
    """The prompt text for a topic; the aspect only makes prompts diverse (the gold reward ignores it)."""
    return f"topic : {topic} ; about : {aspect} ; answer :"


def prompt_topic(prompt: str) -> str | None:
    """The topic a prompt asks about, or None when the prompt does not follow the format."""
    match = _PROMPT_PATTERN.search(prompt)
    return match.group(1) if match else None


def response_words(response: str) -> list[str]:
    """Words of a response as the tokenizer splits them, special tokens removed."""
    for token in SPECIAL_TOKENS:
        response = response.replace(token, " ")
    return _WORD_PATTERN.findall(response)


# The terms of the raw gold score, in the order the report shows them.
GOLD_TERMS = ("topic", "praise", "negatives", "repeats", "off_topic", "length", "junk")


def gold_terms(prompt: str, response: str) -> dict[str, float]:
    """The raw gold score of a response split into its terms (see `gold_score`); they sum to the raw score.

    ``length`` is the rambling and the too-short penalty together: a response is never both.
    """
    words = response_words(response)
    topic = prompt_topic(prompt)
    adjective_uses = [word for word in words if word in ADJECTIVES]
    return {
        "topic": 1.0 * (topic is not None and topic in words),
        "praise": 0.7 * min(len(set(adjective_uses) & _POSITIVE), 3),
        "negatives": -0.7 * sum(word in _NEGATIVE for word in words),
        "repeats": -0.6 * (len(adjective_uses) - len(set(adjective_uses))),
        "off_topic": -0.4 * len((set(words) & _TOPICS) - {topic}),
        "length": -0.4 * max(0, len(words) - MAX_GOOD_LENGTH) - 0.8 * max(0, MIN_GOOD_LENGTH - len(words)),
        "junk": -0.5 * sum(word not in RESPONSE_WORDS for word in words),
    }


def squash(raw: float) -> float:
    """gold = 3 tanh(raw / 3): the raw sum of terms squashed into [-3, 3]."""
    # Rounding makes responses with equal feature totals tie exactly, whatever the float summation order.
    return 3.0 * math.tanh(round(raw, 9) / 3.0)


def gold_score(prompt: str, response: str) -> float:
    """Hidden gold reward of any (prompt, response) string pair, in [-3, 3].

    With ``w`` the response's words (special tokens dropped) and ``t`` the prompt's topic::

        raw = 1.0 * [t in w]                                    # topic: mentions its topic
            + 0.7 * min(#distinct positive adjectives, 3)       # praise, with diminishing returns
            - 0.7 * #negative adjective occurrences             # negatives
            - 0.6 * #repeated adjective occurrences            # repeats: each adjective use after its first
            - 0.4 * #distinct other topics mentioned           # off_topic
            - 0.4 * max(0, len(w) - 14)                         # length: rambles ...
            - 0.8 * max(0, 3 - len(w))                          # ... or is too short
            - 0.5 * #words outside the response vocabulary      # junk: prompt words, unknown words
        gold = 3 * tanh(raw / 3)

    The initial (behaviour) distribution seldom repeats adjectives or runs long, so an RM fitted on its pairs
    learns "more positive words is better" and extrapolates to repetition that this reward punishes.
    """
    return squash(sum(gold_terms(prompt, response).values()))
