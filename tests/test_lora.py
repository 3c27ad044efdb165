"""LoRA learners (learner.lora, apo_ray/lora.py): an adapter step moves the adapter alone and only the adapter has
optimizer state; the reference is the policy's own base weights with the adapter off, equal to a frozen copy of
the initial model; the weights the learner hands on are the merged model under the base model's names, which the
rollout workers load and the sync's fingerprint check proves delivered; a round checkpoint holds the adapter in
PEFT's format (and the merged model when asked); a resumed learner continues exactly; 2 DeepSpeed ranks take the
step 1 rank takes; an adapter-only sync is served by vLLM and HF as the learner reads it, and a dropped one is caught
by the probe check and by the rollouts' adapter versions; a merged export generates what base plus adapter
generates. On the tests' tiny random Qwen2 (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from apo_ray.actors.policy import PolicyLearner
from apo_ray.actors.reference import ReferenceModel
from apo_ray.config import ConfigError, LearnerConfig, LoraConfig, ModelConfig, PolicyConfig, load_config
from apo_ray.game import TokenSample
from apo_ray.lora import check_targets_of
from apo_ray.placement import actor_plan

# Responses of 1 to 5 tokens, as tests/test_learner_group.py: 2 epochs of minibatches of 4 are 4 steps.
SAMPLES = [TokenSample((101, 2023 + i, 2003), tuple(3000 + 10 * i + j for j in range(i + 1))) for i in range(5)]
LORA = LoraConfig(enabled=True, rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])

# In-process DeepSpeed engines set the rendezvous variables in this process.
pytestmark = pytest.mark.usefixtures("restored_environment")


def lora_policy(
    path: str, backend: str = "torch", stage: int = 0, lora: LoraConfig = LORA, lr: float = 1e-2
) -> PolicyLearner:
    return PolicyLearner(**lora_kwargs(path, backend, stage, lora, lr))


def lora_kwargs(path: str, backend: str, stage: int, lora: LoraConfig = LORA, lr: float = 1e-2) -> dict:
    return dict(
        model_path=path,
        model=ModelConfig(),
        policy=PolicyConfig(batch_size=4, lr=lr),
        learner=LearnerConfig(backend=backend, zero_stage=stage, lora=lora),
        seed=0,
    )


def base_state(path: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def adapter_params(learner: PolicyLearner) -> dict[str, torch.Tensor]:
    return {name: p for name, p in learner.model.named_parameters() if p.requires_grad}


def adam_state_numel(learner: PolicyLearner) -> int:
    """Elements of Adam's first moment in the (innermost, under ZeRO) torch optimizer: the weights it steps."""
    optimizer = learner.engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(state["exp_avg"].numel() for state in inner.state.values())


def test_an_adapter_step_changes_only_the_adapter_which_alone_has_optimizer_state(tiny_lm_dir):
    learner = lora_policy(tiny_lm_dir)
    trainable = adapter_params(learner)
    # 2 layers x 3 target modules x (A, B).
    assert len(trainable) == 12 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = {name: t.clone() for name, t in learner.model.state_dict().items()}
    learner.sft_step(SAMPLES, epochs=2, seed=0)
    after = learner.model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    # Every B starts at 0 and moves; an A moves once its B is non-zero. No base weight moves by a bit.
    assert changed == set(trainable)
    state = learner.engine.optimizer.state
    assert len(state) == len(trainable) and all(p.requires_grad for p in state)
    assert adam_state_numel(learner) == sum(p.numel() for p in trainable.values())


def test_the_reference_is_the_policys_base_weights_with_the_adapter_off(tiny_lm_dir):
    learner = lora_policy(tiny_lm_dir)
    frozen = ReferenceModel(tiny_lm_dir, model=ModelConfig())
    learner.sft_step(SAMPLES, epochs=2, seed=0)
    want, mask = frozen.token_logprobs(SAMPLES)
    got, got_mask = learner.reference_token_logprobs(SAMPLES)
    assert torch.equal(got, want) and torch.equal(got_mask, mask)
    assert learner.reference_sequence_logprobs(SAMPLES) == frozen.sequence_logprobs(SAMPLES)
    # ... while the policy itself has moved away from it, and the adapter is back on after the reference's pass.
    policy, _ = learner.token_logprobs(SAMPLES)
    assert (policy - want)[mask.bool()].abs().max() > 1e-2
    assert torch.equal(learner.token_logprobs(SAMPLES)[0], policy)


