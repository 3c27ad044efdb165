"""`apo-ray rm` and `apo-ray sft` as Ray Train jobs (TorchTrainer + DeepSpeed ZeRO-2 on CPU, 2 workers): a worker
killed mid-epoch is replaced and the run ends where an uninterrupted one does; the outputs are what the game
loads. Tiny builtin-vocabulary models and the builtin task's pairs, so each job takes seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from apo_ray.config import RMStageConfig, SFTStageConfig, load_stage_config
from apo_ray.data import DataError
from apo_ray.stages.runner import load_for_resume, prepare_stage, run_stage
from apo_ray.stages.worker import ATTEMPTS_FILE, FAILURE_MARKER

N_TRAIN, BATCH = 48, 8  # 6 steps an epoch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama RM with attention dropout (so a resumed run must restore each rank's RNG to match),
    a tiny Llama policy, and JSONL files of the builtin task's pairs and SFT texts."""
    from transformers import LlamaForSequenceClassification

    from apo_ray.builtin.models import TinyModelSpec, _tiny_config, make_policy_model, make_tokenizer
    from apo_ray.builtin.task import make_sft_data, make_task

    root = tmp_path_factory.mktemp("stages")
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(_tiny_config(tokenizer, TinyModelSpec(), num_labels=1, attention_dropout=0.2))
    rm.save_pretrained(root / "rm_base")
    tokenizer.save_pretrained(root / "rm_base")
    make_policy_model(root / "policy_base", tokenizer)
    task = make_task(0, n_pairs=N_TRAIN, n_gold=4, n_policy_prompts=4, n_eval_pairs=24)
    for name, pairs in (("pairs", task.pairs), ("eval_pairs", task.eval_pairs)):
        (root / f"{name}.jsonl").write_text(
            "".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n" for p in pairs)
        )
    texts = make_sft_data(0, 64)
    for name, rows in (("sft", texts[:N_TRAIN]), ("sft_eval", texts[N_TRAIN:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))
    return {name: root / name for name in ("rm_base", "policy_base")} | {
        name: root / f"{name}.jsonl" for name in ("pairs", "eval_pairs", "sft", "sft_eval")
    }


def rm_config(tiny, run_dir: Path, *extra: str) -> RMStageConfig:
    return load_stage_config(
        RMStageConfig,
        None,
        [
            f"base_model={tiny['rm_base']}",
            f"train.path={tiny['pairs']}",
            f"eval.path={tiny['eval_pairs']}",
            "workers.num_workers=2",
            f"batch_size={BATCH}",
            "epochs=1",
            "lr=3e-3",
            "lr_scheduler_type=linear",
            "warmup_ratio=0.3",
            "checkpoint_every=2",
            "keep_checkpoints=1",
            f"run_dir={run_dir}",
            *extra,
        ],
    )


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted_rm(ray_cluster, tiny, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rm") / "uninterrupted"
    return run_dir, run_stage(prepare_stage(rm_config(tiny, run_dir)))


@pytest.mark.integration
def test_a_worker_killed_mid_epoch_is_replaced_and_the_run_ends_as_an_uninterrupted_one(
    uninterrupted_rm, tiny, tmp_path
):
    reference_dir, reference = uninterrupted_rm
    run_dir = tmp_path / "killed"
    # Rank 1 exits after step 5, with checkpoints written after steps 2 and 4: new workers resume from the
    # latest one Ray Train registered (step 4's, or step 2's when the controller had not yet collected step 4's
    # report when the worker died) and replay the steps after it.
    summary = run_stage(prepare_stage(rm_config(tiny, run_dir)), fail_at_step=5)

    assert (run_dir / FAILURE_MARKER).is_file()
    attempts = [json.loads(line) for line in (run_dir / ATTEMPTS_FILE).read_text().splitlines()]
    assert len(attempts) == 2 and attempts[0]["resumed_from_step"] == 0 and attempts[1]["resumed_from_step"] in (2, 4)
    assert summary["global_step"] == reference["global_step"] == 6
    final, expected = weights(run_dir / "model"), weights(reference_dir / "model")
    assert final.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=0, atol=1e-6, msg=name)
    base = weights(tiny["rm_base"])
    assert any(not torch.equal(base[name], expected[name]) for name in expected), "training moved no weight"
    assert summary["eval"] == pytest.approx(reference["eval"], abs=1e-6)
    # The failed attempt's rows after step 4 were dropped: each step is logged once, with the same loss.
    rows, reference_rows = metric_rows(run_dir), metric_rows(reference_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in reference_rows] == [1, 2, 3, 4, 5, 6, 6]
    assert [r.get("rm/loss") for r in rows] == pytest.approx([r.get("rm/loss") for r in reference_rows], abs=1e-6)
    # On the schedule's curve (2 warm-up steps of 6, then a linear decay) across the restart.
    assert [r["learning_rate"] for r in rows[:-1]] == pytest.approx(
        [3e-3 * f for f in (1 / 2, 1, 1, 3 / 4, 1 / 2, 1 / 4)]
    )


@pytest.mark.integration
def test_rm_output_is_what_the_game_loads_and_scores_as_reported(uninterrupted_rm, tiny):
    from apo_ray.actors.reward import RewardLearner
    from apo_ray.config import LearnerConfig, RewardConfig
    from apo_ray.data import load_pairs
    from apo_ray.evaluation import preference_accuracy

    run_dir, summary = uninterrupted_rm
    assert summary["data"]["train"]["pairs"] == N_TRAIN and summary["data"]["eval"]["pairs"] == 24
    # As model.reward_path of `apo-ray train`: the reward learner, with the truncation length it was trained at.
    learner = RewardLearner(
        str(run_dir / "model"), reward=RewardConfig(max_length=256), learner=LearnerConfig(), trainable=False
    )
    cfg = rm_config(tiny, run_dir)
    chosen, rejected = learner.score_pairs(load_pairs(cfg.eval))
    assert preference_accuracy(chosen, rejected) == summary["eval"]["rm/acc"]
    # Checkpoints are kept as configured, each with an HF model.
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    assert [c.name for c in checkpoints] == ["step_0000006"]
    assert (checkpoints[0] / "model" / "config.json").is_file()


@pytest.mark.integration
def test_a_mean_pooled_rm_trains_on_two_workers_and_is_what_the_game_loads(ray_cluster, tiny, tmp_path):
    """pooling=mean under ZeRO-2 on 2 workers, from a headless encoder: the written RM is rebuilt with its
    pooling by the game's reward learner, which scores the eval pairs as the stage reported."""
    from transformers import BertConfig, BertModel

    from apo_ray.actors.reward import RewardLearner
    from apo_ray.builtin.models import make_tokenizer
    from apo_ray.config import LearnerConfig, RewardConfig
    from apo_ray.data import load_pairs
    from apo_ray.evaluation import preference_accuracy
    from apo_ray.mean_pooling import MeanPooledForSequenceClassification

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            pad_token_id=tokenizer.pad_token_id,
        ),
        add_pooling_layer=False,
    ).save_pretrained(tmp_path / "encoder")
    tokenizer.save_pretrained(tmp_path / "encoder")
    run_dir = tmp_path / "run"
    cfg = rm_config(tiny, run_dir, f"base_model={tmp_path / 'encoder'}", "pooling=mean")
    summary = run_stage(prepare_stage(cfg))

    learner = RewardLearner(
        str(run_dir / "model"), reward=RewardConfig(max_length=256), learner=LearnerConfig(), trainable=False
    )
    assert isinstance(learner.model, MeanPooledForSequenceClassification)
    trained, base = weights(run_dir / "model"), weights(tmp_path / "encoder")
    embeddings = "embeddings.word_embeddings.weight"
    assert not torch.equal(trained[f"encoder.{embeddings}"], base[embeddings]), "training moved no encoder weight"
    chosen, rejected = learner.score_pairs(load_pairs(cfg.eval))
    assert preference_accuracy(chosen, rejected) == summary["eval"]["rm/acc"]


