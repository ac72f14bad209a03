"""Properties every merge must keep, checked with hypothesis on random small adapters.

Client order does not matter; T = 1 gives lambda times the pruned factors; zero in, zero out;
power-of-two scaling commutes with the merge; keep_ratio = 1 prunes nothing; s >= 1; inputs are
never modified; fp16 / bf16 / fp32 inputs give float32 CPU outputs with the same keys.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strategies import available_methods, merge_lora, merge_lora_with_report
from strategies.merging.pruning import complementary_scale, magnitude_mask
from tests.strategies import reference_spec as ref

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

seeds = st.integers(min_value=0, max_value=2**31 - 1)
counts = st.integers(min_value=1, max_value=5)
ranks = st.integers(min_value=1, max_value=8)
dims = st.integers(min_value=1, max_value=12)
kinds = st.sampled_from(ref.KINDS)
keep_ratios = st.one_of(
    st.sampled_from([1.0, 0.2, 0.5, 1e-6]),
    st.floats(min_value=1e-3, max_value=1.0, allow_nan=False),
)
quantiles = st.one_of(
    st.sampled_from([0.0, 0.2, 0.5]),
    st.floats(min_value=0.0, max_value=0.999, allow_nan=False),
)
modes = st.sampled_from(["paper-exact", "paper-equation"])

# Every method with the hyperparameters that make it deterministic and order-free.
METHOD_CONFIGS: list[tuple[str, dict[str, object]]] = [
    ("robustmerge", {"mode": "paper-exact"}),
    ("robustmerge", {"mode": "paper-equation"}),
    ("fedavg", {}),
    ("task_arithmetic", {}),
    ("ties", {}),
    ("dare", {"drop_rate": 0.3, "seed": 7}),
    ("svd", {}),
    ("exact-mean", {}),
]


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-6) -> None:
    expected = expected.to(torch.float64)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.to(torch.float64),
        expected,
        rtol=rtol,
        atol=rtol * scale,
        msg=lambda m: f"{what}: {m}",
    )


def _products(merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """B @ A of every module (the part of paper-equation output that is unique)."""
    return {
        a_key: merged[b_key].double() @ merged[a_key].double()
        for a_key, b_key in ref.lora_pairs(merged)
    }


def test_every_shipped_method_is_covered() -> None:
    assert {name for name, _ in METHOD_CONFIGS} == set(available_methods())


@SETTINGS
@given(
    seed=seeds,
    count=st.integers(min_value=2, max_value=5),
    rank=ranks,
    d_in=dims,
    d_out=dims,
    kind=kinds,
    keep_ratio=keep_ratios,
    scale_quantile=quantiles,
    mode=modes,
    data=st.data(),
)
def test_client_order_does_not_matter(
    seed: int,
    count: int,
    rank: int,
    d_in: int,
    d_out: int,
    kind: str,
    keep_ratio: float,
    scale_quantile: float,
    mode: str,
    data: st.DataObject,
) -> None:
    adapters = ref.make_adapters(seed, count, rank, d_in, d_out, kind)
    order = data.draw(st.permutations(range(count)), label="order")
    weights = data.draw(
        st.lists(st.integers(1, 9), min_size=count, max_size=count).map(
            lambda w: [float(v) for v in w]
        ),
        label="weights",
    )
    fuse = tuple(data.draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])) for _ in range(count))
    hp: dict[str, object] = {
        "keep_ratio": keep_ratio,
        "scale_quantile": scale_quantile,
        "fuse_weight": fuse,
        "mode": mode,
    }
    first = merge_lora(adapters, weights=weights, **hp)
    hp["fuse_weight"] = tuple(fuse[i] for i in order)
    second = merge_lora([adapters[i] for i in order], weights=[weights[i] for i in order], **hp)
    if mode == "paper-exact":
        for key in first:
            _close(second[key], first[key], key, rtol=1e-5)
        return
    # paper-equation: B A is unique only when sigma_r > sigma_r+1 of the full-rank sum; the
    # spectrum of B A is always unique.
    lambdas = ref.task_lambdas(count, fuse, weights)
    first_products, second_products = _products(first), _products(second)
    for a_key, b_key in ref.lora_pairs(adapters[0]):
        full = ref.robustmerge_equation_full(
            [ad[a_key] for ad in adapters], [ad[b_key] for ad in adapters], lambdas, keep_ratio
        )
        sigma = torch.linalg.svd(full).S
        top = float(sigma[0]) if float(sigma[0]) > 0 else 1.0
        _close(
            torch.linalg.svdvals(second_products[a_key]),
            torch.linalg.svdvals(first_products[a_key]),
            f"spectrum of {a_key}",
            rtol=1e-5,
        )
        if sigma.numel() <= rank or float(sigma[rank - 1] - sigma[rank]) > 1e-3 * top:
            _close(second_products[a_key], first_products[a_key], a_key, rtol=1e-5)


@SETTINGS
@given(
    method=st.sampled_from(["fedavg", "task_arithmetic", "ties", "svd"]),
    seed=seeds,
    count=st.integers(min_value=2, max_value=4),
    kind=kinds,
    data=st.data(),
)
def test_client_order_does_not_matter_for_baselines(
    method: str, seed: int, count: int, kind: str, data: st.DataObject
) -> None:
    adapters = ref.make_adapters(seed, count, 3, 5, 4, kind)
    order = data.draw(st.permutations(range(count)), label="order")
    weights = [float(1 + (seed + t) % 4) for t in range(count)]
    first = merge_lora(adapters, method, weights=weights)
    second = merge_lora([adapters[i] for i in order], method, weights=[weights[i] for i in order])
    if method != "svd":
        for key in first:
            _close(second[key], first[key], f"{method} {key}", rtol=1e-5)
        return
    # svd: B A is unique when the weighted sum of products has sigma_3 > sigma_4.
    first_products, second_products = _products(first), _products(second)
    for a_key, b_key in ref.lora_pairs(adapters[0]):
        full = sum(
            w / sum(weights) * ad[b_key].double() @ ad[a_key].double()
            for w, ad in zip(weights, adapters, strict=True)
        )
        sigma = torch.linalg.svdvals(full)
        top = float(sigma[0]) if float(sigma[0]) > 0 else 1.0
        if sigma.numel() <= 3 or float(sigma[2] - sigma[3]) > 1e-3 * top:
            _close(second_products[a_key], first_products[a_key], a_key, rtol=1e-5)
        _close(
            torch.linalg.svdvals(second_products[a_key]),
            torch.linalg.svdvals(first_products[a_key]),
            f"spectrum of {a_key}",
            rtol=1e-5,
        )


@SETTINGS
@given(
    seed=seeds,
    rank=ranks,
    d_in=dims,
    d_out=dims,
    kind=kinds,
    keep_ratio=keep_ratios,
    scale_quantile=quantiles,
    fuse=st.sampled_from([2.0, 1.0, 0.5, -1.5]),
)
def test_single_adapter_gives_lambda_times_pruned_factors(
    seed: int,
    rank: int,
    d_in: int,
    d_out: int,
    kind: str,
    keep_ratio: float,
    scale_quantile: float,
    fuse: float,
) -> None:
    # T = 1: A_m = lambda A^, and B_m = lambda s~ B^ / s~ = lambda B^ (the scale cancels).
    (adapter,) = ref.make_adapters(seed, 1, rank, d_in, d_out, kind)
    merged = merge_lora(
        [adapter], keep_ratio=keep_ratio, scale_quantile=scale_quantile, fuse_weight=fuse
    )
    for a_key, b_key in ref.lora_pairs(adapter):
        for key in (a_key, b_key):
            mask = magnitude_mask(adapter[key][None], keep_ratio)[0]
            _close(merged[key], fuse * adapter[key].double() * mask, key)
            assert torch.equal(merged[key] != 0, mask & (adapter[key] != 0)), key
    lora = {key for pair in ref.lora_pairs(adapter) for key in pair}
    for key in adapter.keys() - lora:
        # Non-LoRA tensors: the mean of one tensor is itself (no lambda).
        assert torch.equal(merged[key], adapter[key]), key


@SETTINGS
@given(
    seed=seeds,
    rank=ranks,
    d_in=dims,
    d_out=dims,
    kind=kinds,
    keep_ratio=keep_ratios,
)
def test_single_adapter_paper_equation_is_lambda_times_pruned_product(
    seed: int, rank: int, d_in: int, d_out: int, kind: str, keep_ratio: float
) -> None:
    # T = 1: delta_W = lambda B^ diag(s / s) A^ = lambda B^ A^, exactly representable at rank r.
    (adapter,) = ref.make_adapters(seed, 1, rank, d_in, d_out, kind, extra_keys=False)
    result = merge_lora_with_report([adapter], mode="paper-equation", keep_ratio=keep_ratio)
    assert result.report.relative_error == 0.0
    for a_key, b_key in ref.lora_pairs(adapter):
        a_pruned = ref.prune(adapter[a_key], keep_ratio)[0]
        b_pruned = ref.prune(adapter[b_key], keep_ratio)[0]
        got = result.tensors[b_key].double() @ result.tensors[a_key].double()
        _close(got, 2.0 * b_pruned @ a_pruned, a_key)


@SETTINGS
@given(
    seed=seeds,
    count=counts,
    rank=ranks,
    d_in=dims,
    d_out=dims,
    config=st.sampled_from(METHOD_CONFIGS),
)
def test_zero_inputs_give_zero(
    seed: int,
    count: int,
    rank: int,
    d_in: int,
    d_out: int,
    config: tuple[str, dict[str, object]],
) -> None:
    method, hp = config
    zeros = [
        {key: torch.zeros_like(value) for key, value in adapter.items()}
        for adapter in ref.make_adapters(seed, count, rank, d_in, d_out)
    ]
    result = merge_lora_with_report(zeros, method, **hp)
    for key, value in result.tensors.items():
        assert torch.equal(value, torch.zeros_like(value)), (method, key)
    if result.report.relative_error is not None:
        assert result.report.relative_error == 0.0


@SETTINGS
@given(
    seed=seeds,
    count=counts,
    rank=ranks,
    d_in=dims,
    d_out=dims,
    kind=kinds,
    keep_ratio=keep_ratios,
    scale_quantile=quantiles,
    power=st.integers(min_value=-6, max_value=6),
)
def test_power_of_two_scaling_commutes(
    seed: int,
    count: int,
    rank: int,
    d_in: int,
    d_out: int,
    kind: str,
    keep_ratio: float,
    scale_quantile: float,
    power: int,
) -> None:
    # Scaling every input by 2^k is exact in floating point: the masks and every s are
    # unchanged and each sum scales exactly, so A_m and B_m scale by exactly 2^k (and B A of
    # paper-equation mode by 4^k, up to the SVD's rounding).
    factor = 2.0**power
    adapters = ref.make_adapters(seed, count, rank, d_in, d_out, kind)
    scaled = [{key: value * factor for key, value in adapter.items()} for adapter in adapters]
    hp = {"keep_ratio": keep_ratio, "scale_quantile": scale_quantile}
    base = merge_lora(adapters, **hp)
    moved = merge_lora(scaled, **hp)
    for key in base:
        assert torch.equal(moved[key], base[key] * factor), key
    base_eq = _products(merge_lora(adapters, mode="paper-equation", **hp))
    moved_eq = _products(merge_lora(scaled, mode="paper-equation", **hp))
    for key in base_eq:
        _close(moved_eq[key], base_eq[key] * factor**2, key, rtol=1e-5)


@SETTINGS
@given(seed=seeds, count=counts, rank=ranks, d_in=dims, d_out=dims, kind=kinds)
def test_keep_ratio_one_prunes_nothing(
    seed: int, count: int, rank: int, d_in: int, d_out: int, kind: str
) -> None:
    # rho = 1: nothing pruned, every s = 1, so A_m = sum lambda_t A_t and
    # B_m = sum lambda_t B_t / T (lambda_t = 2 with equal weights).
    adapters = ref.make_adapters(seed, count, rank, d_in, d_out, kind)
    merged = merge_lora(adapters, keep_ratio=1.0)
    for a_key, b_key in ref.lora_pairs(adapters[0]):
        a_stack = torch.stack([adapter[a_key] for adapter in adapters])
        b_stack = torch.stack([adapter[b_key] for adapter in adapters])
        assert bool(magnitude_mask(a_stack, 1.0).all())
        assert bool(magnitude_mask(b_stack, 1.0).all())
        assert torch.equal(complementary_scale(a_stack, a_stack, 0.2), torch.ones(count, rank))
        _close(merged[a_key], 2.0 * a_stack.double().sum(0), a_key)
        _close(merged[b_key], 2.0 * b_stack.double().sum(0) / count, b_key)


@SETTINGS
@given(
    seed=seeds,
    count=counts,
    rank=ranks,
    d_in=dims,
    kind=kinds,
    keep_ratio=keep_ratios,
    scale_quantile=quantiles,
)
def test_scale_is_at_least_one_and_floor_only_raises(
    seed: int,
    count: int,
    rank: int,
    d_in: int,
    kind: str,
    keep_ratio: float,
    scale_quantile: float,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    a_stack = torch.stack([ref.draw(generator, (rank, d_in), kind) for _ in range(count)])
    a_pruned = a_stack * magnitude_mask(a_stack, keep_ratio)
    raw = complementary_scale(a_stack, a_pruned, None)
    floored = complementary_scale(a_stack, a_pruned, scale_quantile)
    assert bool(torch.isfinite(raw).all())
    assert bool((raw >= 1.0).all())
    assert bool((floored >= raw).all())
    # At least floor(r (1 - a)) + 1 (capped at r) directions share the task's floor value.
    position = min(int(rank * (1.0 - scale_quantile)), rank - 1)
    for t in range(count):
        q = floored[t].min()
        assert int((floored[t] == q).sum()) >= position + 1


@SETTINGS
@given(
    seed=seeds,
    count=counts,
    kind=kinds,
    config=st.sampled_from(METHOD_CONFIGS),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
)
def test_inputs_are_never_modified(
    seed: int,
    count: int,
    kind: str,
    config: tuple[str, dict[str, object]],
    dtype: torch.dtype,
) -> None:
    method, hp = config
    adapters = [
        {key: value.to(dtype) for key, value in adapter.items()}
        for adapter in ref.make_adapters(seed, count, 3, 6, 5, kind)
    ]
    copies = [{key: value.clone() for key, value in adapter.items()} for adapter in adapters]
    merged = merge_lora(adapters, method, **hp)
    # The output never aliases an input: writing to it leaves the inputs alone.
    for value in merged.values():
        value.add_(1.0)
    for adapter, copy in zip(adapters, copies, strict=True):
        assert list(adapter) == list(copy)
        for key in copy:
            assert adapter[key].dtype == dtype
            assert torch.equal(adapter[key], copy[key]), (method, key)


@SETTINGS
@given(
    seed=seeds,
    count=counts,
    rank=ranks,
    kind=kinds,
    config=st.sampled_from(METHOD_CONFIGS),
)
def test_half_precision_inputs_give_float32_outputs(
    seed: int, count: int, rank: int, kind: str, config: tuple[str, dict[str, object]]
) -> None:
    # The engine computes in float32: a bf16 (or fp16) adapter gives exactly the result of its
    # float32 upcast, on CPU, with the same keys in the same order.
    method, hp = config
    adapters = ref.make_adapters(seed, count, rank, 7, 6, kind)
    for dtype in (torch.bfloat16, torch.float16):
        low = [{key: value.to(dtype) for key, value in ad.items()} for ad in adapters]
        upcast = [{key: value.to(torch.float32) for key, value in ad.items()} for ad in low]
        got = merge_lora(low, method, device="cpu", **hp)
        want = merge_lora(upcast, method, device="cpu", **hp)
        assert list(got) == list(adapters[0])
        for key, value in got.items():
            assert value.dtype == torch.float32, (dtype, key)
            assert value.device.type == "cpu"
            assert value.shape == adapters[0][key].shape
            assert torch.equal(value, want[key]), (method, dtype, key)


def test_mixed_input_dtypes_are_accepted() -> None:
    adapters = ref.make_adapters(3, 3, 4, 8, 6)
    mixed = [
        {key: value.to(dtype) for key, value in adapter.items()}
        for adapter, dtype in zip(
            adapters, (torch.float16, torch.bfloat16, torch.float32), strict=True
        )
    ]
    upcast = [{key: value.to(torch.float32) for key, value in ad.items()} for ad in mixed]
    got, want = merge_lora(mixed), merge_lora(upcast)
    for key in want:
        assert got[key].dtype == torch.float32
        assert torch.equal(got[key], want[key]), key