def test_the_exported_weights_are_the_merged_model_under_the_base_models_names(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    from apo_ray.modeling import SampleLogprobs

    learner = lora_policy(tiny_lm_dir)
    learner.sft_step(SAMPLES, epochs=2, seed=0)
    base, merged = base_state(tiny_lm_dir), learner.state_dict()
    assert sorted(merged) == sorted(base)
    assert all(merged[n].dtype == base[n].dtype and merged[n].shape == base[n].shape for n in base)
    targets = {n for n in base if n.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))}
    assert len(targets) == 6
    assert all(torch.equal(merged[n], base[n]) for n in set(base) - targets)
    # W + (alpha / r) B A, by hand from the adapter's own weights.
    adapter = adapter_params(learner)
    prefix = "base_model.model.model.layers.1.self_attn.v_proj"
    a, b = adapter[f"{prefix}.lora_A.default.weight"], adapter[f"{prefix}.lora_B.default.weight"]
    want = base["model.layers.1.self_attn.v_proj.weight"] + (8.0 / 4) * b.detach() @ a.detach()
    torch.testing.assert_close(merged["model.layers.1.self_attn.v_proj.weight"], want, rtol=0, atol=1e-6)
    assert (want - base["model.layers.1.self_attn.v_proj.weight"]).abs().max() > 1e-3
    # A plain HF model of the merged weights reads the samples as the adapted policy does.
    plain = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    plain.load_state_dict(merged)
    got, mask = SampleLogprobs(plain, learner.tokenizer.pad_token_id).tokens(SAMPLES)
    torch.testing.assert_close(got, learner.token_logprobs(SAMPLES)[0], rtol=0, atol=1e-5)


def test_target_modules_the_model_lacks_are_refused_naming_the_key(tiny_lm_dir):
    bad = LORA.model_copy(update={"target_modules": ["q_proj", "c_attn"]})
    message = (
        r"^learner\.lora\.target_modules: Qwen2ForCausalLM has no module named c_attn; its linear layers are .*q_proj"
    )
    # Before any actor starts (train.prepare), from the config alone ...
    with pytest.raises(ConfigError, match=message):
        check_targets_of(tiny_lm_dir, bad.target_modules)
    # ... and in the learner itself.
    with pytest.raises(ConfigError, match=message):
        lora_policy(tiny_lm_dir, lora=bad)
    with pytest.raises(ConfigError, match=r"^learner\.lora\.target_modules: 'all-linear' stands alone"):
        check_targets_of(tiny_lm_dir, ["all-linear", "q_proj"])


def test_the_config_refuses_what_lora_does_not_do_yet_naming_the_key():
    with pytest.raises(ConfigError, match=r"^learner\.lora\.roles: LoRA on the reward learner is not built yet"):
        load_config(None, ["learner.lora.enabled=true", "learner.lora.roles=[policy,reward]"])
    with pytest.raises(ConfigError, match=r"^rollout\.weight_sync: 'nccl' sends the policy's parameters as they are"):
        load_config(None, ["learner.lora.enabled=true", "rollout.weight_sync=nccl"])
    # With LoRA off its keys are named as unread, not refused: one recipe serves both arms.
    cfg = load_config(None, ["learner.lora.rank=8", "checkpoint.merge_lora=true"])
    assert "rank" not in cfg.to_dict()["learner"]["lora"]


def test_no_reference_actor_is_planned_unless_asked_for():
    def roles(*overrides: str) -> list[str]:
        return [role.name for role in actor_plan(load_config(None, list(overrides)))]

    assert "reference" in roles()
    assert "reference" not in roles("learner.lora.enabled=true")
    assert "reference" in roles("learner.lora.enabled=true", "learner.lora.reference_actor=true")


