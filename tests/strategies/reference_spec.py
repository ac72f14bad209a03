"""A plain, loop-by-loop float64 reading of docs/robustmerge-spec.md: the tests' oracle.

Written from the spec alone, sharing no code with ``strategies``: explicit Python loops over
tasks and rank rows, the pruning threshold found by sorting (not ``kthvalue``), every sum in
float64. Slow on purpose; fine for the small tensors the tests use.

Conventions (the engine's public contract, restated here so the oracle is self-contained):

- per-adapter weights w (default all 1) are normalised to p_t = w_t / sum(w);
- robustmerge's task coefficient is lambda_t = fuse_weight_t * T * p_t (equal weights give every
  task its fuse weight);
- non-LoRA keys are the p-weighted mean over tasks (the plain mean when no weights are given);
- a LoRA pair is ``<module>.lora_A<tail>`` / ``<module>.lora_B<tail>``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

F64 = torch.float64


def kth_smallest_by_sort(values: torch.Tensor, k: int) -> float:
    """The k-th smallest (1-based) entry of a tensor's values, found by a full ascending sort."""
    ordered = torch.sort(values.to(F64).reshape(-1)).values
    return float(ordered[k - 1])


def prune_count(n: int, keep_ratio: float) -> int:
    """Spec step 1: k = floor(n * (1 - rho))."""
    return math.floor(n * (1.0 - keep_ratio))


