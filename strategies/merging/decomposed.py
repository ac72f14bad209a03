"""RobustMerge split at its seam: what one client can compute alone, and what needs them all.

Spec, "Decomposition worth knowing": steps 1-2 (pruning, complementary scale) read one task's
tensors only; steps 3-4 are sums over tasks of per-task terms followed by one division. Two
features rest on that:

- sparse uplink: each client prunes its own delta and computes its own s~ (``prune_adapter``),
  sends only what survived, and the server finishes with ``merge_pruned``; the result is the
  dense merge's (same masks, same arithmetic on the same stacks);
- secure aggregation: each client turns its delta into additive terms (``client_terms``), a
  secure sum adds them up, and the server divides once (``finish_from_sums``). Only the
  paper-exact form decomposes like this: the paper's equation multiplies each task's own
  factors, which a sum of per-client terms cannot express.

Module scales travel under the key ``<module name>::scale`` (``SCALE_SUFFIX``); PEFT keys never
contain ``::``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from strategies.merging.errors import MergeInputError
from strategies.merging.lora_keys import AdapterLayout, parse_layout
from strategies.merging.method import MergeMethod, check_form
from strategies.merging.robustmerge import RobustMerge

SCALE_SUFFIX = "::scale"


def client_pruning(method: MergeMethod) -> RobustMerge:
    """``method`` as the split pipeline runs it, for a method that declares
    ``prunes_on_client()``: the split is RobustMerge's steps 1-2 | 3-4, so a method that
    declares it and is not a RobustMerge is a programming error (TypeError naming it)."""
    if not method.prunes_on_client():
        raise ValueError(f"{method.describe()} does not prune on the client (dense uplink only)")
    if not isinstance(method, RobustMerge):
        raise TypeError(
            f"{type(method).__name__} declares prunes_on_client() but the client/server split "
            "(prune_adapter / merge_pruned) runs RobustMerge's steps only"
        )
    return method


def scale_key(module_name: str) -> str:
    """The flat key under which a module's scale vector s~ travels."""
    return module_name + SCALE_SUFFIX