def test_a_checkpoint_holds_the_adapter_in_peft_format_and_the_merged_model(tiny_lm_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from apo_ray.modeling import SampleLogprobs

    learner = lora_policy(tiny_lm_dir)
    learner.sft_step(SAMPLES, epochs=2, seed=0)
    learner.save_checkpoint(str(tmp_path / "adapter_only"))
    assert not (tmp_path / "adapter_only" / "merged").exists()
    learner.save_checkpoint(str(tmp_path / "policy"), merge_lora=True)
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in (tmp_path / "policy").iterdir()}
    assert not (tmp_path / "policy" / "model.safetensors").exists()
    want = learner.token_logprobs(SAMPLES)[0]
    # peft loads the adapter onto the base model and reads the samples as the learner does.
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "policy").eval()
    pad = learner.tokenizer.pad_token_id
    assert torch.equal(SampleLogprobs(reloaded, pad).tokens(SAMPLES)[0], want)
    # The merged model is a plain HF model: the learner's exported weights, exactly. So is `save`'s directory, which
    # the disk weight sync has the workers load.
    exported = learner.state_dict()
    learner.save(str(tmp_path / "disk_sync"))
    for directory in (tmp_path / "policy" / "merged", tmp_path / "disk_sync"):
        merged = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).state_dict()
        assert sorted(merged) == sorted(exported) and all(torch.equal(t, exported[n]) for n, t in merged.items())


@pytest.mark.parametrize("backend, stage", [("torch", 0), ("deepspeed", 2), ("deepspeed", 3)])
def test_a_resumed_learner_continues_exactly(tiny_lm_dir, tmp_path, backend, stage):
    first = lora_policy(tiny_lm_dir, backend, stage)
    first.sft_step(SAMPLES, epochs=1, seed=0)
    first.save_state(str(tmp_path / "engine_policy"))
    first.sft_step(SAMPLES, epochs=1, seed=1)
    uninterrupted = first.state_dict()
    resumed = lora_policy(tiny_lm_dir, backend, stage)
    resumed.load_state(str(tmp_path / "engine_policy"))
    resumed.sft_step(SAMPLES, epochs=1, seed=1)
    got = resumed.state_dict()
    assert all(torch.equal(got[n], uninterrupted[n]) for n in uninterrupted)
    assert any(not torch.equal(got[n], t) for n, t in base_state(tiny_lm_dir).items())


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_steps_the_adapter_alone_at_every_zero_stage(tiny_lm_dir, stage):
    learner = lora_policy(tiny_lm_dir, "deepspeed", stage)
    reference = learner.reference_token_logprobs(SAMPLES)[0]
    learner.sft_step(SAMPLES, epochs=2, seed=0)
    # The optimizer (ZeRO's flat fp32 partitions) holds the adapter alone: per layer r (in + out) for q_proj
    # (128 -> 128), v_proj (128 -> 2 heads x 64) and down_proj (256 -> 128), of the model's 4 million weights.
    adapter = sum(p.numel() for p in adapter_params(learner).values())
    assert adam_state_numel(learner) == adapter == 2 * 4 * ((128 + 128) + (128 + 128) + (256 + 128))
    base, merged = base_state(tiny_lm_dir), learner.state_dict()
    moved = {n for n in base if not torch.equal(merged[n], base[n])}
    assert moved == {n for n in base if n.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))}
    # The base weights stayed: the adapter-off reference reads the samples as before the steps.
    assert torch.equal(learner.reference_token_logprobs(SAMPLES)[0], reference)