@pytest.mark.integration
def test_resume_adds_an_epoch_from_the_last_checkpoint(uninterrupted_rm, tiny, tmp_path):
    import shutil

    source_dir, _ = uninterrupted_rm
    run_dir = tmp_path / "resumed"
    shutil.copytree(source_dir, run_dir)
    # The copy's config still names the original run directory; resuming puts it here.
    cfg = load_for_resume(RMStageConfig, str(run_dir), ["epochs=2"])
    summary = run_stage(prepare_stage(cfg, resume=True))
    assert summary["global_step"] == 12
    attempts = [json.loads(line) for line in (run_dir / ATTEMPTS_FILE).read_text().splitlines()]
    assert [a["resumed_from_step"] for a in attempts] == [0, 6]
    with pytest.raises(Exception, match="workers.num_workers: .* resume it with 2"):
        load_for_resume(RMStageConfig, str(run_dir), ["workers.num_workers=1"])


@pytest.mark.integration
def test_a_run_stopped_after_an_epoch_resumes_on_the_whole_runs_lr_schedule(ray_cluster, tiny, tmp_path):
    run_dir = tmp_path / "paused"
    paused = run_stage(prepare_stage(rm_config(tiny, run_dir, "epochs=2")), stop_after_epoch=1)
    assert paused["global_step"] == 6 and paused["epochs_done"] == 1 and "rm/acc" in paused["eval"]
    assert (run_dir / "model" / "config.json").is_file()
    summary = run_stage(prepare_stage(load_for_resume(RMStageConfig, str(run_dir), []), resume=True))
    assert summary["global_step"] == 12 and summary["epochs_done"] == 2
    # 12 steps, 4 of them warm-up (ceil(0.3 * 12)): the first epoch did not decay to 0 on a 6-step horizon.
    learning_rates = [r["learning_rate"] for r in metric_rows(run_dir) if "learning_rate" in r]
    assert learning_rates == pytest.approx(
        [3e-3 * f for f in (1 / 4, 2 / 4, 3 / 4, 1)] + [3e-3 * (1 - k / 8) for k in range(8)]
    )
    # One uninterrupted run that evaluates after every epoch sees what the paused run saw after each invocation.
    every_epoch = run_stage(prepare_stage(rm_config(tiny, tmp_path / "each", "epochs=2", "eval_every_epoch=true")))
    epochs = [[e["epoch"] for e in run["eval_by_epoch"]] for run in (every_epoch, summary)]
    assert epochs == [[1, 2], [1, 2]]
    for logged, paused_or_resumed in zip(every_epoch["eval_by_epoch"], summary["eval_by_epoch"]):
        assert logged == pytest.approx(paused_or_resumed, rel=1e-5)
    assert every_epoch["eval_by_epoch"][-1] == pytest.approx({"epoch": 2, **every_epoch["eval"]})
    assert paused["eval_by_epoch"][0] == pytest.approx({"epoch": 1, **paused["eval"]})


