"""One federated round's merge and server step, for every method (docs/algorithm.md, "Round forms").

The server holds a global adapter G; each client starts from G and returns its trained factors.
What a round merges depends on the method:

- factor-wise methods (paper-exact RobustMerge, fedavg, ties, dare) merge the factor deltas
  dA_t = A_t - A_G, dB_t = B_t - B_G (``target="delta"``) or the full adapters
  (``target="adapter"``), and the server step is G <- G + eta * merged (delta) or
  G <- G + eta * (merged - G) (adapter) (the step for every path: ``server_step.ServerStep``);
- product-space methods (svd, exact-mean, paper-equation RobustMerge) merge the clients' true
  weight updates U_t = B_t A_t - B_G A_G (times alpha/r, common to all): the new global's product
  is P = B_G A_G + eta * M, factored back to rank r by truncated SVD, computed from the stacked
  low-rank factors without forming P. With ``target="adapter"`` M = X - B_G A_G, X the one-shot
  merge of the full adapters.

Clients of different LoRA ranks (issue 16; ``strategies.merging.ranks``): when a client's
factors have another rank than the global's, the round goes through
``rank_rounds.merge_mixed_ranks`` module by module (product-space methods only,
``target="delta"``), each client's update taken against what a site of its rank started from
(``ranks.adapter_at_rank``, or ``sent``).

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
from strategies.merging.lora_keys import AdapterLayout, parse_layout
from strategies.merging.lowrank import low_rank_energy, truncate_product
from strategies.merging.method import MergeMethod
from strategies.merging.rank_rounds import merge_mixed_ranks
from strategies.merging.ranks import MixedRankError, adapter_at_rank, mixed_rank_support
from strategies.merging.server_step import ServerStep
from strategies.merging.validation import validate_adapters


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
    server_lr: float,
    target: str = "delta",
    device: str | torch.device | None = None,
    labels: Sequence[int | str] | None = None,
    sent: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
) -> MergeResult:
    """The new global adapter after one round, and the merge report.

    ``base``: the global adapter the clients started from. ``clients``: their full trained
    tensors (the keys of ``base``; the shapes of ``base``, or of one lower LoRA rank r_t per
    client: A r_t x d_in, B d_out x r_t). ``method``: already in its round form. ``weights``:
    per-client weights (normalised here). ``sent``: for mixed ranks, the adapter each rank's
    sites started from (default ``ranks.adapter_at_rank(base, r)``). Returns float32 CPU tensors
    in ``base``'s key order; ``report.relative_error`` and ``report.update_relative_error`` are
    set for product-space methods. Mixed ranks with a method that cannot merge them, or with
    ``target="adapter"``, raise ``ranks.MixedRankError`` with the reason.
    """
    step = ServerStep(server_lr, target)
    ranks = client_ranks(base, clients, labels)
    if ranks is not None:
        return _merge_mixed(
            base, clients, ranks, method, weights, server_lr, target, device, labels, sent
        )
    _check_against_base(base, clients, labels)
    if method.merges_products():
        return _merge_products(base, clients, method, weights, server_lr, target, device, labels)
    inputs = [DeltaView(c, base) for c in clients] if target == "delta" else list(clients)
    result = merge_lora_with_report(inputs, method, weights, device, labels=labels)
    step.apply(base, result.tensors)
    return MergeResult(tensors={key: result.tensors[key] for key in base}, report=result.report)


def global_change_norm(
    before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]
) -> float:
    """||after - before||_F over every tensor: how far a round moved the global adapter."""
    squared = sum(
        float((after[key].to(torch.float64) - value.to(torch.float64)).square().sum())
        for key, value in before.items()
    )
    return float(squared**0.5)


def client_ranks(
    base: Mapping[str, torch.Tensor],
    clients: Sequence[Mapping[str, torch.Tensor]],
    labels: Sequence[int | str] | None = None,
) -> list[int] | None:
    """Each client's LoRA rank when some client's differs from ``base``'s, else None.

    A client's rank is the first dimension of its first module's A; every module of the client
    must then be A (r_t x d_in), B (d_out x r_t) with the global's d_in, d_out, and every other
    key the global's shape (MergeInputError naming the client and key otherwise).
    """
    modules = parse_layout(base.keys()).modules
    if not modules or any(set(client) != set(base) for client in clients):
        return None  # _check_against_base names the odd keys
    global_rank = int(base[modules[0].a_key].shape[0])
    ranks = [int(client[modules[0].a_key].shape[0]) for client in clients]
    if all(rank == global_rank for rank in ranks):
        return None
    names: Sequence[int | str] = labels if labels is not None else range(len(clients))
    lora_keys = {key for m in modules for key in (m.a_key, m.b_key)}
    for name, client, rank in zip(names, clients, ranks, strict=False):
        for m in modules:
            a_g, b_g = base[m.a_key], base[m.b_key]
            expected = {m.a_key: (rank, *a_g.shape[1:]), m.b_key: (b_g.shape[0], rank)}
            for key, shape in expected.items():
                if tuple(client[key].shape) != shape:
                    raise MergeInputError(
                        f"shape {tuple(client[key].shape)}, expected {shape} at this client's "
                        f"rank {rank} (global {tuple(base[key].shape)})",
                        adapter=name,
                        key=key,
                    )
        for key in base:
            if key not in lora_keys and tuple(client[key].shape) != tuple(base[key].shape):
                raise MergeInputError(
                    f"shape {tuple(client[key].shape)} differs from the global's "
                    f"{tuple(base[key].shape)}",
                    adapter=name,
                    key=key,
                )
    return ranks


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
        step_left = ServerStep(server_lr).scale_update(left)
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
    return _finish_products(
        base,
        clients,
        layout,
        method,
        p,
        server_lr,
        where,
        merged,
        report,
        (dropped, total, update_energy),
        started,
    )


def _merge_mixed(
    base: Mapping[str, torch.Tensor],
    clients: Sequence[Mapping[str, torch.Tensor]],
    ranks: Sequence[int],
    method: MergeMethod,
    weights: Sequence[float] | torch.Tensor | None,
    server_lr: float,
    target: str,
    device: str | torch.device | None,
    labels: Sequence[int | str] | None,
    sent: Mapping[int, Mapping[str, torch.Tensor]] | None,
) -> MergeResult:
    """A round whose clients trained different ranks: ``rank_rounds.merge_mixed_ranks`` per
    module, the new global at the global's rank; other keys as in ``_merge_products``."""
    support = mixed_rank_support(method)
    if not support.mixed_ranks:
        raise MixedRankError(support.reason)
    if target != "delta":
        raise MixedRankError(
            "clients of different ranks are merged by their updates (merge-target 'delta'); "
            "merge-target 'adapter' would average full products of which lower-rank sites were "
            "sent only a truncation (FlexLoRA's form, which shrinks the global's trailing "
            "directions every round)"
        )
    layout = parse_layout(base.keys())
    count = len(clients)
    where = resolve_device(device)
    p = normalised_weights(weights, count, where)
    report = MergeReport(method=method.describe(), num_adapters=count, device=str(where))
    started = time.perf_counter()
    starts = {
        rank: (
            sent[rank] if sent is not None and rank in sent else adapter_at_rank(base, rank).tensors
        )
        for rank in sorted(set(ranks))
    }
    merged: dict[str, torch.Tensor] = {}
    dropped = total = update_energy = 0.0
    for module in layout.modules:
        a_global = base[module.a_key].to(device=where, dtype=torch.float32)
        b_global = base[module.b_key].to(device=where, dtype=torch.float32)
        pairs = {
            rank: (
                start[module.b_key].to(device=where, dtype=torch.float32),
                start[module.a_key].to(device=where, dtype=torch.float32),
            )
            for rank, start in starts.items()
        }
        result = merge_mixed_ranks(
            method,
            a_global,
            b_global,
            [client[module.a_key] for client in clients],
            [client[module.b_key] for client in clients],
            p,
            server_lr=server_lr,
            rank=int(a_global.shape[0]),
            sent=pairs,
            labels=labels,
        )
        merged[module.a_key] = result.a.to(device="cpu", dtype=torch.float32)
        merged[module.b_key] = result.b.to(device="cpu", dtype=torch.float32)
        report.relative_errors[module.name] = result.relative_error
        dropped += result.dropped_energy
        total += result.total_energy
        update_energy += result.update_energy
    return _finish_products(
        base,
        clients,
        layout,
        method,
        p,
        server_lr,
        where,
        merged,
        report,
        (dropped, total, update_energy),
        started,
    )