@pytest.mark.integration
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_take_the_adapter_step_one_rank_takes(stage, ray_cluster, tiny_lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from apo_ray.actor_group import wait_until_ready
    from apo_ray.cluster import POLICY_AS_REFERENCE
    from apo_ray.learner_group import LearnerGroup, RenamedMethods, gather
    from tests.test_learner_group import assert_same_step

    initial = base_state(tiny_lm_dir)
    one = lora_policy(tiny_lm_dir, "deepspeed", stage, lr=1e-3)
    want_stats = one.sft_step(SAMPLES, epochs=2, seed=0)
    want = one.state_dict()
    group = LearnerGroup(
        PolicyLearner,
        2,
        role="policy",
        name_prefix=f"lora-test-zero{stage}",
        kwargs=lora_kwargs(tiny_lm_dir, "deepspeed", stage, lr=1e-3),
        num_cpus_per_rank=1,
        env={"DS_ACCELERATOR": "cpu"},
    )
    try:
        wait_until_ready([group.group], 600)
        stats = group.call("sft_step", SAMPLES, epochs=2, seed=0)
        assert stats["policy/grad_norm"] == pytest.approx(want_stats["policy/grad_norm"], rel=1e-6)
        rank0, rank1 = group.call_all("state_dict")
        assert rank1 is None
        assert_same_step(rank0, want, initial)
        # The run's reference is the group's base weights, adapter off, on every rank: the initial model's.
        reference = RenamedMethods(group, POLICY_AS_REFERENCE)
        got = gather(reference.sequence_logprobs.remote(SAMPLES))
        assert got == ReferenceModel(tiny_lm_dir, model=ModelConfig()).sequence_logprobs(SAMPLES)
        with pytest.raises(AttributeError, match="^sft_step: this role is the policy learner's"):
            reference.sft_step  # noqa: B018 - the reference trains nothing
        # A round checkpoint of the group: rank 0 writes the adapter and the merged model, after ZeRO-3's gather.
        group.call("save_checkpoint", str(tmp_path / "policy"), merge_lora=True)
        assert (tmp_path / "policy" / "adapter_model.safetensors").is_file()
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "policy" / "merged").state_dict()
        assert sorted(merged) == sorted(rank0) and all(torch.equal(merged[n], rank0[n]) for n in rank0)
    finally:
        group.kill()


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_a_sync_delivers_the_merged_weights_and_the_fingerprint_check_proves_it(
    backend, ray_cluster, tiny_lm_dir, tmp_path
):
    import ray

    from apo_ray.rollout_pool import RolloutPool, RolloutWorkerSpec
    from apo_ray.sync_backends import make_backend

    spec = RolloutWorkerSpec(
        tiny_lm_dir, backend, max_new_tokens=8, max_prompt_tokens=32, temperature=0.0, max_model_len=64, dtype="float32"
    )
    pool = RolloutPool(spec, 1, num_cpus_per_worker=1, name_prefix=f"lora-test-sync-{backend}")
    learner = ray.remote(PolicyLearner).options(num_cpus=0).remote(**lora_kwargs(tiny_lm_dir, "torch", 0))
    try:
        base = base_state(tiny_lm_dir)
        before = ray.get(pool.workers[0].weights_checksum.remote())
        ray.get(learner.sft_step.remote(SAMPLES, epochs=2, seed=0))
        merged = ray.get(learner.state_dict.remote())
        # The fingerprint check (rollout.verify_sync) compares every engine tensor with the learner's merged one;
        # it raises WeightsDiffer on a worker that holds anything else.
        assert pool.verify_sync
        tied = {"lm_head.weight"}
        checksum = sum(t.double().abs().sum().item() for n, t in merged.items() if n not in tied)
        base_checksum = sum(t.double().abs().sum().item() for n, t in base.items() if n not in tied)
        assert before == pytest.approx(base_checksum, rel=1e-9) and abs(checksum - base_checksum) > 1e-3
        # Both strategies that take LoRA's merged weights (nccl is refused with LoRA).
        for version, strategy in enumerate(
            (make_backend("object_store", bucket_bytes=1 << 20), make_backend("disk", root=tmp_path)), 1
        ):
            stats = pool.sync_from(learner, version, weight_sync=strategy)
            assert pool.versions() == [version] and stats["timing/sync_fingerprint"] > 0
            # What the engine holds is the merged model, not the base it started from.
            assert ray.get(pool.workers[0].weights_checksum.remote()) == pytest.approx(checksum, rel=1e-9)
    finally:
        pool.shutdown()
        ray.kill(learner)


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_an_adapter_sync_is_served_and_a_dropped_one_is_caught_naming_worker_and_version(
    backend, ray_cluster, tiny_lm_dir, tmp_path
):
    import json

    import ray

    from apo_ray.fault_injection import ENV
    from apo_ray.game import WeightsDiffer, check_adapter_versions
    from apo_ray.rollout_pool import RolloutPool, RolloutWorkerSpec
    from apo_ray.sync_backends import make_backend

    spec = RolloutWorkerSpec(
        tiny_lm_dir, backend, max_new_tokens=8, max_prompt_tokens=32, temperature=0.0, max_model_len=64, dtype="float32"
    )
    # Worker 1 drops the first adapter it is sent and still reports the sync done (verl #7495's silent failure).
    drop = {"kind": "drop", "phase": "sync", "worker": 1, "once": str(tmp_path / "dropped")}
    name = f"lora-test-adapter-{backend}"
    # Buckets of 8 KiB: the adapter's 4 x 6 tensors of up to 4 KiB take several.
    pool = RolloutPool(
        spec,
        2,
        num_cpus_per_worker=0.5,
        name_prefix=name,
        env={ENV: json.dumps([drop])},
        weight_sync=make_backend("lora_adapter", bucket_bytes=8 << 10, rank=LORA.rank),
    )
    learner = ray.remote(PolicyLearner).options(num_cpus=0).remote(**lora_kwargs(tiny_lm_dir, "torch", 0))
    try:
        ray.get(learner.sft_step.remote(SAMPLES, epochs=2, seed=0))
        want, mask = ray.get(learner.token_logprobs.remote(SAMPLES))
        base, _ = ray.get(learner.reference_token_logprobs.remote(SAMPLES))
        picked = mask.bool()

        def served(worker: int) -> torch.Tensor:
            got = ray.get(pool.workers[worker].response_logprobs.remote(SAMPLES))
            return torch.tensor([v for row in got for v in row])

        assert (want - base)[picked].abs().max() > 1e-2
        with pytest.raises(
            WeightsDiffer,
            match=(
                rf"^rollout worker {name}-1 on node \S+ does not serve the LoRA adapter it was sent \(adapter version "
                r"1\): its log-probs of the probe sample differ from the learner's by up to .*; they are the base "
                r"model's, no adapter"
            ),
        ):
            pool.sync_from(learner, 1)
        # What each engine serves: worker 0 the learner's adapter, worker 1 still the base model.
        torch.testing.assert_close(served(0), want[picked], rtol=0, atol=1e-4)
        torch.testing.assert_close(served(1), base[picked], rtol=0, atol=1e-4)
        # The samples name the adapter that made them, read from each engine: worker 1's are caught before a
        # learner trains on them.
        rollouts = pool.generate(["one prompt", "another prompt"], n=1)
        assert [(r.worker, r.policy_version, r.adapter_version) for r in rollouts] == [(0, 1, 1), (1, 1, 0)]
        with pytest.raises(
            WeightsDiffer,
            match=r"^rollout worker 1 sampled prompt 1 with LoRA adapter version 0, "
            r"but was synced to version 1",
        ):
            check_adapter_versions(rollouts)
        # The fault fired once: the next sync reaches both engines, and each reads the samples as the learner does.
        stats = pool.sync_from(learner, 2)
        assert stats["sync/probe_s"] > 0 and stats["sync/probe_effect"] > 2 and stats["sync/bytes"] > 8 << 10
        for worker in range(2):
            torch.testing.assert_close(served(worker), want[picked], rtol=0, atol=1e-4)
        rollouts = pool.generate(["one prompt", "another prompt"], n=1)
        check_adapter_versions(rollouts)
        assert {r.adapter_version for r in rollouts} == {2}
    finally:
        pool.shutdown()
        ray.kill(learner)


