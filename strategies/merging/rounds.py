"""One federated round's merge and server step, for every method (docs/algorithm.md, "Round forms").

The server holds a global adapter G; each client starts from G and returns its trained factors.
What a round merges depends on the method:

- factor-wise methods (paper-exact RobustMerge, fedavg, ties, dare) merge the factor deltas
  dA_t = A_t - A_G, dB_t = B_t - B_G (``target="delta"``) or the full adapters
  (``target="adapter"``), and the server step is G <- G + eta * merged (delta) or
  G <- G + eta * (merged - G) (adapter);
- product-space methods (svd, exact-mean, paper-equation RobustMerge) merge the clients' true
  weight updates U_t = B_t A_t - B_G A_G (times alpha/r, common to all): the new global's product
  is P = B_G A_G + eta * M, factored back to rank r by truncated SVD, computed from the stacked
  low-rank factors without forming P. With ``target="adapter"`` M = X - B_G A_G, X the one-shot
  merge of the full adapters.

Methods enter through ``MergeMethod.round_form()`` (the caller builds it), so every method here
is size-invariant: T clients that trained identically move the global as far as one of them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence

import torch

from strategies.merging.api import (
    MergeReport,
    MergeResult,
    merge_lora_with_report,
    normalised_weights,
    resolve_device,
    stack_tensors,
)
from strategies.merging.errors import MergeInputError
from strategies.merging.lowrank import low_rank_energy, truncate_product
from strategies.merging.method import MergeMethod
from strategies.merging.validation import validate_adapters

TARGETS: tuple[str, ...] = ("delta", "adapter")


class DeltaView(Mapping[str, torch.Tensor]):
    """A client's tensors minus the global's, computed key by key when the merge asks for them
    (the merge works module by module, so all deltas are never held at once)."""

    def __init__(
        self, tensors: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]
    ) -> None:
        self.tensors = tensors
        self.base = base

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key].to(torch.float32) - self.base[key].to(torch.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def merge_round(
    base: Mapping[str, torch.Tensor],
    clients: Sequence[Mapping[str, torch.Tensor]],
    method: MergeMethod,
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    server_lr: float = 1.0,
    target: str = "delta",
    device: str | torch.device | None = None,
    labels: Sequence[int | str] | None = None,
) -> MergeResult:
    """The new global adapter after one round, and the merge report.

    ``base``: the global adapter the clients started from. ``clients``: their full trained
    tensors (same keys and shapes as ``base``). ``method``: already in its round form.
    ``weights``: per-client weights (normalised here). Returns float32 CPU tensors in ``base``'s
    key order; ``report.relative_error`` and ``report.update_relative_error`` are set for
    product-space methods.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}; got {target!r}")
    _check_against_base(base, clients, labels)
    if method.merges_products():
        return _merge_products(base, clients, method, weights, server_lr, target, device, labels)
    inputs = [DeltaView(c, base) for c in clients] if target == "delta" else list(clients)
    result = merge_lora_with_report(inputs, method, weights, device, labels=labels)
    apply_server_step(base, result.tensors, server_lr, target)
    return MergeResult(tensors={key: result.tensors[key] for key in base}, report=result.report)


def apply_server_step(
    base: Mapping[str, torch.Tensor],
    merged: dict[str, torch.Tensor],
    server_lr: float,
    target: str,
) -> None:
    """Turn ``merged`` (a merged delta, or a merged adapter for ``target="adapter"``) into the
    new global in place, one key at a time: base + eta * delta, or base + eta * (merged - base)."""
    for key, value in base.items():
        update = merged[key]
        if target == "adapter":
            update.sub_(value)
        merged[key] = update.mul_(server_lr).add_(value.to(update.dtype))


def global_change_norm(
    before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]
) -> float:
    """||after - before||_F over every tensor: how far a round moved the global adapter."""
    squared = sum(
        float((after[key].to(torch.float64) - value.to(torch.float64)).square().sum())
        for key, value in before.items()
    )
    return float(squared**0.5)


def _check_against_base(
    base: Mapping[str, torch.Tensor],
    clients: Sequence[Mapping[str, torch.Tensor]],
    labels: Sequence[int | str] | None,
) -> None:
    names: Sequence[int | str] = labels if labels is not None else range(len(clients))
    for name, client in zip(names, clients, strict=False):
        if set(client) != set(base):
            odd = sorted(set(client) ^ set(base))
            raise MergeInputError(
                f"keys differ from the global adapter's: {', '.join(odd[:3])}", adapter=name
            )
        for key, value in base.items():
            if tuple(client[key].shape) != tuple(value.shape):
                raise MergeInputError(
                    f"shape {tuple(client[key].shape)} differs from the global's "
                    f"{tuple(value.shape)}",
                    adapter=name,
                    key=key,
                )


def _merge_products(
    base: Mapping[str, torch.Tensor],
    clients: Sequence[Mapping[str, torch.Tensor]],
    method: MergeMethod,
    weights: Sequence[float] | torch.Tensor | None,
    server_lr: float,
    target: str,
    device: str | torch.device | None,
    labels: Sequence[int | str] | None,
) -> MergeResult:
    layout = validate_adapters(clients, labels)
    count = len(clients)
    where = resolve_device(device)
    p = normalised_weights(weights, count, where)
    report = MergeReport(method=method.describe(), num_adapters=count, device=str(where))
    started = time.perf_counter()
    merged: dict[str, torch.Tensor] = {}
    dropped = total = update_energy = 0.0
    for module in layout.modules:
        a_shape = base[module.a_key].shape
        b_shape = base[module.b_key].shape
        rank = a_shape[0]
        a_global = base[module.a_key].to(device=where, dtype=torch.float32).reshape(rank, -1)
        b_global = base[module.b_key].to(device=where, dtype=torch.float32).reshape(-1, rank)
        a_stack = stack_tensors(clients, module.a_key, where).reshape(count, rank, -1)
        b_stack = stack_tensors(clients, module.b_key, where).reshape(count, -1, rank)
        if target == "delta":
            left, right = method.update_terms(a_global, b_global, a_stack, b_stack, p)
        else:
            x_left, x_right = method.product_terms(a_stack, b_stack, p)
            left = torch.cat([x_left, -b_global], dim=1)
            right = torch.cat([x_right, a_global], dim=0)
        step_left = server_lr * left
        pair = truncate_product(
            torch.cat([b_global, step_left], dim=1), torch.cat([a_global, right], dim=0), rank
        )
        merged[module.a_key] = pair.a.reshape(a_shape).to(device="cpu", dtype=torch.float32)
        merged[module.b_key] = pair.b.reshape(b_shape).to(device="cpu", dtype=torch.float32)
        if pair.relative_error is not None:
            report.relative_errors[module.name] = pair.relative_error
        dropped += pair.truncated_energy
        total += pair.total_energy
        update_energy += low_rank_energy(step_left, right)
    for key in layout.other_keys:
        stack = stack_tensors(clients, key, where)
        start = base[key].to(device=where, dtype=torch.float32)
        mean = method.merge_other(stack, p)
        merged[key] = (start + server_lr * (mean - start)).to(device="cpu", dtype=torch.float32)
    if layout.modules:
        report.relative_error = (dropped / total) ** 0.5 if total > 0 else 0.0
        report.update_relative_error = (
            (dropped / update_energy) ** 0.5 if update_energy > 0 else 0.0
        )
    report.seconds = time.perf_counter() - started
    return MergeResult(tensors={key: merged[key] for key in base}, report=report)
