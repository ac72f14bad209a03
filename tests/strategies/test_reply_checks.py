"""Each check on one client's training reply (strategies.reply_checks), called directly: every
rejection reason whole, what an accepted reply holds, and the edges of each check (issue 29:
the checks were reached only through whole rounds, where a weakened check still passed)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

from protocol import wire
from protocol.sparse_codec import VALUES_SUFFIX
from strategies.reply_checks import (
    DEFAULT_MAX_NUM_EXAMPLES,
    AcceptedReply,
    ReplyRejectedError,
    check_num_examples,
    check_train_reply,
    declared_rank,
    decode_float32,
    global_rank,
    reply_rank,
    shapes_at_rank,
    state_dict_to_record,
)
from tests.messages import from_node

A = "base_model.model.layer.0.query.lora_A.weight"
B = "base_model.model.layer.0.query.lora_B.weight"
HEAD = "base_model.model.classifier.modules_to_save.default.weight"
GLOBAL: dict[str, tuple[int, ...]] = {A: (4, 6), B: (5, 4)}


def tensors(rank: int = 4, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    return {
        A: torch.randn(rank, 6, generator=generator).to(dtype),
        B: torch.randn(5, rank, generator=generator).to(dtype),
    }


def reply(
    arrays: Mapping[str, torch.Tensor | np.ndarray] | None = None,
    metrics: Mapping[str, object] | None = None,
    *,
    node: int = 7,
    key: str = wire.ARRAYS,
) -> Message:
    content = RecordDict()
    given = tensors() if arrays is None else arrays
    content[key] = ArrayRecord(
        {
            k: Array(v) if isinstance(v, np.ndarray) else Array(v.contiguous().numpy())
            for k, v in given.items()
        }
    )
    content["metrics"] = MetricRecord(
        dict(metrics) if metrics is not None else {wire.NUM_EXAMPLES: 32}  # type: ignore[arg-type]
    )
    return from_node(node, content)


def rejected(message: Message, **options: object) -> ReplyRejectedError:
    with pytest.raises(ReplyRejectedError) as caught:
        check_train_reply(message, GLOBAL, **options)  # type: ignore[arg-type]
    return caught.value


def test_a_well_formed_reply_is_accepted_with_what_it_holds() -> None:
    sent = tensors()
    accepted = check_train_reply(reply(sent, {wire.NUM_EXAMPLES: 32}, node=9), GLOBAL)
    assert accepted.node_id == 9
    assert accepted.num_examples == 32
    assert accepted.keys() == [A, B] == accepted.array_keys()
    assert accepted.num_bytes == ArrayRecord(sent).count_bytes() > (4 * 6 + 5 * 4) * 4
    assert all(torch.equal(accepted.tensor(k), sent[k]) for k in sent)
    assert accepted.object_id == accepted.arrays.object_id
    assert accepted.content.metric_records["metrics"][wire.NUM_EXAMPLES] == 32
    assert accepted.filled == {} and accepted.filled_order == ()
    assert reply_rank(accepted) == 4


def test_an_error_reply_says_what_the_client_reported() -> None:
    error = from_node(7, Error(code=0, reason="out of memory"))
    assert rejected(error).reason == "client reported an error: out of memory"


def test_a_missing_or_empty_array_record_is_named() -> None:
    assert rejected(reply(key="other")).reason == f"no ArrayRecord under {wire.ARRAYS!r}"
    assert rejected(reply({})).reason == f"ArrayRecord {wire.ARRAYS!r} is empty"
    custom = check_train_reply(reply(key="mine"), GLOBAL, arrayrecord_key="mine")
    assert custom.keys() == [A, B]


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        ({}, f"expected one MetricRecord with {wire.NUM_EXAMPLES!r}, found 0"),
        ({wire.NUM_EXAMPLES: [3]}, f"{wire.NUM_EXAMPLES} must be a number, got [3]"),
        ({wire.NUM_EXAMPLES: 2.5}, f"{wire.NUM_EXAMPLES} must be an integer, got 2.5"),
        ({wire.NUM_EXAMPLES: float("inf")}, f"{wire.NUM_EXAMPLES} must be an integer, got inf"),
        ({wire.NUM_EXAMPLES: 0}, f"{wire.NUM_EXAMPLES} must be in [1, 100], got 0"),
        ({wire.NUM_EXAMPLES: -3}, f"{wire.NUM_EXAMPLES} must be in [1, 100], got -3"),
        ({wire.NUM_EXAMPLES: 101}, f"{wire.NUM_EXAMPLES} must be in [1, 100], got 101"),
    ],
)
def test_bad_example_counts_are_named(metrics: dict[str, object], reason: str) -> None:
    assert rejected(reply(metrics=metrics), max_num_examples=100).reason == reason


def test_example_counts_at_the_edges_are_accepted() -> None:
    for count in (1, 100, 7.0):
        accepted = check_train_reply(
            reply(metrics={wire.NUM_EXAMPLES: count}), GLOBAL, max_num_examples=100
        )
        assert accepted.num_examples == int(count) and isinstance(accepted.num_examples, int)
    default = {"m": MetricRecord({wire.NUM_EXAMPLES: DEFAULT_MAX_NUM_EXAMPLES})}
    assert check_num_examples(default, wire.NUM_EXAMPLES, DEFAULT_MAX_NUM_EXAMPLES) == (
        DEFAULT_MAX_NUM_EXAMPLES
    )
    # a MetricRecord cannot hold a bool; the check refuses one from any other mapping
    flag = {"m": {"n": True}}
    with pytest.raises(ReplyRejectedError, match=r"^n must be a number, got True$"):
        check_num_examples(flag, "n", 10)  # type: ignore[arg-type]
    two = {"a": MetricRecord({"n": 3}), "b": MetricRecord({"n": 4})}
    with pytest.raises(ReplyRejectedError, match=r"^expected one MetricRecord with 'n', found 2$"):
        check_num_examples(two, "n", 10)
    counted = check_train_reply(reply(metrics={"samples": 5}), GLOBAL, weighted_by_key="samples")
    assert counted.num_examples == 5


def test_non_lora_tensors_are_a_privacy_rejection() -> None:
    error = rejected(reply({**tensors(), HEAD: torch.zeros(2, 3), "x.weight": torch.zeros(1)}))
    assert error.privacy
    assert error.reason == (
        f"carries 2 non-LoRA tensor(s), e.g. {HEAD!r}: clients must send LoRA tensors only "
        "(possible base-weight leak)"
    )


def test_unexpected_and_missing_lora_keys_are_named_and_not_privacy() -> None:
    extra = A.replace("query", "value")
    error = rejected(reply({**tensors(), extra: torch.zeros(4, 6)}))
    assert error.reason == f"unexpected LoRA key {extra!r} (not in the global adapter)"
    assert not error.privacy
    assert rejected(reply({A: tensors()[A]})).reason == f"missing key {B!r} (1 missing in all)"
    both = {**GLOBAL, HEAD: (2, 3)}
    with pytest.raises(
        ReplyRejectedError, match=re.escape(f"missing key {HEAD!r} (2 missing in all)")
    ):
        check_train_reply(reply({A: tensors()[A]}), both)


def test_a_sparse_reply_to_a_dense_run_is_named() -> None:
    wire_key = A + VALUES_SUFFIX
    error = rejected(reply({**tensors(), wire_key: torch.zeros(3)}))
    assert error.reason == (
        f"a sparse-uplink reply (e.g. {wire_key!r}) but this run's uplink is dense: clients must "
        "read the same run config 'uplink' as the server"
    )
    assert not error.privacy


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_each_accepted_wire_dtype_decodes_to_float32(dtype: type) -> None:
    sent = {k: v.numpy().astype(dtype) for k, v in tensors().items()}
    accepted = check_train_reply(reply(sent), GLOBAL)
    for key, value in sent.items():
        decoded = accepted.tensor(key)
        assert decoded.dtype == torch.float32
        assert np.array_equal(decoded.numpy(), value.astype(np.float32))


def test_other_dtypes_wrong_shapes_and_non_finite_values_are_named() -> None:
    ints = {A: np.zeros((4, 6), dtype=np.int32), B: tensors()[B]}
    assert rejected(reply(ints)).reason == (
        f"key {A!r}: dtype int32 (expected float16, float32 or float64)"
    )
    wide = {A: torch.zeros(4, 7), B: tensors()[B]}
    assert rejected(reply(wide)).reason == (
        f"key {A!r}: shape (4, 7) (expected (4, 6) at the declared {wire.LORA_RANK} 4)"
    )
    for bad in (float("nan"), float("inf"), -float("inf")):
        values = tensors()
        values[B][2, 1] = bad
        assert rejected(reply(values)).reason == f"key {B!r}: non-finite values (NaN or Inf)"


def test_a_global_without_lora_factors_checks_shapes_without_a_rank() -> None:
    plain = {HEAD: (2, 3)}
    accepted = check_train_reply(reply({HEAD: torch.ones(2, 3)}), plain)
    assert reply_rank(accepted) is None
    with pytest.raises(ReplyRejectedError) as caught:
        check_train_reply(reply({HEAD: torch.ones(3, 2)}), plain)
    assert caught.value.reason == f"key {HEAD!r}: shape (3, 2) (expected (2, 3))"


def test_declared_ranks_are_checked() -> None:
    higher = reply(tensors(8), {wire.NUM_EXAMPLES: 3, wire.LORA_RANK: 8})
    assert rejected(higher).reason == (
        f"{wire.LORA_RANK} 8 is above the global adapter's rank 4: the server keeps the global "
        "at the largest rank in use (run-config 'client-ranks', or 'lora-r'); list this site's "
        "rank there or lower its node-config 'lora-r'"
    )
    lower = reply(tensors(2), {wire.NUM_EXAMPLES: 3, wire.LORA_RANK: 2})
    assert rejected(lower).reason == f"{wire.LORA_RANK} 2 differs from the global adapter's rank 4"
    assert rejected(lower, other_ranks_refused="use one rank").reason == (
        f"{wire.LORA_RANK} 2 differs from the global adapter's rank 4: use one rank"
    )
    accepted = check_train_reply(lower, GLOBAL, other_ranks_refused=None)
    assert reply_rank(accepted) == 2
    assert accepted.tensor(B).shape == (5, 2)
    one = reply(tensors(1), {wire.NUM_EXAMPLES: 3, wire.LORA_RANK: 1})
    assert reply_rank(check_train_reply(one, GLOBAL, other_ranks_refused=None)) == 1
    undeclared_low = reply(tensors(2))  # no lora-rank: the global's rank is expected
    assert rejected(undeclared_low, other_ranks_refused=None).reason == (
        f"key {A!r}: shape (2, 6) (expected (4, 6) at the declared {wire.LORA_RANK} 4)"
    )


@pytest.mark.parametrize("value", [0, -1, 2.5, float("nan"), float("inf"), [4]])
def test_a_bad_declared_rank_is_named(value: object) -> None:
    message = reply(metrics={wire.NUM_EXAMPLES: 3, wire.LORA_RANK: value})
    assert rejected(message).reason == (f"{wire.LORA_RANK} must be an integer >= 1, got {value!r}")


def test_declared_rank_reads_one_record_or_the_default() -> None:
    content = RecordDict({"m": MetricRecord({wire.NUM_EXAMPLES: 3})})
    assert declared_rank(content, 6) == 6
    content["r"] = MetricRecord({wire.LORA_RANK: 3.0})
    assert declared_rank(content, 6) == 3 and isinstance(declared_rank(content, 6), int)
    content["s"] = MetricRecord({wire.LORA_RANK: 3})
    with pytest.raises(ReplyRejectedError, match=rf"^2 MetricRecords carry '{wire.LORA_RANK}'$"):
        declared_rank(content, 6)


def test_rank_helpers() -> None:
    assert global_rank(GLOBAL) == 4
    assert global_rank({B: (5, 4), A: (3, 6)}) == 3  # rows of the first lora_A
    assert global_rank({HEAD: (2, 3)}) is None
    assert global_rank({A: ()}) is None
    conv = "base_model.model.conv.lora_A.weight"
    assert shapes_at_rank({**GLOBAL, HEAD: (2, 3), conv: (4, 3, 1, 1)}, 2) == {
        A: (2, 6),
        B: (5, 2),
        HEAD: (2, 3),
        conv: (4, 3, 1, 1),  # only 2-D factors change rank here
    }


def test_a_shared_a_reply_fills_in_the_kept_b_from_the_global() -> None:
    kept = {B: torch.full((5, 4), 0.25)}
    sent = {A: tensors()[A]}
    accepted = check_train_reply(reply(sent), GLOBAL, site_kept=kept)
    assert accepted.keys() == [A, B]
    assert accepted.array_keys() == [A]
    assert torch.equal(accepted.tensor(B), kept[B])
    assert torch.equal(accepted.tensor(A), sent[A])
    error = rejected(reply(tensors()), site_kept=kept)
    assert error.reason == (
        f"carries {B!r}, which a site keeps as its own under run config personalization = "
        "'shared-a' (it sends the LoRA A factors only): the site must run with the server's "
        "run config"
    )


def test_an_undecodable_array_is_named() -> None:
    record = ArrayRecord({A: tensors()[A], B: tensors()[B]})
    record[B].data = b"\x00\x01"  # not an .npy payload
    message = reply()
    message.content[wire.ARRAYS] = record
    reason = rejected(message).reason
    assert reason.startswith(f"key {B!r}: undecodable array (")


def test_state_dict_to_record_holds_contiguous_float32_cpu_copies() -> None:
    source = {A: torch.arange(24.0, dtype=torch.bfloat16).reshape(6, 4).t()}
    record = state_dict_to_record(source)
    decoded = decode_float32(record, A)
    assert decoded.dtype == torch.float32
    assert torch.equal(decoded, source[A].float())
    assert record[A].dtype == "float32"


class Backing:
    """A spilled reply's tensors: ``keys`` in order, each ``fill`` in its global shape."""

    def __init__(self, keys: list[str], fill: float = 3.0) -> None:
        self.object_id = "spilled-1"
        self.order = keys
        self.fill = fill

    def keys(self) -> list[str]:
        return self.order

    def tensor(self, key: str) -> torch.Tensor:
        return torch.full(GLOBAL.get(key, (9,)), self.fill)