def test_the_probe_check_compares_with_the_learner_within_the_dtypes_tolerance():
    from apo_ray.lora import probe_effect, probe_mismatch

    learner, base = [-1.0, -2.0, -3.0], [-1.5, -2.0, -3.0]
    assert probe_mismatch([-1.0005, -2.0, -2.9995], learner, base, "float32") is None
    assert probe_mismatch([-1.05, -2.0, -3.0], learner, base, "bfloat16") is None
    assert probe_mismatch([-1.002, -2.0, -3.0], learner, base, "float32") == (
        "its log-probs of the probe sample differ from the learner's by up to 0.002 (tolerance 0.001 in float32); "
        "they are neither the learner's nor the base's (up to 0.498 from the base model's)"
    )
    assert "they are the base model's, no adapter" in probe_mismatch(base, learner, base, "float32")
    assert probe_effect(learner, base, "float32") == pytest.approx(500)


@pytest.mark.integration
@pytest.mark.parametrize(
    "overrides",
    [
        # A pair method reads the reference's sequence log-probs for its loss; hf sampler, torch learner, merged sync.
        ("method=dpo", "rollout.backend=hf", "learner.backend=torch", "learner.lora.sync=merged"),
        # The default stack: vLLM rollouts, DeepSpeed ZeRO-2, RJS, adapter-only sync.
        (),
    ],
)
def test_a_lora_round_syncs_the_policy_and_checkpoints_its_adapter(ray_cluster, tmp_path, overrides):
    from transformers import AutoModelForCausalLM

    from tests.test_game_round import _play

    prepared, _, rows = _play(
        tmp_path, *overrides, "learner.lora.enabled=true", "learner.lora.rank=4", "checkpoint.merge_lora=true"
    )
    assert [r["round"] for r in rows] == [0, 1] and "ceiling/reference" not in rows[0]
    # At round 0 the policy is its own reference (the adapter's B is 0): the KL is 0, read with the adapter off.
    assert rows[0]["eval/kl"] == pytest.approx(0.0, abs=1e-4) and rows[1]["eval/kl"] != 0.0
    # The sampler held the learner's weights (the sync's check passed, or the run would have stopped): its log-probs
    # of its samples are the adapted learner's. The merged weights are checked by their fingerprint, the adapter by
    # the probe sample's log-probs, which the adapter moved beyond the tolerance.
    assert rows[1]["rollout/logprob_diff"] < 1e-4
    if "learner.lora.sync=merged" in overrides:
        assert rows[1]["timing/sync_fingerprint"] > 0 and "sync/probe_s" not in rows[1]
    else:
        assert rows[1]["sync/probe_s"] > 0 and rows[1]["sync/probe_effect"] > 2
    if "method=dpo" in overrides:
        assert rows[1]["flops/logprobs"] > 0  # the reference's forwards, counted on the policy learner
    policy = prepared.run_dir / "checkpoints/round_0001/policy"
    assert (policy / "adapter_config.json").is_file() and (policy / "adapter_model.safetensors").is_file()
    before = AutoModelForCausalLM.from_pretrained(prepared.policy_path).state_dict()
    after = AutoModelForCausalLM.from_pretrained(policy / "merged").state_dict()
    assert sorted(after) == sorted(before) and any(not torch.equal(before[k], after[k]) for k in before)


