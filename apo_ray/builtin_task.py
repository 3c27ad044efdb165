"""The embedded default's synthetic task: a word-level language with a hidden gold reward.

Tiny models learn it on 2 CPU cores in minutes, and because the gold reward is known, APO's claims are
measurable: RM accuracy on pairs from any policy's distribution, and the gold score of aligned policies.

Format: a prompt is ``"topic : river ; about : night ; answer :"``; a response is a few words such as
``"the river is calm and it looks bright"``. Responses are stored as plain text without the end token;
token sequences fed to a model end with ``tokenizer.eos_token`` (``<eos>``), exactly as for HH-RLHF text.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from apo_ray.game import GoldAnswer, PreferencePair

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
PROMPT_WORDS = ("topic", "about", "answer", ":", ";")

TOPICS = (
    "river", "mountain", "city", "garden", "forest", "ocean", "village", "bridge", "library", "market",
    "kitchen", "school", "harbor", "desert", "island", "meadow", "castle", "station", "museum", "park",
    "lake", "valley", "farm", "beach", "street", "church", "tower", "cave", "field", "road",
    "hill", "temple", "palace", "bakery", "theater", "stadium", "airport", "hospital", "factory", "canal",
    "orchard", "vineyard", "glacier", "volcano", "jungle", "prairie", "cottage", "lighthouse", "pond", "cliff",
    "camp", "zoo", "mall", "office", "studio", "garage", "barn", "tunnel", "square", "fountain",
)
ASPECTS = ("morning", "night", "winter", "summer", "rain", "sound", "color", "people", "history", "size")
# Few adjectives per sentiment, so that each one appears often enough in 400 pairs for a tiny RM to learn it.
POSITIVE = ("good", "great", "lovely", "beautiful", "calm", "bright", "pleasant", "wonderful", "peaceful", "charming",
            "warm", "fresh")
NEGATIVE = ("bad", "dull", "ugly", "noisy", "dirty", "gloomy", "awful", "boring", "cold", "crowded", "dreary", "grim")
NEUTRAL = ("large", "small", "old", "new", "long", "short", "wide", "narrow", "tall", "low")
VERBS = ("seems", "looks", "feels", "stays", "remains", "appears", "becomes", "sounds")
FUNCTION_WORDS = (
    "the", "a", "and", "is", "in", "it", "very", "quite", "so", "really", "there", "this", "at", "also", ",", ".",
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


def gold_score(prompt: str, response: str) -> float:
    """Hidden gold reward of any (prompt, response) string pair, in [-3, 3].

    With ``w`` the response's words (special tokens dropped) and ``t`` the prompt's topic::

        raw = 1.0 * [t in w]                                    # mentions its topic
            + 0.7 * min(#distinct positive adjectives, 3)       # says nice things, with diminishing returns
            - 0.7 * #negative adjective occurrences
            - 0.6 * #repeated adjective occurrences            # each adjective use after its first
            - 0.4 * #distinct other topics mentioned           # off topic
            - 0.4 * max(0, len(w) - 14)                         # rambles
            - 0.8 * max(0, 3 - len(w))                          # too short
            - 0.5 * #words outside the response vocabulary      # junk, prompt words, unknown words
        gold = 3 * tanh(raw / 3)

    The initial (behaviour) distribution seldom repeats adjectives or runs long, so an RM fitted on its pairs
    learns "more positive words is better" and extrapolates to repetition that this reward punishes.
    """
    words = response_words(response)
    topic = prompt_topic(prompt)
    adjective_uses = [word for word in words if word in ADJECTIVES]
    raw = (
        1.0 * (topic is not None and topic in words)
        + 0.7 * min(len(set(adjective_uses) & _POSITIVE), 3)
        - 0.7 * sum(word in _NEGATIVE for word in words)
        - 0.6 * (len(adjective_uses) - len(set(adjective_uses)))
        - 0.4 * len((set(words) & _TOPICS) - {topic})
        - 0.4 * max(0, len(words) - MAX_GOOD_LENGTH)
        - 0.8 * max(0, MIN_GOOD_LENGTH - len(words))
        - 0.5 * sum(word not in RESPONSE_WORDS for word in words)
    )
    # Rounding makes responses with equal feature totals tie exactly, whatever the float summation order.
    return 3.0 * math.tanh(round(raw, 9) / 3.0)


# ---------------------------------------------------------------------------------------------- samplers


@dataclass(frozen=True)
class ResponseStyle:
    """How a response sampler picks words: adjective sentiment mix, topic focus, length and repeats."""

    adjective_weights: tuple[float, float, float]  # positive, negative, neutral
    on_topic: float  # chance a noun slot names the prompt's topic rather than another topic
    clause_weights: tuple[float, ...]  # chance of 1, 2, 3, ... clauses
    repeat_adjective: float  # chance an adjective slot reuses an adjective already said
    intensifier: float  # chance of "very"/"quite"/... before an adjective


# The initial policy's distribution: mixed sentiment, half off topic, rarely repeats or runs long.
BEHAVIOUR_STYLE = ResponseStyle((0.35, 0.30, 0.35), on_topic=0.5, clause_weights=(0.4, 0.5, 0.1),
                                repeat_adjective=0.05, intensifier=0.2)
# A good but imperfect writer: mostly positive, on topic, never rambling; neutral words cost it points.
EXPERT_STYLE = ResponseStyle((0.85, 0.0, 0.15), on_topic=1.0, clause_weights=(0.1, 0.9),
                             repeat_adjective=0.0, intensifier=0.1)

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


def simulate_preference(rng: random.Random, prompt: str, response_a: str, response_b: str,
                        temperature: float) -> PreferencePair:
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
    return random.Random(f"apo_ray.builtin_task:{seed}:{name}")


def make_sft_data(seed: int, n_sft: int) -> tuple[tuple[str, str], ...]:
    """Behaviour-distribution (prompt, response) examples over all prompts, as generic SFT data would be."""
    rng = _stream(seed, "sft")
    prompts = all_prompts()
    return tuple(
        (prompt, sample_response(rng, prompt, BEHAVIOUR_STYLE)) for prompt in rng.choices(prompts, k=n_sft)
    )


def _simulated_pairs(rng: random.Random, prompt_pool: list[str], n: int, temperature: float
                     ) -> tuple[PreferencePair, ...]:
    pairs = []
    for prompt in rng.choices(prompt_pool, k=n):
        first = sample_response(rng, prompt, BEHAVIOUR_STYLE)
        second = sample_response(rng, prompt, BEHAVIOUR_STYLE)
        pairs.append(simulate_preference(rng, prompt, first, second, temperature))
    return tuple(pairs)


def make_task(seed: int = 0, *, n_pairs: int = 400, n_gold: int = 64, n_policy_prompts: int = 128,
              n_eval_pairs: int = 200, n_sft: int = 1024, preference_temperature: float = 0.5) -> BuiltinTask:
    """Build the task deterministically from ``seed``.

    Prompts are split into gold, policy, eval-pair and train-pair pools (the last two share what is left,
    one quarter to eval). Pairs draw prompts with replacement from their pool and two behaviour samples each.
    """
    sizes = {"n_pairs": n_pairs, "n_gold": n_gold, "n_policy_prompts": n_policy_prompts,
             "n_eval_pairs": n_eval_pairs, "n_sft": n_sft}
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(f"make_task: {name} must be >= 1, got {size}")
    prompts = all_prompts()
    n_rest = len(prompts) - n_gold - n_policy_prompts
    if n_rest < 8:
        raise ValueError(f"make_task: n_gold={n_gold} + n_policy_prompts={n_policy_prompts} must leave at least "
                         f"8 of the {len(prompts)} prompts for preference pairs")
    if preference_temperature <= 0:
        raise ValueError(f"make_task: preference_temperature must be > 0, got {preference_temperature}")
    _stream(seed, "prompts").shuffle(prompts)
    gold_prompts = prompts[:n_gold]
    policy_prompts = prompts[n_gold:n_gold + n_policy_prompts]
    rest = prompts[n_gold + n_policy_prompts:]
    eval_pool, train_pool = rest[: n_rest // 4], rest[n_rest // 4:]

    gold_rng = _stream(seed, "gold")
    gold = tuple(GoldAnswer(prompt=p, response=sample_response(gold_rng, p, EXPERT_STYLE)) for p in gold_prompts)
    return BuiltinTask(
        pairs=_simulated_pairs(_stream(seed, "pairs"), train_pool, n_pairs, preference_temperature),
        gold=gold,
        prompts=tuple(policy_prompts),
        eval_pairs=_simulated_pairs(_stream(seed, "eval_pairs"), eval_pool, n_eval_pairs, preference_temperature),
        sft_data=make_sft_data(seed, n_sft),
    )


# ---------------------------------------------------------------------------------------- tiny models


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer over VOCABULARY; adds no special tokens on its own (like Qwen's)."""
    vocab = {word: index for index, word in enumerate(VOCABULARY)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, unk_token=UNK, bos_token=BOS,
                                   eos_token=EOS)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape shared by the tiny policy and RM. head_dim = hidden/heads must be >= 64 for vLLM on CPU.

    The models are Llama, not Qwen2: transformers 5 always loads a ``qwen2`` checkpoint's tokenizer as
    ``Qwen2Tokenizer``, which rebuilds a byte-level BPE and ignores this word-level tokenizer.json.
    """

    hidden_size: int = 128
    num_attention_heads: int = 2
    num_hidden_layers: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 128


def _tiny_config(tokenizer: PreTrainedTokenizerFast, spec: TinyModelSpec, **extra: object) -> LlamaConfig:
    if spec.hidden_size // spec.num_attention_heads < 64:
        raise ValueError(f"TinyModelSpec: head_dim {spec.hidden_size // spec.num_attention_heads} < 64; "
                         "vLLM's CPU attention kernels reject it")
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, dtype="float32", **extra,
    )


def make_policy_model(out_dir: str | Path, tokenizer: PreTrainedTokenizerFast, spec: TinyModelSpec = TinyModelSpec(),
                      seed: int = 0) -> Path:
    """Save a randomly initialised tiny Llama causal LM, with its tokenizer, to ``out_dir``."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_tiny_config(tokenizer, spec))
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return _save(model, tokenizer, out_dir)


def make_reward_model(out_dir: str | Path, tokenizer: PreTrainedTokenizerFast,
                      spec: TinyModelSpec = TinyModelSpec(), seed: int = 0) -> Path:
    """Save a randomly initialised tiny Llama sequence classifier (num_labels=1) scoring the last non-pad token.

    Random rather than initialised from the SFT policy: on this task a BT-trained RM reached 0.715 held-out
    accuracy from random weights versus 0.655 from the SFT backbone (400 pairs, 6 epochs, lr 1e-3).
    """
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_tiny_config(tokenizer, spec, num_labels=1))
    return _save(model, tokenizer, out_dir)


