"""RobustMerge against the loop-by-loop float64 oracle (``reference_spec``) on random adapters.

Masks must match bit for bit (``torch.equal``); merged values to rtol 1e-6 with an absolute
floor of 1e-6 * max|reference| per tensor. Data kinds cover ties at the threshold (small
integers), zero rows and columns, an all-zero adapter, and rows that pruning empties entirely.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import merge_lora, merge_lora_with_report
from strategies.merging.pruning import complementary_scale, magnitude_mask
from tests.strategies import reference_spec as ref

# (seed, T, rank, d_in, d_out, kind, keep_ratio, scale_quantile): a fixed grid, so failures are
# reproducible by id. T covers 1..6, ranks 1..16, keep_ratio 1.0 and tiny values, a = 0.
EXACT_CASES = [
    (0, 1, 4, 8, 6, "gauss", 0.2, 0.2),
    (1, 2, 2, 5, 3, "ties", 0.2, 0.2),
    (2, 3, 8, 16, 12, "gauss", 0.2, 0.2),
    (3, 4, 16, 32, 24, "gauss", 0.2, 0.2),
    (4, 5, 1, 7, 5, "gauss", 0.5, 0.0),
    (5, 6, 3, 9, 4, "ties", 0.3, 0.5),
    (6, 2, 16, 20, 16, "ties", 0.2, 0.0),
    (7, 3, 5, 12, 7, "zero_rows", 0.2, 0.2),
    (8, 4, 6, 10, 8, "zero_rows", 0.1, 0.0),
    (9, 2, 4, 24, 6, "row_scaled", 0.05, 0.2),
    (10, 3, 8, 16, 8, "row_scaled", 1e-6, 0.2),
    (11, 1, 16, 64, 32, "gauss", 1e-6, 0.0),
    (12, 5, 4, 8, 4, "gauss", 1.0, 0.2),
    (13, 6, 2, 6, 3, "ties", 1.0, 0.0),
    (14, 4, 7, 13, 9, "ties", 0.999, 0.999),
    (15, 3, 12, 40, 20, "gauss", 0.75, 0.9),
    (16, 1, 2, 3, 2, "ties", 0.2, 0.2),
    (17, 6, 16, 24, 16, "row_scaled", 0.2, 0.2),
    (18, 2, 1, 1, 1, "gauss", 0.2, 0.2),
    (19, 5, 10, 30, 10, "zero_rows", 0.35, 0.35),
    # Real LoRA sizes (more than 8,192 entries per factor).
    (32, 3, 16, 768, 768, "gauss", 0.2, 0.2),
    (33, 2, 8, 1100, 1030, "ties", 0.2, 0.2),
    (34, 4, 16, 600, 520, "row_scaled", 0.05, 0.0),
    # -0.0, subnormals, values near 1e30 and exact duplicates.
    (35, 3, 8, 40, 24, "special", 0.2, 0.2),
]


def _ids(cases: list[tuple[object, ...]]) -> list[str]:
    return ["-".join(str(v) for v in case) for case in cases]


def _assert_values(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    expected = expected.to(torch.float64)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.to(torch.float64),
        expected,
        rtol=1e-6,
        atol=1e-6 * scale,
        msg=lambda m: f"{what}: {m}",
    )


def _weights_for(seed: int, count: int) -> list[float] | None:
    """Every third case has no weights; the others draw some (with a zero now and then)."""
    if seed % 3 == 0:
        return None
    generator = torch.Generator().manual_seed(1000 + seed)
    values = torch.randint(0, 5, (count,), generator=generator).to(torch.float64)
    values[0] = values[0] + 1.0  # never all zero
    return values.tolist()


@pytest.mark.parametrize(
    ("seed", "count", "rank", "d_in", "d_out", "kind", "keep_ratio", "scale_quantile"),
    EXACT_CASES,
    ids=_ids(EXACT_CASES),
)
def test_paper_exact_matches_reference(
    seed: int,
    count: int,
    rank: int,
    d_in: int,
    d_out: int,
    kind: str,
    keep_ratio: float,
    scale_quantile: float,
) -> None:
    _check_paper_exact(seed, count, rank, d_in, d_out, kind, keep_ratio, scale_quantile)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    count=st.integers(min_value=1, max_value=6),
    rank=st.integers(min_value=1, max_value=16),
    d_in=st.integers(min_value=1, max_value=24),
    d_out=st.integers(min_value=1, max_value=16),
    kind=st.sampled_from(ref.KINDS),
    keep_ratio=st.one_of(
        st.sampled_from([1.0, 1e-9, 1e-3, 0.2]), st.floats(min_value=1e-4, max_value=1.0)
    ),
    scale_quantile=st.one_of(
        st.sampled_from([0.0, 0.2]), st.floats(min_value=0.0, max_value=0.999)
    ),
)
def test_paper_exact_matches_reference_random(
    seed: int,
    count: int,
    rank: int,
    d_in: int,
    d_out: int,
    kind: str,
    keep_ratio: float,
    scale_quantile: float,
) -> None:
    _check_paper_exact(seed, count, rank, d_in, d_out, kind, keep_ratio, scale_quantile)


def _check_paper_exact(
    seed: int,
    count: int,
    rank: int,
    d_in: int,
    d_out: int,
    kind: str,
    keep_ratio: float,
    scale_quantile: float,
) -> None:
    adapters = ref.make_adapters(seed, count, rank, d_in, d_out, kind)
    weights = _weights_for(seed, count)
    fuse: float | tuple[float, ...] = (
        tuple(0.5 + 0.25 * t for t in range(count)) if seed % 4 == 1 else 2.0
    )
    hp = {"keep_ratio": keep_ratio, "scale_quantile": scale_quantile, "fuse_weight": fuse}
    merged = merge_lora(adapters, weights=weights, device="cpu", **hp)
    oracle = ref.merge_adapters_exact(adapters, weights=weights, **hp)  # type: ignore[arg-type]
    assert list(merged) == list(adapters[0])
    for key in oracle:
        assert merged[key].dtype == torch.float32
        assert merged[key].shape == adapters[0][key].shape
        _assert_values(merged[key], oracle[key], key)

    lambdas = ref.task_lambdas(count, fuse, weights)
    for a_key, b_key in ref.lora_pairs(adapters[0]):
        a_stack = torch.stack([adapter[a_key] for adapter in adapters])
        b_stack = torch.stack([adapter[b_key] for adapter in adapters])
        module = ref.robustmerge_exact(
            list(a_stack), list(b_stack), lambdas, keep_ratio, scale_quantile
        )
        a_masks = torch.stack(module["a_masks"])  # type: ignore[arg-type]
        b_masks = torch.stack(module["b_masks"])  # type: ignore[arg-type]
        assert torch.equal(magnitude_mask(a_stack, keep_ratio), a_masks), a_key
        assert torch.equal(magnitude_mask(b_stack, keep_ratio), b_masks), b_key
        # The engine's s~ against the oracle's, and s~ >= 1 everywhere.
        scale = complementary_scale(a_stack, a_stack * a_masks, scale_quantile)
        _assert_values(scale, torch.tensor(module["scales"]), f"s~ of {a_key}")
        assert bool((scale >= 1.0).all())
        if count == 1:
            # The mask is visible in the output: A_m = lambda * A * mask.
            visible = merged[a_key] != 0
            assert torch.equal(visible, a_masks[0] & (a_stack[0] != 0)), a_key


# Small tensors over many ratios, and tensors of more than 8,192 entries (a 16 x 1024 A, a
# 1024 x 16 B, ...: the sizes of real LoRA factors, where a threshold search may take a
# different path than on small ones) over a few.
MASK_GRID = [
    *itertools.product(
        [(1, 1), (2, 3), (4, 4), (16, 64), (3, 1000)], [1e-9, 0.01, 0.2, 0.5, 0.9, 0.999999, 1.0]
    ),
    *itertools.product([(16, 1024), (1024, 16), (7, 1201)], [1e-9, 0.2, 0.7, 0.999999]),
]


@pytest.mark.parametrize("kind", [*ref.KINDS, "special"])
def test_masks_match_reference_over_shapes_and_ratios(kind: str) -> None:
    generator = torch.Generator().manual_seed(len(kind))
    for shape, keep_ratio in MASK_GRID:
        stack = torch.stack([ref.draw(generator, shape, kind) for _ in range(3)])
        stack[1 if shape[0] % 2 else 2] = 0.0  # one task all zero: every |x| ties
        got = magnitude_mask(stack, keep_ratio)
        want = torch.stack([ref.prune(x, keep_ratio)[1] for x in stack])
        assert got.dtype == torch.bool
        assert torch.equal(got, want), (shape, keep_ratio)
        n = math.prod(shape)
        k = math.floor(n * (1.0 - keep_ratio))
        for t in range(3):
            survivors = int(got[t].sum())
            # At least n - k + 1 survive (more only through ties at tau); k == 0 keeps all.
            assert survivors == n if k == 0 else survivors >= n - k + 1


# --- paper-equation mode ----------------------------------------------------------------------

EQUATION_CASES = [
    (20, 1, 4, 10, 8, "gauss", 0.2, None),
    (21, 2, 2, 6, 5, "gauss", 0.2, None),
    (22, 3, 4, 16, 12, "gauss", 0.3, None),
    (23, 4, 8, 20, 18, "gauss", 0.2, 0.2),
    (24, 6, 3, 12, 10, "ties", 0.5, None),
    (25, 5, 2, 9, 7, "zero_rows", 0.2, 0.0),
    (26, 2, 6, 4, 3, "gauss", 1.0, None),  # T r = 12 > d_in, d_out
    (27, 3, 16, 40, 24, "row_scaled", 0.05, None),
    (28, 1, 8, 12, 6, "ties", 1e-6, 0.2),
]


@pytest.mark.parametrize(
    ("seed", "count", "rank", "d_in", "d_out", "kind", "keep_ratio", "floor_quantile"),
    EQUATION_CASES,
    ids=_ids(EQUATION_CASES),
)
def test_paper_equation_matches_reference(
    seed: int,
    count: int,
    rank: int,
    d_in: int,
    d_out: int,
    kind: str,
    keep_ratio: float,
    floor_quantile: float | None,
) -> None:
    adapters = ref.make_adapters(seed, count, rank, d_in, d_out, kind)
    weights = _weights_for(seed, count)
    hp: dict[str, object] = {"mode": "paper-equation", "keep_ratio": keep_ratio}
    if floor_quantile is not None:
        hp.update(scale_floor=True, scale_quantile=floor_quantile)
    result = merge_lora_with_report(adapters, weights=weights, device="cpu", **hp)
    merged, report = result.tensors, result.report
    lambdas = ref.task_lambdas(count, 2.0, weights)
    residual_energy = full_energy = 0.0
    assert len(report.relative_errors) == len(ref.lora_pairs(adapters[0]))
    for a_key, b_key in ref.lora_pairs(adapters[0]):
        a_list = [adapter[a_key] for adapter in adapters]
        b_list = [adapter[b_key] for adapter in adapters]
        full = ref.robustmerge_equation_full(a_list, b_list, lambdas, keep_ratio, floor_quantile)
        product = merged[b_key].to(torch.float64) @ merged[a_key].to(torch.float64)
        sigma = torch.linalg.svd(full).S
        scale = float(sigma[0]) if sigma.numel() and float(sigma[0]) > 0 else 1.0
        kept = min(rank, sigma.numel())
        # The product is rank r at most and carries the top r singular values of the full sum.
        got_sigma = torch.linalg.svd(product).S
        _assert_close_abs(got_sigma[:kept], sigma[:kept], 1e-6 * scale, f"sigma of {a_key}")
        tail = float(got_sigma[kept:].max()) if got_sigma.numel() > kept else 0.0
        assert tail <= 1e-6 * scale, f"rank of B A exceeds {rank}: sigma_r+1 = {tail}"
        # B A is the best rank-r approximation (unique when sigma_r > sigma_{r+1}).
        gap = float(sigma[kept - 1] - sigma[kept]) if sigma.numel() > kept else scale
        if gap > 1e-3 * scale:
            best = ref.best_rank_approximation(full, rank)
            _assert_values(product, best, f"B A of {a_key}")
        # FlexLoRA's balanced factors: B = U sqrt(S), A = sqrt(S) V^T, so B^T B = A A^T = diag(S).
        b64, a64 = merged[b_key].to(torch.float64), merged[a_key].to(torch.float64)
        _assert_close_abs(b64.T @ b64, a64 @ a64.T, 1e-5 * scale, f"balance of {a_key}")
        # The reported truncation error is ||B A - full||_F / ||full||_F.
        residual = float(torch.linalg.norm(product - full))
        total = float(torch.linalg.norm(full))
        expected_error = residual / total if total > 0 else 0.0
        name = _module_name(report.relative_errors, a_key)
        assert report.relative_errors[name] == pytest.approx(expected_error, rel=1e-5, abs=1e-6)
        residual_energy += residual**2
        full_energy += total**2
        if count == 1:
            assert report.relative_errors[name] == 0.0
            _assert_values(product, full, f"T=1 product of {a_key}")
    assert report.relative_error is not None
    overall = (residual_energy / full_energy) ** 0.5 if full_energy > 0 else 0.0
    assert report.relative_error == pytest.approx(overall, rel=1e-5, abs=1e-6)
    if count == 1:
        assert report.relative_error == 0.0
    # Non-LoRA keys: the weighted mean, as in paper-exact mode.
    oracle = ref.merge_adapters_exact(adapters, weights=weights)
    for key in ("base_model.model.classifier.modules_to_save.default.weight",):
        _assert_values(merged[key], oracle[key], key)


def _assert_close_abs(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    torch.testing.assert_close(
        actual.to(torch.float64),
        expected.to(torch.float64),
        rtol=1e-6,
        atol=atol,
        msg=lambda m: f"{what}: {m}",
    )


def _module_name(errors: dict[str, float], a_key: str) -> str:
    """The report's module name for an A key (the key minus its factor part)."""
    stem = a_key.split(".lora_")[0]
    matches = [name for name in errors if name.startswith(stem)]
    assert len(matches) == 1, (a_key, sorted(errors))
    return matches[0]