def prune(x: torch.Tensor, keep_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec step 1 on one tensor: (X^ in float64, boolean mask). Ties at tau are kept."""
    x64 = x.to(F64)
    magnitudes = x64.abs().reshape(-1)
    n = magnitudes.numel()
    k = prune_count(n, keep_ratio)
    if k == 0:
        mask = torch.ones(x.shape, dtype=torch.bool)
    else:
        tau = kth_smallest_by_sort(magnitudes, k)
        mask = (magnitudes >= tau).reshape(x.shape)
    return x64 * mask, mask


def floor_position(rank: int, scale_quantile: float) -> int:
    """Spec step 2 (with the spec's fix for a = 0): min(floor(r * (1 - a)), r - 1)."""
    return min(math.floor(rank * (1.0 - scale_quantile)), rank - 1)


def complementary_scale(
    a: torch.Tensor, a_pruned: torch.Tensor, scale_quantile: float | None
) -> list[float]:
    """Spec step 2 for one task: s~[i] (or the unfloored s[i] when scale_quantile is None).

    s[i] = sum_j |A[i, j]| / sum_j |A^[i, j]|; a row whose kept entries sum to zero gets s = 1.
    """
    rows = a.to(F64).reshape(a.shape[0], -1).tolist()
    kept_rows = a_pruned.to(F64).reshape(a.shape[0], -1).tolist()
    rank = len(rows)
    scale: list[float] = []
    for i in range(rank):
        total = 0.0
        kept = 0.0
        for j in range(len(rows[i])):
            total += abs(rows[i][j])
            kept += abs(kept_rows[i][j])
        scale.append(1.0 if kept == 0.0 else total / kept)
    if scale_quantile is None:
        return scale
    q = sorted(scale)[floor_position(rank, scale_quantile)]
    return [max(s, q) for s in scale]


def task_lambdas(
    count: int, fuse_weight: float | Sequence[float], weights: Sequence[float] | None
) -> list[float]:
    """lambda_t = fuse_weight_t * T * w_t / sum(w)."""
    raw = [1.0] * count if weights is None else [float(w) for w in weights]
    total = sum(raw)
    fuse = (
        [float(fuse_weight)] * count
        if isinstance(fuse_weight, (int, float))
        else [float(f) for f in fuse_weight]
    )
    return [fuse[t] * count * raw[t] / total for t in range(count)]


def robustmerge_exact(
    a_list: Sequence[torch.Tensor],
    b_list: Sequence[torch.Tensor],
    lambdas: Sequence[float],
    keep_ratio: float = 0.2,
    scale_quantile: float = 0.2,
) -> dict[str, object]:
    """Steps 1-4 (paper-exact) for one module; A_t is r x d_in, B_t is d_out x r.

    Returns ``a`` (A_m), ``b`` (B_m), and per task ``a_masks``, ``b_masks``, ``scales`` (s~).
    """
    count = len(a_list)
    rank = a_list[0].shape[0]
    d_out = b_list[0].shape[0]
    a_pruned, a_masks, b_pruned, b_masks, scales = [], [], [], [], []
    for t in range(count):
        ap, am = prune(a_list[t], keep_ratio)
        bp, bm = prune(b_list[t], keep_ratio)
        a_pruned.append(ap)
        a_masks.append(am)
        b_pruned.append(bp)
        b_masks.append(bm)
        scales.append(complementary_scale(a_list[t], ap, scale_quantile))
    a_merged = torch.zeros(a_list[0].shape, dtype=F64)
    for t in range(count):
        a_merged += lambdas[t] * a_pruned[t]
    b_merged = torch.zeros((d_out, rank), dtype=F64)
    for i in range(rank):
        numerator = torch.zeros(d_out, dtype=F64)
        denominator = 0.0
        for t in range(count):
            numerator += lambdas[t] * scales[t][i] * b_pruned[t][:, i]
            denominator += scales[t][i]
        b_merged[:, i] = numerator / denominator
    return {
        "a": a_merged,
        "b": b_merged,
        "a_masks": a_masks,
        "b_masks": b_masks,
        "scales": scales,
    }


def robustmerge_equation_full(
    a_list: Sequence[torch.Tensor],
    b_list: Sequence[torch.Tensor],
    lambdas: Sequence[float],
    keep_ratio: float = 0.2,
    scale_quantile: float | None = None,
) -> torch.Tensor:
    """The paper's formula, full rank: sum_t lambda_t B^_t diag(s_t / sum_u s_u) A^_t.

    ``scale_quantile`` None means no floor (the paper's default); a number applies step 2's floor.
    """
    count = len(a_list)
    rank = a_list[0].shape[0]
    d_in = a_list[0].reshape(rank, -1).shape[1]
    d_out = b_list[0].shape[0]
    pruned_a, pruned_b, scales = [], [], []
    for t in range(count):
        ap, _ = prune(a_list[t], keep_ratio)
        bp, _ = prune(b_list[t], keep_ratio)
        pruned_a.append(ap.reshape(rank, d_in))
        pruned_b.append(bp)
        scales.append(complementary_scale(a_list[t], ap, scale_quantile))
    column_sums = [sum(scales[t][i] for t in range(count)) for i in range(rank)]
    full = torch.zeros((d_out, d_in), dtype=F64)
    for t in range(count):
        for i in range(rank):
            share = scales[t][i] / column_sums[i]
            full += lambdas[t] * share * torch.outer(pruned_b[t][:, i], pruned_a[t][i])
    return full


def best_rank_approximation(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Eckart-Young: the best rank-``rank`` approximation of a float64 matrix."""
    u, s, vh = torch.linalg.svd(matrix.to(F64), full_matrices=False)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


def merge_adapters_exact(
    adapters: Sequence[Mapping[str, torch.Tensor]],
    *,
    keep_ratio: float = 0.2,
    scale_quantile: float = 0.2,
    fuse_weight: float | Sequence[float] = 2.0,
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """Whole state dicts, paper-exact mode, float64 out; pairs A with B by module name."""
    count = len(adapters)
    lambdas = task_lambdas(count, fuse_weight, weights)
    raw = [1.0] * count if weights is None else [float(w) for w in weights]
    probabilities = [w / sum(raw) for w in raw]
    out: dict[str, torch.Tensor] = {}
    for key in adapters[0]:
        if ".lora_B" in key or ".lora_embedding_B" in key:
            continue
        if ".lora_A" in key or ".lora_embedding_A" in key:
            b_key = key.replace(".lora_A", ".lora_B").replace(
                ".lora_embedding_A", ".lora_embedding_B"
            )
            a_shape = adapters[0][key].shape
            a_list = [ad[key].reshape(a_shape[0], -1) for ad in adapters]
            b_list = [ad[b_key] for ad in adapters]
            merged = robustmerge_exact(a_list, b_list, lambdas, keep_ratio, scale_quantile)
            out[key] = merged["a"].reshape(a_shape)  # type: ignore[union-attr]
            out[b_key] = merged["b"]  # type: ignore[assignment]
            continue
        mean = torch.zeros(adapters[0][key].shape, dtype=F64)
        for t in range(count):
            mean += probabilities[t] * adapters[t][key].to(F64)
        out[key] = mean
    return {key: out[key] for key in adapters[0]}


# ---------------------------------------------------------------------------------------------
# Test data: small PEFT-style state dicts (float32) drawn from a seeded generator.

PREFIX = "base_model.model.encoder.layer"
KINDS = ("gauss", "ties", "zero_rows", "row_scaled")


def lora_keys(module: str) -> tuple[str, str]:
    """The saved-adapter keys of one LoRA module's A and B factors."""
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def draw(generator: torch.Generator, shape: tuple[int, ...], kind: str) -> torch.Tensor:
    """One float32 tensor of the given kind.

    gauss: N(0, 1). ties: integers in [-3, 3] (many ties at any threshold, many zeros).
    zero_rows: N(0, 1) with about a third of the rows (dim 0) and columns (dim 1) zeroed.
    row_scaled: N(0, 1) times 10^U(-3, 1) per row, so small keep ratios prune whole rows.
    special (not in KINDS): -0.0, subnormals, values near 1e30 and many exact 0.5s.
    """
    if kind == "gauss":
        return torch.randn(shape, generator=generator)
    if kind == "ties":
        return torch.randint(-3, 4, shape, generator=generator).to(torch.float32)
    if kind == "zero_rows":
        x = torch.randn(shape, generator=generator)
        rows = torch.rand(shape[0], generator=generator) < 0.34
        x[rows] = 0.0
        if len(shape) > 1:
            cols = torch.rand(shape[1], generator=generator) < 0.34
            x[:, cols] = 0.0
        return x
    if kind == "special":
        # -0.0, subnormals, huge values and exact duplicates among ordinary ones.
        x = torch.randn(shape, generator=generator)
        pick = torch.rand(shape, generator=generator)
        x = torch.where(pick < 0.1, torch.tensor(-0.0), x)
        x = torch.where((pick >= 0.1) & (pick < 0.15), x * 1e-39, x)
        x = torch.where((pick >= 0.15) & (pick < 0.2), x * 1e30, x)
        return torch.where((pick >= 0.2) & (pick < 0.3), torch.tensor(0.5), x)
    if kind == "row_scaled":
        x = torch.randn(shape, generator=generator)
        scale = 10.0 ** (torch.rand(shape[0], generator=generator) * 4.0 - 3.0)
        return x * scale.reshape((-1,) + (1,) * (len(shape) - 1))
    raise ValueError(f"unknown kind {kind!r}")


def make_adapters(
    seed: int,
    count: int,
    rank: int,
    d_in: int,
    d_out: int,
    kind: str = "gauss",
    *,
    extra_keys: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """``count`` adapters with the same keys: two LoRA modules of different shapes, an embedding
    LoRA pair and (with ``extra_keys``) two non-LoRA tensors. In ``zero_rows`` data the last
    adapter of three or more is all zero."""
    generator = torch.Generator().manual_seed(seed)
    adapters: list[dict[str, torch.Tensor]] = []
    for t in range(count):
        q_a, q_b = lora_keys(f"{PREFIX}.0.attention.self.query")
        v_a, v_b = lora_keys(f"{PREFIX}.1.attention.self.value")
        adapter = {
            q_a: draw(generator, (rank, d_in), kind),
            q_b: draw(generator, (d_out, rank), kind),
            v_a: draw(generator, (rank, d_in + 3), kind),
            v_b: draw(generator, (d_out + 2, rank), kind),
            "base_model.model.embeddings.word_embeddings.lora_embedding_A": draw(
                generator, (rank, 11), kind
            ),
            "base_model.model.embeddings.word_embeddings.lora_embedding_B": draw(
                generator, (d_out, rank), kind
            ),
        }
        if extra_keys:
            adapter["base_model.model.classifier.modules_to_save.default.weight"] = draw(
                generator, (3, d_out), kind
            )
            adapter["base_model.model.classifier.modules_to_save.default.bias"] = draw(
                generator, (3,), kind
            )
        if kind == "zero_rows" and count >= 3 and t == count - 1:
            adapter = {key: torch.zeros_like(value) for key, value in adapter.items()}
        adapters.append(adapter)
    return adapters


def lora_pairs(adapter: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(A key, B key) of every LoRA module in an adapter, in key order."""
    pairs = []
    for key in adapter:
        if ".lora_A" in key or ".lora_embedding_A" in key:
            b_key = key.replace(".lora_A", ".lora_B").replace(
                ".lora_embedding_A", ".lora_embedding_B"
            )
            pairs.append((key, b_key))
    return pairs
