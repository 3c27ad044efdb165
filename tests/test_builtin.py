import math
import random
import statistics
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from apo_ray.builtin.assets import default_cache_dir, prepare_builtin_assets, publish_build
from apo_ray.builtin.models import TinyModelSpec, make_policy_model, make_reward_model, make_tokenizer
from apo_ray.builtin.oracle import GOLD_TERMS, gold_score, gold_terms, response_words
from apo_ray.builtin.task import make_sft_data, make_task, random_response
from apo_ray.config import BuiltinTaskConfig

RIVER = "topic : river ; about : night ; answer :"


def squashed(raw: float) -> float:
    return 3.0 * math.tanh(raw / 3.0)


@pytest.mark.parametrize(
    "response, raw",
    [
        ("the river is new", 1.0),  # topic mentioned, neutral adjective
        ("the lake is new", -0.4),  # another topic instead
        ("the river is calm and bright", 1.0 + 2 * 0.7),
        ("calm bright warm fresh", 3 * 0.7),  # distinct positives count up to 3
        ("it is dull", -0.7),
        ("the river is calm calm calm", 1.0 + 0.7 - 2 * 0.6),  # two repeated adjective uses
        ("the river is " + " ".join(["so"] * 13), 1.0 - 2 * 0.4),  # 16 words, 2 over the limit
        ("river", 1.0 - 2 * 0.8),  # 1 word, 2 short of the minimum
        ("the river is zorp", 1.0 - 0.5),  # out-of-vocabulary word
        ("answer : river", 1.0 - 2 * 0.5),  # prompt words are not response words
        (" the river is new <eos>", 1.0),  # spaces and special tokens are ignored
    ],
)
def test_gold_score_features(response: str, raw: float) -> None:
    assert gold_score(RIVER, response) == pytest.approx(squashed(raw))


def test_gold_terms_split_the_raw_score_by_hand() -> None:
    # topic, 2 distinct positives (calm twice: one repeat), one negative, one other topic, 16 words (2 over)
    response = "the river is calm and calm and bright and dull near the lake so so so"
    terms = gold_terms(RIVER, response)
    assert list(terms) == list(GOLD_TERMS)
    assert terms == pytest.approx(
        {
            "topic": 1.0,
            "praise": 1.4,
            "negatives": -0.7,
            "repeats": -0.6,
            "off_topic": -0.4,
            "length": -0.8,
            "junk": -0.5,
        }
    )  # "near" is not a word here
    assert gold_score(RIVER, response) == pytest.approx(squashed(sum(terms.values())))
    assert gold_terms(RIVER, "river")["length"] == pytest.approx(-1.6)


def test_gold_score_without_topic_counts_every_topic_as_off_topic() -> None:
    assert gold_score("hello there", "the river is new") == pytest.approx(squashed(-0.4))


def test_gold_score_is_bounded_on_junk() -> None:
    junk = "#$% " * 200 + "ünïcode\n\t" * 50
    assert -3.0 <= gold_score(junk, junk) < -2.9


def test_repeating_positive_words_scores_below_a_plain_response() -> None:
    hacked = "the river is great lovely great lovely great lovely great lovely"
    assert gold_score(RIVER, hacked) < 0.0 < gold_score(RIVER, "the river is great")


def test_response_words_split_punctuation_like_the_tokenizer() -> None:
    assert response_words("calm,bright<eos>") == ["calm", ",", "bright"]


def test_make_task_is_deterministic_by_seed() -> None:
    assert make_task(3, n_pairs=50, n_eval_pairs=20, n_sft=30) == make_task(3, n_pairs=50, n_eval_pairs=20, n_sft=30)
    assert make_task(3, n_pairs=50).pairs != make_task(4, n_pairs=50).pairs


def test_sft_data_does_not_depend_on_other_sizes() -> None:
    small = make_task(0, n_pairs=5, n_gold=10, n_policy_prompts=10, n_eval_pairs=5)
    assert small.sft_data == make_task(0).sft_data == make_sft_data(0, 4096)


def test_prompt_pools_are_disjoint_and_sized() -> None:
    task = make_task(0)
    gold = {answer.prompt for answer in task.gold}
    policy = set(task.prompts)
    train = {pair.prompt for pair in task.pairs}
    held_out = {pair.prompt for pair in task.eval_pairs}
    assert (len(gold), len(policy), len(task.pairs), len(task.eval_pairs)) == (64, 128, 400, 200)
    for first, second in [
        (gold, policy),
        (gold, train),
        (gold, held_out),
        (policy, train),
        (policy, held_out),
        (train, held_out),
    ]:
        assert not first & second