def prune_adapter(
    tensors: Mapping[str, torch.Tensor], method: RobustMerge
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Steps 1-2 for one client: its pruned tensors and its s~ per LoRA module.

    Returns (pruned, scales): ``pruned`` has every key of ``tensors`` (LoRA factors pruned with
    ``method.keep_ratio``, other keys unchanged), float32; ``scales`` maps each module name to
    s~ (r,), floored as ``method`` floors it. Per tensor the same computation RobustMerge runs
    on that client's slice of a stack.
    """
    layout = parse_layout(tensors)
    pruned = {key: _float(tensors[key]) for key in tensors}
    scales: dict[str, torch.Tensor] = {}
    for module in layout.modules:
        a = pruned[module.a_key]
        b = pruned[module.b_key]
        a_pruned, b_pruned, scale = method.prune_and_scale(
            a.reshape(1, a.shape[0], -1), b.reshape(1, b.shape[0], b.shape[1])
        )
        pruned[module.a_key] = a_pruned.reshape(a.shape)
        pruned[module.b_key] = b_pruned.reshape(b.shape)
        scales[module.name] = scale[0]
    return pruned, scales


def merge_pruned(
    pruned: Sequence[Mapping[str, torch.Tensor]],
    scales: Sequence[Mapping[str, torch.Tensor]],
    method: RobustMerge,
    weights: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Steps 3-4 (either mode of ``method``) from the clients' pruned tensors and scales.

    ``weights``: normalised per-client weights (sum 1; None = equal). Equals ``merge_lora`` with
    ``method`` on the unpruned adapters. Computes one module at a time on ``device``; returns
    float32 CPU tensors in the first adapter's key order.
    """
    if not pruned or len(pruned) != len(scales):
        raise ValueError(
            f"merge_pruned needs one scale mapping per adapter; got {len(pruned)} adapters "
            f"and {len(scales)} scale mappings"
        )
    count = len(pruned)
    target = torch.device(device)
    p = torch.full((count,), 1.0 / count) if weights is None else weights.to(torch.float32)
    p = p.to(target)

    def stack(key: str) -> torch.Tensor:
        return torch.stack([_float(t[key]) for t in pruned]).to(target)

    layout = parse_layout(pruned[0])
    merged: dict[str, torch.Tensor] = {}
    for module in layout.modules:
        a_shape = pruned[0][module.a_key].shape
        b_shape = pruned[0][module.b_key].shape
        a_stack = stack(module.a_key).reshape(count, a_shape[0], -1)
        b_stack = stack(module.b_key).reshape(count, b_shape[0], b_shape[1])
        scale = torch.stack(
            [_module_scale(s, module.name, a_shape[0], index) for index, s in enumerate(scales)]
        ).to(target)
        pair = method.combine(a_stack, b_stack, scale, p)
        merged[module.a_key] = _float(pair.a).reshape(a_shape)
        merged[module.b_key] = _float(pair.b).reshape(b_shape)
    for key in layout.other_keys:
        merged[key] = _float(method.merge_other(stack(key), p))
    return {key: merged[key] for key in pruned[0]}


def client_terms(
    tensors: Mapping[str, torch.Tensor], method: RobustMerge
) -> dict[str, torch.Tensor]:
    """One client's additive terms of the paper-exact merge (equal client weights).

    Per module: A key -> lambda * A^, B key -> lambda * B^ with column i times s~[i],
    ``<module>::scale`` -> s~; other keys -> the tensor. Summed over clients and handed to
    ``finish_from_sums`` they give the merge of those clients.
    """
    if method.mode != "paper-exact":
        raise ValueError(
            "only RobustMerge's paper-exact mode decomposes into per-client sums; the paper's "
            "equation multiplies each client's own factors (mode 'paper-equation')"
        )
    if not isinstance(method.fuse_weight, float):
        raise ValueError("per-client terms need one shared fuse weight, not one per adapter")
    weight = method.fuse_weight
    pruned, scales = prune_adapter(tensors, method)
    terms = dict(pruned)
    for module in parse_layout(tensors).modules:
        scale = scales[module.name]
        terms[module.a_key] = weight * pruned[module.a_key]
        b = pruned[module.b_key]
        terms[module.b_key] = (b.reshape(b.shape[0], -1) * (weight * scale)[None, :]).reshape(
            b.shape
        )
        terms[scale_key(module.name)] = scale
    return terms


def finish_from_sums(
    sums: Mapping[str, torch.Tensor], count: int, form: str = "one-shot"
) -> dict[str, torch.Tensor]:
    """The merged tensors from the sums over ``count`` clients of their ``client_terms``.

    A_m = sum of lambda A^ (one-shot form; the round form divides it by ``count``, see
    ``RobustMerge``); B_m[:, i] = sum of lambda s~ B^[:, i] / sum of s~[i]; other keys the mean.
    Raises MergeInputError when a scale sum is missing, misshapen or not positive.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    a_divisor = float(count) if check_form(form) == "round" else 1.0
    tensor_keys = [key for key in sums if not key.endswith(SCALE_SUFFIX)]
    layout: AdapterLayout = parse_layout(tensor_keys)
    merged: dict[str, torch.Tensor] = {}
    for module in layout.modules:
        b = _float(sums[module.b_key])
        total = _module_scale(sums, module.name, b.shape[-1], None)
        if not bool((total > 0).all()):
            raise MergeInputError(
                "the summed scale has entries <= 0 (each client's s~ is >= 1)",
                key=scale_key(module.name),
            )
        merged[module.a_key] = _float(sums[module.a_key]) / a_divisor
        merged[module.b_key] = b / total
    for key in layout.other_keys:
        merged[key] = _float(sums[key]) / count
    return {key: merged[key] for key in tensor_keys}


def _module_scale(
    scales: Mapping[str, torch.Tensor], name: str, rank: int, adapter: int | None
) -> torch.Tensor:
    value = scales.get(name, scales.get(scale_key(name)))
    if value is None:
        raise MergeInputError("no scale vector for this module", adapter=adapter, key=name)
    flat = _float(value).reshape(-1)
    if flat.shape[0] != rank:
        raise MergeInputError(
            f"scale vector has {flat.shape[0]} entries, the module's rank is {rank}",
            adapter=adapter,
            key=name,
        )
    return flat


def _float(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=torch.float32)
