"""Bad inputs: every refusal names the adapter and the key and says what was expected.

Adapter problems raise ``MergeInputError`` (a ``ValueError``) carrying ``adapter`` and ``key``;
bad hyperparameters raise ``ValueError`` naming the hyperparameter and its allowed range.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from strategies import MergeInputError, available_methods, merge_lora, merge_lora_with_report
from tests.strategies import reference_spec as ref

A_KEY, B_KEY = ref.lora_keys("base_model.model.layer.0.attention.query")
V_A, V_B = ref.lora_keys("base_model.model.layer.0.attention.value")
HEAD = "base_model.model.classifier.modules_to_save.default.weight"

Adapters = list[dict[str, object]]


def _good(count: int = 3) -> Adapters:
    generator = torch.Generator().manual_seed(count)
    return [
        {
            A_KEY: torch.randn(2, 4, generator=generator),
            B_KEY: torch.randn(3, 2, generator=generator),
            V_A: torch.randn(2, 5, generator=generator),
            V_B: torch.randn(6, 2, generator=generator),
            HEAD: torch.randn(3, 4, generator=generator),
        }
        for _ in range(count)
    ]


@dataclass
class Bad:
    """One malformed input: how to break good adapters, and what the error must say."""

    break_it: Callable[[Adapters], Adapters]
    adapter: int | None
    key: str | None
    says: list[str] = field(default_factory=list)


def _set(index: int, key: str, value: object) -> Callable[[Adapters], Adapters]:
    def apply(adapters: Adapters) -> Adapters:
        adapters[index][key] = value
        return adapters

    return apply


def _drop(key: str, *indices: int) -> Callable[[Adapters], Adapters]:
    def apply(adapters: Adapters) -> Adapters:
        for index in indices or range(len(adapters)):
            del adapters[index][key]
        return adapters

    return apply


def _with_nonfinite(index: int, key: str, value: float) -> Callable[[Adapters], Adapters]:
    def apply(adapters: Adapters) -> Adapters:
        tensor = adapters[index][key].clone()  # type: ignore[attr-defined]
        tensor.view(-1)[1] = value
        adapters[index][key] = tensor
        return adapters

    return apply


def _with_dtype(index: int, key: str, dtype: torch.dtype) -> Callable[[Adapters], Adapters]:
    def apply(adapters: Adapters) -> Adapters:
        adapters[index][key] = adapters[index][key].to(dtype)  # type: ignore[attr-defined]
        return adapters

    return apply


def _rank_change(index: int, a_rank: int, b_rank: int) -> Callable[[Adapters], Adapters]:
    def apply(adapters: Adapters) -> Adapters:
        adapters[index][A_KEY] = torch.ones(a_rank, 4)
        adapters[index][B_KEY] = torch.ones(3, b_rank)
        return adapters

    return apply


BAD_ADAPTERS: dict[str, Bad] = {
    "zero adapters": Bad(lambda ads: [], None, None, ["zero adapters"]),
    "empty adapter": Bad(lambda ads: [{}, {}], 0, None, ["no tensors"]),
    "missing key": Bad(_drop(V_B, 2), 2, V_B, ["missing key", "present in adapter 0"]),
    "extra key": Bad(
        _set(1, "base_model.model.pooler.weight", torch.ones(2)),
        1,
        "base_model.model.pooler.weight",
        ["unexpected key", "absent from adapter 0"],
    ),
    "key only in the first adapter": Bad(
        _set(0, "base_model.model.pooler.weight", torch.ones(2)),
        1,
        "base_model.model.pooler.weight",
        ["missing key"],
    ),
    "shape mismatch": Bad(
        _set(2, HEAD, torch.ones(3, 5)), 2, HEAD, ["shape (3, 5)", "does not match (3, 4)"]
    ),
    "A without its B": Bad(_drop(B_KEY), 0, A_KEY, ["no matching B factor", repr(B_KEY)]),
    "B without its A": Bad(_drop(V_A), 0, V_B, ["no matching A factor", repr(V_A)]),
    "A without its B in a later adapter": Bad(_drop(B_KEY, 1), 1, B_KEY, ["missing key"]),
    "rank mismatch inside the first adapter": Bad(
        _rank_change(0, 2, 3), 0, A_KEY, ["rank mismatch", "rank 2", "rank 3"]
    ),
    "rank mismatch inside a later adapter": Bad(
        _rank_change(1, 2, 3), 1, B_KEY, ["rank 3, expected rank 2"]
    ),
    "rank mismatch across adapters": Bad(
        _rank_change(2, 4, 4), 2, A_KEY, ["shape (4, 4)", "rank 4, expected rank 2"]
    ),
    "NaN": Bad(_with_nonfinite(1, A_KEY, float("nan")), 1, A_KEY, ["non-finite", "NaN"]),
    "Inf in the first adapter": Bad(
        _with_nonfinite(0, HEAD, float("inf")), 0, HEAD, ["non-finite", "Inf"]
    ),
    "-Inf in B": Bad(_with_nonfinite(2, V_B, float("-inf")), 2, V_B, ["non-finite"]),
    "integer dtype": Bad(
        _with_dtype(1, A_KEY, torch.int64), 1, A_KEY, ["torch.int64", "float16", "float32"]
    ),
    "bool dtype": Bad(_with_dtype(2, HEAD, torch.bool), 2, HEAD, ["torch.bool", "bfloat16"]),
    "complex dtype": Bad(
        _with_dtype(0, V_B, torch.complex64), 0, V_B, ["torch.complex64", "float32"]
    ),
    "not a tensor": Bad(_set(1, HEAD, [[0.0] * 4] * 3), 1, HEAD, ["expected a torch.Tensor"]),
    "one-dimensional A": Bad(
        lambda ads: [{A_KEY: torch.ones(4), B_KEY: torch.ones(3, 2)} for _ in ads],
        0,
        A_KEY,
        ["r x", "d_out x r"],
    ),
}


@pytest.mark.parametrize("method", ["robustmerge", "svd"])
@pytest.mark.parametrize("case", list(BAD_ADAPTERS), ids=list(BAD_ADAPTERS))
def test_bad_adapters_are_refused_with_a_located_message(case: str, method: str) -> None:
    bad = BAD_ADAPTERS[case]
    adapters = bad.break_it(_good())
    with pytest.raises(MergeInputError) as info:
        merge_lora(adapters, method)  # type: ignore[arg-type]
    error = info.value
    message = str(error)
    assert isinstance(error, ValueError)
    assert error.adapter == bad.adapter, message
    assert error.key == bad.key, message
    if bad.adapter is not None:
        assert f"adapter {bad.adapter}" in message
    if bad.key is not None:
        assert repr(bad.key) in message
    for fragment in bad.says:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_labels_name_the_adapter_in_errors() -> None:
    adapters = _with_nonfinite(1, B_KEY, float("nan"))(_good(2))
    with pytest.raises(MergeInputError, match=r"adapter node-8, key '.*lora_B.weight'") as info:
        merge_lora_with_report(adapters, labels=["node-3", "node-8"])  # type: ignore[arg-type]
    assert info.value.adapter == "node-8"


@pytest.mark.parametrize("labels", [["node-3"], ["node-3", "node-8", "node-9"]])
def test_labels_must_name_every_adapter(labels: list[str]) -> None:
    with pytest.raises(MergeInputError, match=f"labels has {len(labels)} entries for 2 adapters"):
        merge_lora_with_report(_good(2), labels=labels)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("weights", "adapter", "says"),
    [
        ([1.0, 2.0], None, "weights has 2 entries for 3 adapters"),
        ([1.0, 2.0, 3.0, 4.0], None, "weights has 4 entries for 3 adapters"),
        ([1.0, -2.0, 3.0], 1, "finite number >= 0"),
        ([1.0, 2.0, float("nan")], 2, "finite number >= 0"),
        ([float("inf"), 2.0, 1.0], 0, "finite number >= 0"),
        ([0.0, 0.0, 0.0], None, "sum to zero"),
        (torch.zeros(3), None, "sum to zero"),
    ],
)
def test_bad_weights(weights: list[float] | torch.Tensor, adapter: int | None, says: str) -> None:
    for method in available_methods():
        with pytest.raises(MergeInputError, match=says) as info:
            merge_lora(_good(), method, weights=weights)
        assert info.value.adapter == adapter
        if adapter is not None:
            assert f"adapter {adapter}" in str(info.value)


@pytest.mark.parametrize(
    ("method", "hyperparameters", "says"),
    [
        ("robustmerge", {"keep_ratio": 0.0}, r"keep_ratio must be in \(0, 1\], got 0.0"),
        ("robustmerge", {"keep_ratio": -0.1}, r"keep_ratio must be in \(0, 1\]"),
        ("robustmerge", {"keep_ratio": 1.5}, r"keep_ratio must be in \(0, 1\]"),
        ("robustmerge", {"keep_ratio": float("nan")}, r"keep_ratio must be in \(0, 1\]"),
        ("robustmerge", {"keep_ratio": float("inf")}, r"keep_ratio must be in \(0, 1\]"),
        ("robustmerge", {"scale_quantile": 1.0}, r"scale_quantile must be in \[0, 1\), got 1.0"),
        ("robustmerge", {"scale_quantile": -0.01}, r"scale_quantile must be in \[0, 1\)"),
        ("robustmerge", {"scale_quantile": float("nan")}, r"scale_quantile must be in \[0, 1\)"),
        ("robustmerge", {"fuse_weight": (1.0, 2.0)}, "fuse_weight has 2 entries but 3 adapters"),
        ("robustmerge", {"fuse_weight": (1.0,) * 4}, "fuse_weight has 4 entries but 3 adapters"),
        ("robustmerge", {"fuse_weight": ()}, "fuse_weight must be"),
        ("robustmerge", {"fuse_weight": float("nan")}, "fuse_weight must be finite"),
        ("robustmerge", {"mode": "paper"}, "mode must be one of paper-exact, paper-equation"),
        ("robustmerge", {"mode": "paper-exact", "scale_floor": False}, "scale_floor"),
        ("task_arithmetic", {"fuse_weight": (1.0, 2.0)}, "fuse_weight has 2 entries"),
        ("dare", {"fuse_weight": (1.0, 2.0)}, "fuse_weight has 2 entries"),
        ("dare", {"drop_rate": 1.0}, r"drop_rate must be in \[0, 1\)"),
        ("dare", {"drop_rate": -0.5}, r"drop_rate must be in \[0, 1\)"),
        ("ties", {"keep_ratio": 0.0}, r"keep_ratio must be in \(0, 1\]"),
    ],
)
def test_bad_hyperparameters(method: str, hyperparameters: dict[str, object], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        merge_lora(_good(), method, **hyperparameters)


def test_cuda_device_without_cuda_is_refused() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        merge_lora(_good(), device="cuda")


def test_valid_edge_inputs_are_accepted() -> None:
    # One adapter; float64 input; weights as a tensor; a zero weight among positive ones;
    # a live-model key with the adapter name; embedding LoRA factors.
    adapters = _good(2)
    for adapter in adapters:
        adapter["base_model.model.q.lora_A.default.weight"] = torch.ones(2, 3, dtype=torch.float64)
        adapter["base_model.model.q.lora_B.default.weight"] = torch.ones(4, 2, dtype=torch.float64)
        adapter["base_model.model.emb.lora_embedding_A"] = torch.ones(2, 7)
        adapter["base_model.model.emb.lora_embedding_B"] = torch.ones(5, 2)
    merged = merge_lora(adapters, weights=torch.tensor([0.0, 2.0]))  # type: ignore[arg-type]
    assert list(merged) == list(adapters[0])
    assert all(value.dtype == torch.float32 for value in merged.values())
    single = merge_lora(adapters[:1])  # type: ignore[arg-type]
    assert list(single) == list(adapters[0])


@pytest.mark.parametrize("method", ["robustmerge", "fedavg", "ties", "dare", "svd"])
def test_live_parameters_give_plain_tensors(method: str) -> None:
    # Live-model LoRA parameters (requires_grad=True, PEFT's "lora_A.<adapter>.weight" keys) are
    # accepted; the merge builds no autograd graph (which would keep every module's T-stacked
    # inputs alive) and gives the same numbers as the detached tensors.
    plain = ref.make_adapters(60, 3, 4, 8, 6)
    live = [
        {
            key.replace(".weight", ".default.weight"): torch.nn.Parameter(value.clone())
            for key, value in adapter.items()
        }
        for adapter in plain
    ]
    got = merge_lora(live, method)  # type: ignore[arg-type]
    want = merge_lora(plain, method)
    for (live_key, value), key in zip(got.items(), want, strict=True):
        assert live_key == key.replace(".weight", ".default.weight")
        assert not value.requires_grad, live_key
        assert value.grad_fn is None, live_key
        assert torch.equal(value, want[key]), live_key


def test_conv_lora_factors_merge_as_their_matrices() -> None:
    # A conv LoRA pair: A is r x c_in x k x k, B is c_out x r x 1 x 1. It merges exactly as the
    # matrices A (r x c_in k k) and B (c_out x r), reshaped back.
    generator = torch.Generator().manual_seed(61)
    conv = [
        {
            "base_model.model.conv.lora_A.weight": torch.randn(3, 2, 3, 3, generator=generator),
            "base_model.model.conv.lora_B.weight": torch.randn(5, 3, 1, 1, generator=generator),
        }
        for _ in range(3)
    ]
    flat = [
        {
            "base_model.model.conv.lora_A.weight": adapter["base_model.model.conv.lora_A.weight"]
            .reshape(3, 18)
            .clone(),
            "base_model.model.conv.lora_B.weight": adapter["base_model.model.conv.lora_B.weight"]
            .reshape(5, 3)
            .clone(),
        }
        for adapter in conv
    ]
    for method in available_methods():
        got = merge_lora(conv, method)
        want = merge_lora(flat, method)
        for key in want:
            assert got[key].shape == conv[0][key].shape, (method, key)
            assert torch.equal(got[key].reshape(want[key].shape), want[key]), (method, key)
    with pytest.raises(MergeInputError, match="d_out x r"):
        merge_lora(
            [
                {
                    "m.lora_A.weight": torch.ones(3, 2, 3, 3),
                    "m.lora_B.weight": torch.ones(5, 3, 3, 3),
                }
            ]
        )