def _finish_products(
    base: Mapping[str, torch.Tensor],
    clients: Sequence[Mapping[str, torch.Tensor]],
    layout: AdapterLayout,
    method: MergeMethod,
    p: torch.Tensor,
    server_lr: float,
    where: torch.device,
    merged: dict[str, torch.Tensor],
    report: MergeReport,
    energies: tuple[float, float, float],
    started: float,
) -> MergeResult:
    """The end of a product-space round (equal or mixed ranks): the non-LoRA keys stepped
    towards the method's mean, and the report's truncation errors from the summed (dropped,
    total, update) energies over the modules."""
    for key in layout.other_keys:
        stack = stack_tensors(clients, key, where)
        start = base[key].to(device=where, dtype=torch.float32)
        mean = method.merge_other(stack, p)
        moved = ServerStep(server_lr).towards(start, mean)
        merged[key] = moved.to(device="cpu", dtype=torch.float32)
    dropped, total, update_energy = energies
    if layout.modules:
        report.relative_error = (dropped / total) ** 0.5 if total > 0 else 0.0
        report.update_relative_error = (
            (dropped / update_energy) ** 0.5 if update_energy > 0 else 0.0
        )
    report.seconds = time.perf_counter() - started
    return MergeResult(tensors={key: merged[key] for key in base}, report=report)
