"""Round forms against float64 readings written here, not against the code's own path (issue 29).

- svd (FlexLoRA) in rounds: the new global's product is the best rank-r approximation of
  B_G A_G + eta * sum_t p_t (B_t A_t - B_G A_G), formed as a d_out x d_in float64 matrix and cut
  by a full SVD (Eckart-Young), and the reported relative error is what that cut drops. (An
  earlier test compared svd with exact-mean, which share one code path and cannot disagree.)
- dare in rounds: lambda sum_t p_t drop_t(dX_t) with lambda_t / T = fuse_weight * p_t and each
  client's mask seeded by (seed, module, factor, the blake2b-56 digest of its float32 delta), as
  dare.py and docs/algorithm.md state; a drop that does nothing, or masks seeded by the client's
  position, give other values.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from strategies.merging import create_method
from strategies.merging.rounds import merge_round
from tests.strategies.test_rounds import A2_KEY, A_KEY, B2_KEY, B_KEY, HEAD, make_global, moved

F64 = torch.float64
MODULES = [(A_KEY, B_KEY), (A2_KEY, B2_KEY)]  # the layout's module order: index 0, 1


def product(tensors: dict[str, torch.Tensor], a_key: str, b_key: str) -> torch.Tensor:
    return tensors[b_key].to(F64) @ tensors[a_key].to(F64)


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("server_lr", [1.0, 0.6])
def test_svd_round_is_the_best_rank_r_cut_of_the_float64_update(server_lr: float) -> None:
    base = make_global(6)
    clients = [moved(base, seed, size=0.3) for seed in (16, 17, 18)]
    weights = [1.0, 2.0, 5.0]
    p = [w / sum(weights) for w in weights]
    method = create_method("svd").round_form()
    result = merge_round(base, clients, method, weights, server_lr=server_lr, device="cpu")
    dropped = total = 0.0
    for a_key, b_key in MODULES:
        start = product(base, a_key, b_key)
        update = sum(
            (
                share * (product(c, a_key, b_key) - start)
                for share, c in zip(p, clients, strict=True)
            ),
            torch.zeros_like(start),
        )
        target = start + server_lr * update
        rank = base[a_key].shape[0]
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        assert relative(product(result.tensors, a_key, b_key), best) < 1e-5, a_key
        assert float((target - best).norm()) > 1e-3 * float(target.norm())  # a real cut
        dropped += float(s[rank:].square().sum())
        total += float(s.square().sum())
        assert result.tensors[a_key].shape == base[a_key].shape
    assert result.report.relative_error == pytest.approx((dropped / total) ** 0.5, rel=1e-6)
    mean = sum(
        (share * c[HEAD].to(F64) for share, c in zip(p, clients, strict=True)),
        torch.zeros_like(base[HEAD], dtype=F64),
    )
    want_head = base[HEAD].to(F64) + server_lr * (mean - base[HEAD].to(F64))
    torch.testing.assert_close(result.tensors[HEAD].to(F64), want_head, rtol=1e-6, atol=1e-6)


def dare_mask(delta: torch.Tensor, drop_rate: float, seed: int) -> torch.Tensor:
    """dare.py's round-form mask of one client's float32 delta: keep where U[0,1) >= p, U drawn
    by a CPU generator seeded by the seed mixed with the blake2b-56 digest of the delta."""
    digest = hashlib.blake2b(delta.contiguous().numpy().tobytes(), digest_size=7).digest()
    mixed = (seed * 0x9E3779B1 + int.from_bytes(digest, "little")) % (2**63)
    generator = torch.Generator(device="cpu").manual_seed(mixed)
    return torch.rand(delta.shape, generator=generator) >= drop_rate


@pytest.mark.parametrize(("drop_rate", "seed"), [(0.5, 0), (0.3, 7)])
def test_dare_round_form_against_its_float64_reading(drop_rate: float, seed: int) -> None:
    base = make_global(8)
    clients = [moved(base, s) for s in (21, 22, 23, 24)]
    weights = [3.0, 1.0, 1.0, 3.0]
    p = [w / sum(weights) for w in weights]
    fuse_weight, server_lr = 1.5, 0.8
    method = create_method(
        "dare", drop_rate=drop_rate, fuse_weight=fuse_weight, seed=seed
    ).round_form()
    got = merge_round(base, clients, method, weights, server_lr=server_lr, device="cpu").tensors
    kept_fraction = []
    for index, pair in enumerate(MODULES):
        for factor, key in enumerate(pair):
            factor_seed = (seed * 1_000_003 + index) * 2 + factor
            merged = torch.zeros(base[key].shape, dtype=F64)
            for share, client in zip(p, clients, strict=True):
                delta = client[key].to(torch.float32) - base[key].to(torch.float32)
                keep = dare_mask(delta, drop_rate, factor_seed)
                kept_fraction.append(float(keep.float().mean()))
                merged += fuse_weight * share * delta.to(F64) * keep / (1.0 - drop_rate)
            want = base[key].to(F64) + server_lr * merged
            torch.testing.assert_close(got[key].to(F64), want, rtol=1e-5, atol=1e-6, msg=key)
    mean_kept = sum(kept_fraction) / len(kept_fraction)
    assert abs(mean_kept - (1.0 - drop_rate)) < 0.1  # the drop does drop
    mean = sum(
        (share * c[HEAD].to(F64) for share, c in zip(p, clients, strict=True)),
        torch.zeros_like(base[HEAD], dtype=F64),
    )
    # non-LoRA keys: the plain weighted mean of the deltas (no drop, no fuse weight)
    want_head = base[HEAD].to(F64) + server_lr * (mean - base[HEAD].to(F64))
    torch.testing.assert_close(got[HEAD].to(F64), want_head, rtol=1e-5, atol=1e-6)
