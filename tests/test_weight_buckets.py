"""Bucketed weight sync (apo_ray/named_tensors.py): how tensors fill buckets, and a round trip of the
real PolicyLearner's exported weights, dtypes and tied weights included."""

from __future__ import annotations

import pytest
import torch

from apo_ray.actors.policy import PolicyLearner
from apo_ray.builtin.models import make_policy_model, make_tokenizer
from apo_ray.config import LearnerConfig, ModelConfig, PolicyConfig
from apo_ray.fingerprint import fingerprint
from apo_ray.named_tensors import pack_buckets, read_checkpoint_dir, unpack_bucket


def layout(buckets) -> list[list[tuple[tuple[str, ...], int]]]:
    return [[(t.names, t.nbytes) for t in bucket.tensors] for bucket in buckets]


def test_buckets_fill_greedily_and_an_oversized_tensor_gets_its_own():
    embedding = torch.zeros(10, 3)  # 120 bytes
    weights = [
        ("embed", embedding),
        ("norm", torch.zeros(4)),
        ("bias", torch.zeros(2, dtype=torch.float64)),
        ("head", embedding),
        ("big", torch.zeros(100)),
        ("last", torch.zeros(1, dtype=torch.int8)),
        ("tail", torch.zeros(2, dtype=torch.int8)),
    ]
    buckets = list(pack_buckets(weights, bucket_bytes=152))
    # embed (with its alias head, packed once) 120 bytes, norm 16 and bias 16 fill 152 exactly; big (400) is
    # larger than a bucket: one of its own; last and tail share the third.
    assert layout(buckets) == [
        [(("embed", "head"), 120), (("norm",), 16), (("bias",), 16)],
        [(("big",), 400)],
        [(("last",), 1), (("tail",), 2)],
    ]
    assert [b.nbytes for b in buckets] == [152, 400, 3]


def test_a_bucket_views_the_weights_instead_of_copying_them():
    """The learner's side of a sync copies once, into the object store: the bucket itself holds views."""
    weights = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}
    (bucket,) = pack_buckets(weights, 1 << 20)
    assert [a.ctypes.data for a in bucket.arrays] == [t.data_ptr() for t in weights.values()]
    # A copy only where a view cannot be: a tensor that is not contiguous.
    (bucket,) = pack_buckets({"t": weights["w"].t()}, 1 << 20)
    assert bucket.arrays[0].ctypes.data != weights["w"].data_ptr()


def test_unpacked_tensors_equal_the_packed_ones_whatever_their_dtype_shape_or_layout():
    generator = torch.Generator().manual_seed(0)
    tied = torch.randn(5, 3, generator=generator)
    weights = {
        "embed.weight": tied,
        "lm_head.weight": tied,
        "ids": torch.arange(7, dtype=torch.int64),
        "half": torch.randn(4, 6, generator=generator).bfloat16(),
        "transposed": torch.randn(3, 4, generator=generator).t(),  # not contiguous
        "flag": torch.tensor(True),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 4),
    }
    for bucket_bytes in (1, 100, 1 << 20):
        unpacked = dict(pair for bucket in pack_buckets(weights, bucket_bytes) for pair in unpack_bucket(bucket))
        assert list(unpacked) == list(weights)
        for name, tensor in weights.items():
            assert unpacked[name].dtype == tensor.dtype and unpacked[name].shape == tensor.shape, name
            assert torch.equal(unpacked[name], tensor), name
        # Tied names stay one tensor, as the learner exports them.
        assert unpacked["lm_head.weight"].data_ptr() == unpacked["embed.weight"].data_ptr()


def test_bad_bucket_sizes_and_dtypes_are_refused():
    with pytest.raises(ValueError, match="bucket_bytes: must be >= 1"):
        list(pack_buckets({"w": torch.zeros(1)}, 0))
    (bucket,) = pack_buckets({"w": torch.zeros(1)}, 64)
    broken = type(bucket)((type(bucket.tensors[0])(("w",), (1,), "float99", 4),), bucket.arrays)
    with pytest.raises(ValueError, match="'w' has unknown dtype 'float99'"):
        unpack_bucket(broken)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_policy_learners_buckets_hold_its_exact_weights(tmp_path, dtype):
    """What the object-store sync moves is what the real learner exports (its full_state_dict), bit for bit."""
    policy_dir = str(make_policy_model(tmp_path / "policy", make_tokenizer()))
    learner = PolicyLearner(
        policy_dir, model=ModelConfig(dtype=dtype), policy=PolicyConfig(), learner=LearnerConfig(backend="torch")
    )
    exported = learner.state_dict()
    assert exported["lm_head.weight"] is exported["model.embed_tokens.weight"]  # the builtin policy is tied
    buckets = list(learner.stream_weights("object_store", False, 4096))
    assert len(buckets) > 1
    unpacked = dict(pair for bucket in buckets for pair in unpack_bucket(bucket))
    assert sorted(unpacked) == sorted(exported)
    for name, tensor in exported.items():
        assert unpacked[name].dtype == getattr(torch, dtype) == tensor.dtype, name
        assert torch.equal(unpacked[name], tensor), name
    assert unpacked["lm_head.weight"].data_ptr() == unpacked["model.embed_tokens.weight"].data_ptr()


def test_a_checked_sync_copies_the_learners_weights_once(tmp_path, monkeypatch):
    """The fingerprint the check after a sync compares with is taken from the copy the send exported: one gather
    and copy of the whole model per sync, whichever backend exports one (object_store, disk)."""
    policy_dir = str(make_policy_model(tmp_path / "policy", make_tokenizer()))
    learner = PolicyLearner(
        policy_dir, model=ModelConfig(dtype="float32"), policy=PolicyConfig(), learner=LearnerConfig(backend="torch")
    )
    expected = fingerprint(learner.state_dict().items(), torch.bfloat16)
    copies = []
    export = learner.engine.rank0_state_dict
    monkeypatch.setattr(learner.engine, "rank0_state_dict", lambda: copies.append(1) or export())

    buckets = list(learner.stream_weights("object_store", True, 4096))
    assert len(buckets) > 1 and learner.weights_fingerprint("bfloat16") == expected and len(copies) == 1
    learner.send_weights("disk", True, str(tmp_path / "v2"))
    assert learner.weights_fingerprint("bfloat16") == expected and len(copies) == 2
    written = dict(read_checkpoint_dir(tmp_path / "v2"))
    # The tied lm_head is stored once, as save_pretrained stores it.
    assert sorted(written) == sorted(set(expected) - {"lm_head.weight"})
    assert all(torch.equal(written[name], tensor) for name, tensor in export().items() if name in written)
    # An unchecked send keeps no copy: a fingerprint asked for later reads the weights as they are then.
    list(learner.stream_weights("object_store", False, 4096))
    assert learner.weights_fingerprint("bfloat16") == expected and len(copies) == 4