def test_paper_equation_floor_off_by_default_on_when_asked() -> None:
    # Tensors where the floor bites (distinct s per row): the default equals the unfloored
    # oracle and differs from the floored one; scale_floor=True equals the floored oracle.
    adapters = ref.make_adapters(30, 3, 6, 16, 10, "row_scaled", extra_keys=False)
    a_key, b_key = ref.lora_pairs(adapters[0])[0]
    a_list = [adapter[a_key] for adapter in adapters]
    b_list = [adapter[b_key] for adapter in adapters]
    lambdas = ref.task_lambdas(3, 2.0, None)
    plain = ref.robustmerge_equation_full(a_list, b_list, lambdas, 0.2, None)
    floored = ref.robustmerge_equation_full(a_list, b_list, lambdas, 0.2, 0.2)
    assert float(torch.linalg.norm(plain - floored)) > 1e-3 * float(torch.linalg.norm(plain))
    for hp, full in (
        ({}, plain),
        ({"scale_floor": False}, plain),
        ({"scale_floor": True, "scale_quantile": 0.2}, floored),
    ):
        result = merge_lora_with_report(adapters, mode="paper-equation", keep_ratio=0.2, **hp)
        product = result.tensors[b_key].double() @ result.tensors[a_key].double()
        _assert_values(product, ref.best_rank_approximation(full, 6), f"{hp}")