@pytest.mark.integration
def test_sft_lowers_held_out_loss_and_its_output_samples_with_vllm(ray_cluster, tiny, tmp_path):
    from apo_ray.actors.rollout import RolloutWorker
    from apo_ray.stages.sft import SFTTask
    from apo_ray.stages.task import load_stage_data

    cfg = load_stage_config(
        SFTStageConfig,
        None,
        [
            f"base_model={tiny['policy_base']}",
            f"train.path={tiny['sft']}",
            f"eval.path={tiny['sft_eval']}",
            "workers.num_workers=2",
            f"batch_size={BATCH}",
            "epochs=2",
            "lr=3e-3",
            "checkpoint_every=4",
            "max_prompt_tokens=16",
            "max_response_tokens=16",
            f"run_dir={tmp_path / 'sft'}",
        ],
    )
    base_task, data = SFTTask(cfg), load_stage_data(cfg)
    before = base_task.eval_metrics(base_task.eval_records(base_task.load_model().eval(), data.eval))
    summary = run_stage(prepare_stage(cfg))
    # One text per prompt (two of the 48 share a prompt), in full batches of 8.
    assert summary["data"]["train"]["examples"] == len(data.train) == 47 and summary["global_step"] == 2 * 5
    assert summary["eval"]["sft/eval_loss"] < before["sft/eval_loss"] - 1.0, (before, summary["eval"])
    # As model.policy_path of `apo-ray train`: the rollout worker's vLLM engine samples from it.
    worker = (
        ray.remote(RolloutWorker)
        .options(num_cpus=1)
        .remote(summary["model"], "vllm", max_new_tokens=8, max_prompt_tokens=16, temperature=0.0, max_model_len=32)
    )
    try:
        rollouts = ray.get(worker.generate.remote([e.prompt for e in data.eval[:2]], [0, 1], n=1))
    finally:
        ray.kill(worker)
    assert [len(r.response_token_ids) for r in rollouts] and all(r.response_token_ids for r in rollouts)


def test_bad_stage_input_fails_before_ray_naming_the_key_or_line(tiny, tmp_path):
    from apo_ray.config import ConfigError

    with pytest.raises(ConfigError, match="batch_size: 9 does not split evenly over workers.num_workers=2"):
        rm_config(tiny, tmp_path / "a", "batch_size=9")
    with pytest.raises(ConfigError, match="base_model: required"):
        load_stage_config(RMStageConfig, None, [f"train.path={tiny['pairs']}"])
    with pytest.raises(ConfigError, match="lr: must be > 0"):
        rm_config(tiny, tmp_path / "a", "lr=0")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(tiny["pairs"].read_text().splitlines()[0] + "\n" + '{"prompt": "x", "chosen": "y"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing field 'rejected'"):
        prepare_stage(rm_config(tiny, tmp_path / "b", f"train.path={bad}"))
    with pytest.raises(DataError, match="train.path: .* fewer than one batch"):
        prepare_stage(rm_config(tiny, tmp_path / "c", "batch_size=64"))
    with pytest.raises(DataError, match="eval.path: .*: file not found"):
        prepare_stage(rm_config(tiny, tmp_path / "d", f"eval.path={tmp_path / 'missing.jsonl'}"))
    assert not any((tmp_path / name).exists() for name in "bcd")