def test_gradient_checkpointing_takes_the_same_adapter_step(tiny_lm_dir):
    """The frozen embedding gives the checkpointed layers inputs without grad; the adapter's grads still flow."""
    plain = lora_policy(tiny_lm_dir)
    kwargs = lora_kwargs(tiny_lm_dir, "torch", 0)
    kwargs["learner"] = kwargs["learner"].model_copy(update={"gradient_checkpointing": True})
    checkpointed = PolicyLearner(**kwargs)
    want, got = plain.sft_step(SAMPLES, epochs=1, seed=0), checkpointed.sft_step(SAMPLES, epochs=1, seed=0)
    assert got["policy/grad_norm"] == want["policy/grad_norm"] > 0
    assert all(torch.equal(t, plain.state_dict()[n]) for n, t in checkpointed.state_dict().items())


def test_a_merged_export_generates_what_base_plus_adapter_generates(tiny_lm_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from apo_ray.cli import main as cli_main

    learner = lora_policy(tiny_lm_dir)
    learner.sft_step(SAMPLES, epochs=2, seed=0)
    # A game run directory: `export --merge` finds the latest round's adapter.
    round_dir = tmp_path / "run" / "checkpoints" / "round_0001"
    learner.save_checkpoint(str(round_dir / "policy"))
    (tmp_path / "run" / "checkpoints" / "LATEST").write_text("1")
    assert cli_main(["export", "--merge", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert not any(".lora_" in name for name in merged.state_dict())
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32), round_dir / "policy"
    ).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    prompts = torch.tensor([list(s.prompt_ids) for s in SAMPLES])
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=learner.tokenizer.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        want = adapted.generate(input_ids=prompts, **settings)
        assert torch.equal(merged.generate(input_ids=prompts, **settings), want)
        # ... which is not what the base model generates: the adapter moved the policy.
        assert not torch.equal(base.generate(input_ids=prompts, **settings), want)
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
    # Anything else is refused, naming what export looks for.
    assert cli_main(["export", "--merge", tiny_lm_dir, str(tmp_path / "none")]) == 2
