"""reward.apo_normalization: what the RM's two terms are averaged over, and so what apo_coef weighs."""

from __future__ import annotations

import math

import pytest
import torch

from apo_ray.config import ConfigError, RewardConfig, load_config
from apo_ray.game import PreferencePair
from apo_ray.losses import apo_reward_loss

LOG2 = math.log(2.0)
NEG_LOGSIG_1 = 0.31326168751822286  # -log sigmoid(1)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# One APO pair with margin 1; two human pairs with margins 0 and 1.
SCORES = dict(r_gold=t(1.0), r_sample=t(0.0), r_chosen=t(0.0, 2.0), r_rejected=t(0.0, 1.0))


def test_per_term_averages_each_term_over_its_own_pairs():
    loss, _ = apo_reward_loss(**SCORES, apo_coef=0.5, pref_coef=2.0, normalization="per_term")
    assert loss.item() == pytest.approx(0.5 * NEG_LOGSIG_1 + 2.0 * (LOG2 + NEG_LOGSIG_1) / 2)


def test_pooled_sums_both_terms_and_divides_by_all_pairs():
    loss, stats = apo_reward_loss(**SCORES, apo_coef=0.5, pref_coef=2.0, normalization="pooled")
    # (0.5 * 0.3133 + 2 * (0.6931 + 0.3133)) / 3 pairs
    assert loss.item() == pytest.approx((0.5 * NEG_LOGSIG_1 + 2.0 * (LOG2 + NEG_LOGSIG_1)) / 3)
    assert loss.item() == pytest.approx(0.7231495266384826)
    assert stats["rm/loss"] == pytest.approx(loss.item())
    # The per-term statistics stay each term's own mean.
    assert stats["rm/loss_apo"] == pytest.approx(NEG_LOGSIG_1)
    assert stats["rm/loss_pref"] == pytest.approx((LOG2 + NEG_LOGSIG_1) / 2)


def test_pooled_apo_coef_weighs_each_pair():
    # diff loss, 2 APO and 2 human pairs: d loss / d r_gold_i = -apo_coef / 4 pooled, -apo_coef / 2 per term.
    grads = {}
    for normalization in ("per_term", "pooled"):
        r_gold = t(0.0, 0.0).requires_grad_()
        loss, _ = apo_reward_loss(
            r_gold,
            t(0.0, 0.0),
            t(1.0, 0.0),
            t(0.0, 0.0),
            apo_coef=0.25,
            pref_coef=1.0,
            kind="diff",
            normalization=normalization,
        )
        loss.backward()
        grads[normalization] = r_gold.grad.tolist()
    assert grads["per_term"] == pytest.approx([-0.125, -0.125])
    assert grads["pooled"] == pytest.approx([-0.0625, -0.0625])


def test_pooled_with_one_term_is_that_terms_mean():
    empty = torch.empty(0, dtype=torch.float64)
    loss, _ = apo_reward_loss(
        empty, empty, SCORES["r_chosen"], SCORES["r_rejected"], apo_coef=0.5, pref_coef=2.0, normalization="pooled"
    )
    assert loss.item() == pytest.approx(2.0 * (LOG2 + NEG_LOGSIG_1) / 2)


def test_an_unknown_normalization_is_refused():
    with pytest.raises(ValueError, match=r"normalization: must be one of per_term, pooled, got 'mean'"):
        apo_reward_loss(**SCORES, apo_coef=1.0, pref_coef=1.0, normalization="mean")


def test_the_config_key_defaults_to_per_term_and_names_its_values():
    assert load_config(None, []).reward.apo_normalization == "per_term"
    assert load_config(None, ["reward.apo_normalization=pooled"]).reward.apo_normalization == "pooled"
    with pytest.raises(ConfigError, match=r"^reward.apo_normalization: must be one of per_term, pooled; got 'mean'$"):
        load_config(None, ["reward.apo_normalization=mean"])


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory) -> str:
    """A random 1-layer BERT RM without dropout (train-mode scores equal eval-mode ones), MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from tests.conftest import minilm_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_tokenizer_dir())
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=1,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_rm")
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.mark.integration
@pytest.mark.parametrize("normalization", ["per_term", "pooled"])
def test_the_reward_learner_steps_on_the_configured_normalization(tiny_rm_dir, normalization):
    from apo_ray.actors.reward import RewardLearner
    from apo_ray.config import LearnerConfig

    apo = [PreferencePair("topic : river ", "the river is calm", "river river")]
    human = [PreferencePair(f"topic : night {i} ", "the night is bright", "bad night") for i in range(3)]
    learner = RewardLearner(
        tiny_rm_dir,
        reward=RewardConfig(batch_size=8, apo_normalization=normalization),
        learner=LearnerConfig(backend="torch"),
    )
    gold, sample = (torch.tensor(s, dtype=torch.float64) for s in learner.score_pairs(apo))
    chosen, rejected = (torch.tensor(s, dtype=torch.float64) for s in learner.score_pairs(human))
    apo_terms = -torch.nn.functional.logsigmoid(gold - sample)
    human_terms = -torch.nn.functional.logsigmoid(chosen - rejected)
    want = {
        "per_term": 0.5 * apo_terms.mean() + 2.0 * human_terms.mean(),
        "pooled": (0.5 * apo_terms.sum() + 2.0 * human_terms.sum()) / 4,
    }[normalization]
    # One minibatch holds all 4 pairs: the logged loss is the loss of the step, on the weights before it.
    stats = learner.apo_step(apo, human, apo_coef=0.5, pref_coef=2.0, epochs=1, seed=0)
    assert stats["rm/steps"] == 1.0
    assert stats["rm/loss"] == pytest.approx(want.item(), rel=1e-5)