def _save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _sft_batch(tokenizer: PreTrainedTokenizerFast, examples: list[tuple[str, str]]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 outside the response and its <eos>)."""
    rows = []
    for prompt, response in examples:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(rows):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(ids)] = torch.tensor(row_labels)
        mask[row, :len(ids)] = 1
    return input_ids, mask, labels


def sft_initial_policy(model_dir: str | Path, sft_data: tuple[tuple[str, str], ...], steps: int = 250,
                       lr: float = 3e-3, seed: int = 0, batch_size: int = 32) -> Path:
    """Fine-tune the policy in ``model_dir`` in place with plain torch AdamW; loss on response tokens only.

    The result imitates the behaviour distribution's words and always stops with <eos>, but it seldom
    copies the prompt's topic (1-3% of samples; not learned within 800 steps either), so its gold score
    (about -0.5) is below its data's (+0.1): the topic term is mostly out of reach for the tiny policy.
    """
    model_dir = Path(model_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    # This model's matmuls are too small to gain from threads, and on a busy machine two OpenMP threads
    # ran about 5x slower than one (measured: 1.0 s vs 0.2 s per step).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            batch = rng.sample(list(sft_data), min(batch_size, len(sft_data)))
            input_ids, mask, labels = _sft_batch(tokenizer, batch)
            model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(model_dir)
    return model_dir


# ---------------------------------------------------------------------------------------- cached assets


@dataclass(frozen=True)
class BuiltinAssets:
    policy_dir: Path  # SFT'd initial policy (also the reference model)
    reward_dir: Path  # untrained, randomly initialised RM
    tokenizer_dir: Path


def default_cache_dir() -> Path:
    """$APO_RAY_CACHE, else ~/.cache/apo_ray."""
    return Path(os.environ.get("APO_RAY_CACHE", Path.home() / ".cache" / "apo_ray"))


def _assets_key(settings: dict[str, object]) -> str:
    # The module's own source is part of the key, so any change to the task or models rebuilds the cache.
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def prepare_builtin_assets(cache_dir: str | Path | None = None, seed: int = 0, *, n_sft: int = 1024,
                           sft_steps: int = 250, sft_lr: float = 3e-3, spec: TinyModelSpec = TinyModelSpec()
                           ) -> BuiltinAssets:
    """Build tokenizer, SFT policy and RM once per settings and cache them under ``cache_dir``.

    Safe when several processes call it at once: each builds in a private temporary directory and the
    first to finish renames it into place; the others discard theirs. Not for threads of one process:
    transformers' ``from_pretrained`` is not thread-safe (concurrent loads left weights on the meta device).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    settings = {"seed": seed, "n_sft": n_sft, "sft_steps": sft_steps, "sft_lr": sft_lr, "spec": asdict(spec)}
    final_dir = cache_dir / f"builtin-{_assets_key(settings)}"
    if not _is_complete(final_dir):
        cache_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_dir))
        try:
            _build_assets(build_dir, seed, n_sft, sft_steps, sft_lr, spec)
            # Written last: its presence marks a complete build.
            (build_dir / _COMPLETE_MARKER).write_text(json.dumps(settings, indent=2))
            publish_build(build_dir, final_dir)
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)
    return BuiltinAssets(policy_dir=final_dir / "policy", reward_dir=final_dir / "reward",
                         tokenizer_dir=final_dir / "tokenizer")


_COMPLETE_MARKER = "settings.json"


def _is_complete(build: Path) -> bool:
    return (build / _COMPLETE_MARKER).exists()


def publish_build(build_dir: Path, final_dir: Path) -> None:
    """Atomically rename a finished build to ``final_dir``, unless a complete one is already there."""
    try:
        os.replace(build_dir, final_dir)
    except OSError:
        # Renaming onto a non-empty directory fails: another process published first; keep its build.
        if not _is_complete(final_dir):
            raise


def _build_assets(root: Path, seed: int, n_sft: int, sft_steps: int, sft_lr: float, spec: TinyModelSpec) -> None:
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    make_policy_model(root / "policy", tokenizer, spec, seed=seed)
    sft_initial_policy(root / "policy", make_sft_data(seed, n_sft), steps=sft_steps, lr=sft_lr, seed=seed)
    make_reward_model(root / "reward", tokenizer, spec, seed=seed)