def test_paper_exact_report_has_no_truncation_error() -> None:
    adapters = ref.make_adapters(31, 2, 4, 8, 6)
    report = merge_lora_with_report(adapters).report
    assert report.relative_errors == {}
    assert report.relative_error is None
    assert report.num_adapters == 2
    assert report.method["mode"] == "paper-exact"


# --- CPU against CUDA -------------------------------------------------------------------------

DEVICE_CONFIGS: list[tuple[str, dict[str, object]]] = [
    ("robustmerge", {"mode": "paper-exact"}),
    ("robustmerge", {"mode": "paper-exact", "keep_ratio": 1.0, "scale_quantile": 0.0}),
    ("robustmerge", {"mode": "paper-equation"}),
    ("robustmerge", {"mode": "paper-equation", "scale_floor": True}),
    ("fedavg", {}),
    ("task_arithmetic", {}),
    ("ties", {}),
    ("dare", {"drop_rate": 0.5, "seed": 1}),
    ("svd", {}),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["gauss", "ties", "zero_rows"])
@pytest.mark.parametrize(
    ("method", "hp"), DEVICE_CONFIGS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(DEVICE_CONFIGS)]
)
def test_cpu_and_cuda_agree(method: str, hp: dict[str, object], kind: str) -> None:
    adapters = ref.make_adapters(50, 4, 16, 256, 192, kind)
    weights = [1.0, 2.0, 3.0, 4.0]
    cpu = merge_lora_with_report(adapters, method, weights=weights, device="cpu", **hp)
    gpu = merge_lora_with_report(adapters, method, weights=weights, device="cuda", **hp)
    assert gpu.report.device.startswith("cuda")
    assert list(gpu.tensors) == list(cpu.tensors)
    factored = method == "svd" or hp.get("mode") == "paper-equation"
    pairs = ref.lora_pairs(adapters[0])
    for value in gpu.tensors.values():
        assert value.device.type == "cpu"
        assert value.dtype == torch.float32
    if factored:
        # Singular vectors may differ in sign between LAPACK and cuSOLVER: compare B A.
        for a_key, b_key in pairs:
            on_cpu = cpu.tensors[b_key].double() @ cpu.tensors[a_key].double()
            on_gpu = gpu.tensors[b_key].double() @ gpu.tensors[a_key].double()
            _assert_close_tol(on_gpu, on_cpu, 1e-5, f"{method} B A of {a_key}")
        assert gpu.report.relative_error == pytest.approx(cpu.report.relative_error, abs=1e-5)
        lora = {key for pair in pairs for key in pair}
        keys = [key for key in cpu.tensors if key not in lora]
    else:
        keys = list(cpu.tensors)
    for key in keys:
        _assert_close_tol(gpu.tensors[key], cpu.tensors[key], 1e-5, f"{method} {key}")


def _assert_close_tol(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.to(torch.float64),
        expected.to(torch.float64),
        rtol=tol,
        atol=tol * scale,
        msg=lambda m: f"{what}: {m}",
    )