def spilled(keys: list[str]) -> AcceptedReply:
    return AcceptedReply(
        node_id=1,
        arrays=ArrayRecord(),
        num_examples=2,
        num_bytes=0,
        content=RecordDict(),
        backing=Backing(keys),
    )


def test_an_accepted_reply_reads_a_spilled_backing() -> None:
    accepted = spilled([A, B])
    assert accepted.object_id == "spilled-1"
    assert accepted.keys() == [A, B]
    assert torch.equal(accepted.tensor(A), torch.full((4, 6), 3.0))
    assert reply_rank(accepted) == 4


@pytest.mark.parametrize(
    ("keys", "rank"),
    [
        ([B, A], 4),  # the rank is read from a lora_A, wherever it sits
        ([A + VALUES_SUFFIX, B + VALUES_SUFFIX], None),  # sparse wire keys carry no rank
        ([HEAD], None),
    ],
)
def test_reply_rank_reads_the_first_dense_lora_a(keys: list[str], rank: int | None) -> None:
    assert reply_rank(spilled(keys)) == rank


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_state_dict_to_record_copies_gpu_tensors_to_the_cpu() -> None:
    record = state_dict_to_record({A: torch.ones(4, 6, device="cuda")})
    assert torch.equal(decode_float32(record, A), torch.ones(4, 6))