def test_make_task_rejects_too_many_prompts() -> None:
    with pytest.raises(ValueError, match="n_policy_prompts"):
        make_task(0, n_gold=300, n_policy_prompts=300)
    with pytest.raises(ValueError, match="n_pairs"):
        make_task(0, n_pairs=0)


def test_simulated_labels_follow_bradley_terry_on_gold() -> None:
    temperature = 0.5
    task = make_task(0, n_pairs=2000, preference_temperature=temperature)
    margins = [gold_score(p.prompt, p.chosen) - gold_score(p.prompt, p.rejected) for p in task.pairs]
    margins = [margin for margin in margins if margin != 0.0]
    agree_probabilities = [1.0 / (1.0 + math.exp(-abs(margin) / temperature)) for margin in margins]
    expected = statistics.mean(agree_probabilities)
    observed = statistics.mean(margin > 0 for margin in margins)
    std_error = math.sqrt(sum(p * (1 - p) for p in agree_probabilities)) / len(margins)
    assert abs(observed - expected) < 4 * std_error
    assert 0.7 < observed < 0.9  # noisy but informative, like human labels


def test_near_zero_temperature_labels_always_agree_with_gold() -> None:
    task = make_task(0, n_pairs=300, preference_temperature=1e-4)
    assert all(gold_score(p.prompt, p.chosen) >= gold_score(p.prompt, p.rejected) for p in task.pairs)


def test_golden_answers_beat_the_initial_distribution_and_random_words() -> None:
    task = make_task(0)
    golden = statistics.mean(gold_score(a.prompt, a.response) for a in task.gold)
    behaviour = statistics.mean(gold_score(prompt, response) for prompt, response in task.sft_data)
    rng = random.Random(0)
    random_words = statistics.mean(gold_score(prompt, random_response(rng)) for prompt in task.prompts)
    # The behaviour data stays on topic (issue 11), so the gap is narrower than before (1.5), still most of
    # the room between the behaviour and the top of the scale.
    assert golden > behaviour + 1.2
    assert behaviour > random_words + 0.5


