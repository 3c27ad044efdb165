"""`pooling=mean` RMs (apo_ray.mean_pooling): the score is a linear map of the masked mean token state, the
checkpoint keeps its pooling, and every consumer (the reward learner, `apo-ray serve`) rebuilds the same RM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apo_ray.config import ConfigError, RMStageConfig, load_stage_config
from apo_ray.game import PreferencePair
from apo_ray.mean_pooling import POOLING_KEY, MeanPooledForSequenceClassification, masked_mean
from apo_ray.modeling import encode_for_reward, load_reward_model, load_tokenizer
from tests.conftest import minilm_tokenizer_dir

PROMPTS = ["Human: where is the river? Assistant: ", "Human: hi Assistant: "]
RESPONSES = ["It runs past the old mill and on to the sea.", "Hello."]


def test_masked_mean_averages_only_the_unmasked_positions():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    expected = torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)])
    torch.testing.assert_close(masked_mean(hidden, mask), expected)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    """A random 2-layer BERT encoder (no head, as sentence-transformers ship theirs) with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_tokenizer_dir())
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("encoder")
    BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
        ),
        add_pooling_layer=False,
    ).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def hand_scores(rm: MeanPooledForSequenceClassification, tokenizer, prompts, responses) -> torch.Tensor:
    """Each sequence alone (no padding): the mean of its token states, times the score's weight, plus its bias."""
    rows = []
    for prompt, response in zip(prompts, responses):
        ids = torch.tensor([tokenizer(prompt + response)["input_ids"]])
        hidden = rm.encoder(input_ids=ids).last_hidden_state[0]
        rows.append(hidden.mean(0) @ rm.score.weight[0] + rm.score.bias[0])
    return torch.stack(rows)


@torch.no_grad()
def test_a_mean_pooled_rm_scores_the_mean_token_state_whatever_the_padding(encoder_dir):
    torch.manual_seed(1)
    rm = load_reward_model(str(encoder_dir), "float32", pooling="mean").eval()
    tokenizer = load_tokenizer(str(encoder_dir))
    assert isinstance(rm, MeanPooledForSequenceClassification)
    # The encoder's fast attention, as the native head gets it (HF falls back to eager for a wrapper that does
    # not declare SDPA).
    assert rm.encoder.config._attn_implementation == "sdpa"
    # The encoder is the checkpoint's, not a fresh one.
    stored = load_file(encoder_dir / "model.safetensors")
    embeddings = "embeddings.word_embeddings.weight"
    torch.testing.assert_close(rm.encoder.get_parameter(embeddings), stored[embeddings])
    batch = encode_for_reward(tokenizer, PROMPTS, RESPONSES, max_length=256)
    assert batch.attention_mask[1].sum() < batch.attention_mask[0].sum(), "the short row must be padded"
    scores = rm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1)
    torch.testing.assert_close(scores, hand_scores(rm, tokenizer, PROMPTS, RESPONSES), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_the_saved_rm_keeps_its_pooling_for_every_consumer(encoder_dir, tmp_path):
    from apo_ray.actors.reward import RewardLearner
    from apo_ray.config import LearnerConfig, RewardConfig
    from apo_ray.serve.targets import model_role

    torch.manual_seed(1)
    rm = load_reward_model(str(encoder_dir), "float32", pooling="mean", disable_dropout=True)
    rm.save_pretrained(tmp_path / "rm")
    load_tokenizer(str(encoder_dir)).save_pretrained(tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config[POOLING_KEY] == "mean" and config["hidden_dropout_prob"] == 0.0
    assert model_role(tmp_path / "rm") == "reward"

    # No pooling named: the checkpoint's own. The game's reward learner scores as the saved module did.
    learner = RewardLearner(
        str(tmp_path / "rm"), reward=RewardConfig(max_length=256), learner=LearnerConfig(), trainable=False
    )
    assert isinstance(learner.model, MeanPooledForSequenceClassification)
    want = hand_scores(rm.eval(), load_tokenizer(str(encoder_dir)), PROMPTS, RESPONSES)
    assert learner.score(PROMPTS, RESPONSES) == pytest.approx(want.tolist(), abs=1e-5)

    with pytest.raises(ValueError, match=r"/rm: the RM there scores with pooling=mean, not native$"):
        load_reward_model(str(tmp_path / "rm"), "float32", pooling="native")


def test_mean_pooling_refuses_a_checkpoint_whose_weights_miss_the_encoder(tmp_path):
    """A sequence classifier's checkpoint keeps its encoder under another prefix (bert.*): loading it with
    pooling=mean would leave a random encoder behind a warning."""
    from transformers import BertConfig, BertForSequenceClassification

    BertForSequenceClassification(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=1)
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"pooling=mean needs an encoder checkpoint .* encoder weights are not in it"):
        load_reward_model(str(tmp_path), "float32", pooling="mean")


def test_the_reward_learner_steps_and_freezes_a_mean_pooled_rm(encoder_dir):
    from apo_ray.actors.reward import RewardLearner
    from apo_ray.config import LearnerConfig, RewardConfig

    torch.manual_seed(1)
    load_reward_model(str(encoder_dir), "float32", pooling="mean").save_pretrained(encoder_dir.parent / "mean_rm")
    load_tokenizer(str(encoder_dir)).save_pretrained(encoder_dir.parent / "mean_rm")
    learner = RewardLearner(
        str(encoder_dir.parent / "mean_rm"),
        reward=RewardConfig(batch_size=4, lr=1e-2),
        learner=LearnerConfig(backend="torch"),
    )
    pairs = [PreferencePair(p, r, "no.") for p, r in zip(PROMPTS, RESPONSES)]

    def margins(frozen: bool = False) -> list[float]:
        return [c - r for c, r in zip(*learner.score_pairs(pairs, frozen=frozen))]

    learner.freeze_for_evaluation()
    before = margins()
    assert margins(frozen=True) == pytest.approx(before, abs=1e-6)
    learner.apo_step(pairs, pairs, apo_coef=1.0, pref_coef=1.0, epochs=1, seed=0)
    assert all(after > b for after, b in zip(margins(), before)), "the step widened no margin"
    # The frozen copy still scores with the weights from before the step.
    assert margins(frozen=True) == pytest.approx(before, abs=1e-6)


def test_the_rm_stage_validates_pooling_and_builds_the_named_head(encoder_dir, tmp_path):
    from apo_ray.stages.reward_model import RewardModelTask

    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    base = [f"base_model={encoder_dir}", f"train.path={tmp_path / 'pairs.jsonl'}"]
    with pytest.raises(ConfigError, match=r"^pooling: must be one of native, mean; got 'max'$"):
        load_stage_config(RMStageConfig, None, [*base, "pooling=max"])
    cfg = load_stage_config(RMStageConfig, None, [*base, "pooling=mean"])
    assert isinstance(RewardModelTask(cfg).load_model(), MeanPooledForSequenceClassification)