def test_tokenizer_round_trip_and_auto_load(tmp_path: Path) -> None:
    make_tokenizer().save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer(RIVER + " the river is calm")["input_ids"]
    assert len(ids) == 14 and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == RIVER + " the river is calm"
    assert tokenizer("calm <eos>")["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer("zorp")["input_ids"] == [tokenizer.unk_token_id]
    batch = tokenizer(["calm", "the river is calm"], padding=True)["input_ids"]
    assert batch[0][1:] == [tokenizer.pad_token_id] * 3


def test_policy_and_reward_models_load_with_auto_classes(tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    policy = AutoModelForCausalLM.from_pretrained(make_policy_model(tmp_path / "policy", tokenizer))
    assert policy.config.hidden_size // policy.config.num_attention_heads >= 64
    reward_dir = make_reward_model(tmp_path / "reward", tokenizer)
    assert AutoTokenizer.from_pretrained(reward_dir).get_vocab() == tokenizer.get_vocab()
    reward = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    batch = tokenizer([RIVER + " calm", RIVER + " the river is calm and warm"], padding=True, return_tensors="pt")
    alone = tokenizer([RIVER + " calm"], return_tensors="pt")
    with torch.no_grad():
        padded_scores = reward(**batch).logits
        alone_score = reward(**alone).logits
    assert padded_scores.shape == (2, 1)
    # The score is read at the last non-pad token, so padding does not change it.
    assert padded_scores[0, 0].item() == pytest.approx(alone_score[0, 0].item(), abs=1e-5)


def test_policy_rejects_head_dim_below_64(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="head_dim 32"):
        make_policy_model(tmp_path, make_tokenizer(), TinyModelSpec(hidden_size=128, num_attention_heads=4))


def make_build(path: Path, complete: bool) -> Path:
    path.mkdir()
    (path / "weights").write_text(str(path))
    if complete:
        (path / "settings.json").write_text("{}")
    return path


def test_publish_build_moves_a_build_into_place(tmp_path: Path) -> None:
    build = make_build(tmp_path / "build", complete=True)
    publish_build(build, tmp_path / "final")
    assert (tmp_path / "final" / "weights").read_text() == str(build) and not build.exists()


def test_publish_build_keeps_the_build_that_got_there_first(tmp_path: Path) -> None:
    winner = make_build(tmp_path / "winner", complete=True)
    publish_build(winner, tmp_path / "final")
    publish_build(make_build(tmp_path / "loser", complete=True), tmp_path / "final")
    assert (tmp_path / "final" / "weights").read_text() == str(winner)


def test_publish_build_does_not_hide_a_broken_final_dir(tmp_path: Path) -> None:
    make_build(tmp_path / "final", complete=False)
    with pytest.raises(OSError):
        publish_build(make_build(tmp_path / "build", complete=True), tmp_path / "final")


@pytest.mark.integration
def test_prepare_builds_once_and_reuses_the_cache(tmp_path: Path) -> None:
    first = prepare_builtin_assets(tmp_path, seed=1, n_sft=16, sft_steps=2)
    weights = first.policy_dir / "model.safetensors"
    built_at = weights.stat().st_mtime_ns
    assert prepare_builtin_assets(tmp_path, seed=1, n_sft=16, sft_steps=2) == first
    assert weights.stat().st_mtime_ns == built_at
    assert [path.name for path in tmp_path.iterdir()] == [first.policy_dir.parent.name]  # no temp dirs left
    assert prepare_builtin_assets(tmp_path, seed=1, n_sft=16, sft_steps=3) != first
    reward = AutoModelForSequenceClassification.from_pretrained(first.reward_dir)
    assert reward.config.num_labels == 1
    assert AutoTokenizer.from_pretrained(first.tokenizer_dir).get_vocab() == make_tokenizer().get_vocab()


def topic_share(pairs) -> float:
    """The share of (prompt, response) pairs whose response names the prompt's topic (the gold topic term)."""
    return statistics.mean(gold_terms(prompt, response)["topic"] for prompt, response in pairs)


@pytest.fixture(scope="module")
def sft_samples():
    """The embedded default's SFT policy (as `apo-ray train` builds it) and 4 samples of it per gold and policy
    prompt of seed 0's task, sampled with transformers' generate."""
    sizes = BuiltinTaskConfig()
    assets = prepare_builtin_assets(default_cache_dir(), seed=0, n_sft=sizes.n_sft, sft_steps=sizes.sft_steps)
    tokenizer = AutoTokenizer.from_pretrained(assets.policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(assets.policy_dir).eval()
    task = make_task(0)
    prompts = [answer.prompt for answer in task.gold] + list(task.prompts)
    inputs = tokenizer(prompts, return_tensors="pt")  # every prompt has the same length: no padding
    torch.manual_seed(0)
    with torch.no_grad():
        output = policy.generate(
            **inputs, do_sample=True, max_new_tokens=32, num_return_sequences=4, pad_token_id=tokenizer.pad_token_id
        )
    generated = output[:, inputs["input_ids"].shape[1] :]
    return task, tokenizer, [p for p in prompts for _ in range(4)], generated, sizes


@pytest.mark.integration
def test_sft_policy_speaks_the_language_and_is_clearly_improvable(sft_samples) -> None:
    task, tokenizer, prompts, generated, _ = sft_samples
    ended = [tokenizer.eos_token_id in row.tolist() for row in generated]
    assert statistics.mean(ended) > 0.9
    assert tokenizer.unk_token_id not in generated.tolist()
    responses = tokenizer.batch_decode(generated, skip_special_tokens=True)
    sft_mean = statistics.mean(gold_score(p, r) for p, r in zip(prompts, responses))
    golden_mean = statistics.mean(gold_score(a.prompt, a.response) for a in task.gold)
    rng = random.Random(0)
    random_mean = statistics.mean(gold_score(p, random_response(rng)) for p in prompts)
    assert sft_mean < golden_mean - 1.2
    assert sft_mean > random_mean


@pytest.mark.integration
def test_sft_policy_names_its_prompts_topic_as_often_as_its_data(sft_samples) -> None:
    """The policy conditions on its prompt: its samples name the prompt's topic within 20% as often as its SFT
    data does (issue 11: 1.5-3% against about half, before)."""
    _, tokenizer, prompts, generated, sizes = sft_samples
    responses = tokenizer.batch_decode(generated, skip_special_tokens=True)
    data_share = topic_share(make_sft_data(0, sizes.n_sft))
    policy_share = topic_share(zip(prompts, responses))
    assert abs(policy_share - data_share) <= 0.2 * data_share, (policy_share, data_share)
