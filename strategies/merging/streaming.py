"""Round merges that fold one client at a time into running sums: O(1) adapters in memory.

A federated round hands the server T replies. The methods below need only sums over clients of
terms each client's tensors give alone, followed by one division at the end, so the server can
fold each reply in as it arrives and drop it (docs/strategy.md, "Streaming rounds"):

- fedavg: A_m = sum_t w_t A_t / sum_t w_t (and B, and other keys alike);
- RobustMerge paper-exact, round form (spec, "Decomposition worth knowing"): with p_t = w_t / W,
  lambda_t = lambda T p_t and the round form's A divided by T,
      A_m = lambda / W * sum_t w_t A^_t,
      B_m[:, i] = lambda T / W * sum_t w_t s~_t[i] B^_t[:, i] / sum_t s~_t[i],
  where A^_t, B^_t, s~_t are steps 1-2 on client t's tensors alone; other keys the weighted
  mean. The same terms come from a sparse-uplink reply (the client pruned and scaled).

- ties: with p_t = w_t / W, TIES trims each client's (T p_t)-scaled tensor, and a positive
  scale neither changes which entries a client keeps nor the elected sign, so with
  v_t = trim(x_t) the fold keeps P = sum_t w_t v_t+ and N = sum_t w_t v_t- (the positive and
  negative parts) and how many clients put a positive or a negative value on each entry; then
  sign = sign(P + N) and the disjoint mean is lambda T / W * (P or N) / (its count). Other keys
  the weighted mean.

- dare: its round form drops each client's entries with a mask seeded by (seed, module, factor,
  a digest of that client's own tensor: ``drop_each_by_content``), so a client's kept and
  rescaled tensor depends on that client alone: A_m = lambda / W * sum_t w_t drop_t(A_t), and
  B alike; other keys the weighted mean.

Every sum is an ``ExactSum``, so the merge does not depend on the order the replies arrive in,
bit for bit. Methods without a fold here buffer: ``round_fold`` returns None for them; the
product-space methods (svd, exact-mean, paper-equation) factor the stacked factors, which needs
every client at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import torch

from strategies.merging.dare import Dare, drop_each_by_content
from strategies.merging.exact_sum import ExactSum
from strategies.merging.fedavg import FedAvg
from strategies.merging.lora_keys import AdapterLayout, LoraModule, parse_layout
from strategies.merging.method import MergeMethod
from strategies.merging.pruning import prune_by_magnitude
from strategies.merging.robustmerge import RobustMerge
from strategies.merging.ties import Ties


class RoundFold(Protocol):
    """A round's merge, fed one client at a time."""

    @property
    def count(self) -> int:
        """Clients folded in so far."""
        ...

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
        """Fold in one client's tensors (its delta, or its adapter) with weight ``weight``."""
        ...

    def finish(self) -> dict[str, torch.Tensor]:
        """The merged tensors (float32, CPU, the layout's key order); needs >= 1 client. Once:
        the running sums are released as they are read (the fold's memory is then free for
        what follows the merge), and the fold takes no more clients."""
        ...


def round_fold(
    method: MergeMethod, layout_keys: list[str], device: torch.device | str = "cpu"
) -> RoundFold | None:
    """A fold for ``method`` (already in its round form) over adapters with ``layout_keys``,
    or None when the method needs every client at once."""
    if isinstance(method, RobustMerge):
        foldable = method.mode == "paper-exact" and method.form == "round"
        if foldable and isinstance(method.fuse_weight, float):
            return RobustMergeFold(method, layout_keys, device)
        return None
    if type(method) is FedAvg:
        return MeanFold(layout_keys, device)
    if type(method) is Ties:
        return TiesFold(method, layout_keys, device)
    if type(method) is Dare and method.form == "round" and isinstance(method.fuse_weight, float):
        return DareFold(method, layout_keys, device)
    return None


class _Weights:
    """The clients' weights: their count and their exact sum (``math.fsum``)."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def add(self, weight: float) -> None:
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"a client's weight must be finite and > 0, got {weight}")
        self.values.append(float(weight))

    @property
    def count(self) -> int:
        return len(self.values)

    def total(self) -> float:
        if not self.values:
            raise ValueError("no client was folded in")
        return math.fsum(self.values)


class _Sums:
    """One ``ExactSum`` per key, created on first use."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = device
        self.sums: dict[str, ExactSum] = {}

    def add(self, key: str, term: torch.Tensor, factor: float | torch.Tensor = 1.0) -> None:
        """Add ``term * factor`` (the product in float64; a factor of 1 is skipped, exactly)."""
        if key not in self.sums:
            self.sums[key] = ExactSum(term.shape, self.device)
        unit = isinstance(factor, float) and factor == 1.0
        self.sums[key].add(term, None if unit else factor)

    def take(self, key: str) -> torch.Tensor:
        """The sum under ``key`` (float64), releasing its bins."""
        return self.sums.pop(key).value()


class _Fold:
    """What every fold keeps: the keys it merges, the device and the clients' weights."""

    def __init__(self, layout_keys: list[str], device: torch.device | str) -> None:
        self.keys = list(layout_keys)
        self.device = torch.device(device)
        self.weights = _Weights()
        self.finished = False

    @property
    def count(self) -> int:
        """Clients folded in so far."""
        return self.weights.count

    def _accept(self, weight: float) -> None:
        """Count one more client of weight ``weight`` (RuntimeError once finished)."""
        if self.finished:
            raise RuntimeError("this fold has finished; it takes no more clients")
        self.weights.add(weight)

    def _close(self) -> float:
        """Mark the fold finished; the clients' total weight (ValueError without any)."""
        if self.finished:
            raise RuntimeError("this fold has already finished (its sums were released)")
        total = self.weights.total()
        self.finished = True
        return total


class MeanFold(_Fold):
    """fedavg's round: the weighted mean of every tensor."""

    def __init__(self, layout_keys: list[str], device: torch.device | str = "cpu") -> None:
        super().__init__(layout_keys, device)
        self.sums = _Sums(device)

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
        self._accept(weight)
        for key in self.keys:
            self.sums.add(key, tensors[key], weight)

    def finish(self) -> dict[str, torch.Tensor]:
        total = self._close()
        return {key: _result(self.sums.take(key) / total) for key in self.keys}


class RobustMergeFold(_Fold):
    """RobustMerge paper-exact in its round form (module docstring), from each client's tensors
    (``add``) or from its own pruned tensors and scales (``add_pruned``: the sparse uplink)."""

    def __init__(
        self, method: RobustMerge, layout_keys: list[str], device: torch.device | str = "cpu"
    ) -> None:
        if not (method.mode == "paper-exact" and method.form == "round"):
            raise ValueError("RobustMergeFold folds RobustMerge paper-exact in its round form")
        if not isinstance(method.fuse_weight, float):
            raise ValueError("a streamed round needs one shared fuse weight")
        super().__init__(layout_keys, device)
        self.method = method
        self.fuse_weight = method.fuse_weight
        self.layout: AdapterLayout = parse_layout(self.keys)
        self.sums = _Sums(device)
        self.scale_sums = _Sums(device)
        self.shapes: dict[str, torch.Size] = {}

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
        """Steps 1-2 on this client's tensors alone (module by module), then fold them in."""
        self._accept(weight)
        for module in self.layout.modules:
            a = tensors[module.a_key].to(device=self.device, dtype=torch.float32)
            b = tensors[module.b_key].to(device=self.device, dtype=torch.float32)
            a_pruned, b_pruned, scale = self.method.prune_and_scale(
                a.reshape(1, a.shape[0], -1), b.reshape(1, b.shape[0], b.shape[1])
            )
            self._add_module(module, a_pruned[0], b_pruned[0], scale[0], weight)
            self._shapes(module, a, b)
        self._add_others(tensors, weight)

    def add_pruned(
        self,
        pruned: Mapping[str, torch.Tensor],
        scales: Mapping[str, torch.Tensor],
        weight: float = 1.0,
    ) -> None:
        """Fold in a client that pruned and scaled its own delta (sparse uplink): ``pruned`` its
        pruned tensors, ``scales`` its s~ per module name."""
        self._accept(weight)
        for module in self.layout.modules:
            a = pruned[module.a_key].to(device=self.device, dtype=torch.float32)
            b = pruned[module.b_key].to(device=self.device, dtype=torch.float32)
            scale = scales[module.name].to(device=self.device, dtype=torch.float32).reshape(-1)
            if scale.shape[0] != a.shape[0] or not bool((scale > 0).all()):
                raise ValueError(
                    f"module {module.name}: the scale vector must have the rank's "
                    f"{a.shape[0]} entries, all > 0"
                )
            self._add_module(
                module, a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), scale, weight
            )
            self._shapes(module, a, b)
        self._add_others(pruned, weight)

    def _add_module(
        self,
        module: LoraModule,
        a_pruned: torch.Tensor,
        b_pruned: torch.Tensor,
        scale: torch.Tensor,
        weight: float,
    ) -> None:
        """Fold one module's terms: w A^ (r x d_in), w s~ B^ (d_out x r), s~."""
        self.sums.add(module.a_key, a_pruned, weight)
        self.sums.add(module.b_key, b_pruned, scale.to(torch.float64) * weight)
        self.scale_sums.add(module.name, scale)

    def _shapes(self, module: LoraModule, a: torch.Tensor, b: torch.Tensor) -> None:
        """Remember the factors' own shapes (conv LoRA has 4-D ones) for ``finish``."""
        self.shapes.setdefault(module.a_key, a.shape)
        self.shapes.setdefault(module.b_key, b.shape)

    def _add_others(self, tensors: Mapping[str, torch.Tensor], weight: float) -> None:
        for key in self.layout.other_keys:
            self.sums.add(key, tensors[key], weight)

    def finish(self) -> dict[str, torch.Tensor]:
        total = self._close()
        count = self.weights.count
        merged: dict[str, torch.Tensor] = {}
        for module in self.layout.modules:
            a = self.sums.take(module.a_key) * (self.fuse_weight / total)
            b = self.sums.take(module.b_key) * (self.fuse_weight * count / total)
            b = b / self.scale_sums.take(module.name)
            merged[module.a_key] = _result(a.reshape(self.shapes[module.a_key]))
            merged[module.b_key] = _result(b.reshape(self.shapes[module.b_key]))
        for key in self.layout.other_keys:
            merged[key] = _result(self.sums.take(key) / total)
        return {key: merged[key] for key in self.keys}


class TiesFold(_Fold):
    """TIES in rounds (module docstring): per-sign exact sums and vote counts per entry."""

    def __init__(self, method: Ties, layout_keys: list[str], device: torch.device | str = "cpu"):
        super().__init__(layout_keys, device)
        self.keep_ratio = method.keep_ratio
        self.fuse_weight = method.fuse_weight
        self.lora_keys = {
            key for m in parse_layout(self.keys).modules for key in (m.a_key, m.b_key)
        }
        self.positive = _Sums(device)
        self.negative = _Sums(device)
        self.others = _Sums(device)  # non-LoRA keys: the weighted mean
        self.votes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
        self._accept(weight)
        for key in self.keys:
            value = tensors[key].to(device=self.device, dtype=torch.float32)
            if key not in self.lora_keys:
                self.others.add(key, value, weight)
                continue
            kept = prune_by_magnitude(value.unsqueeze(0), self.keep_ratio)[0].to(torch.float64)
            self.positive.add(key, kept.clamp(min=0), weight)
            self.negative.add(key, kept.clamp(max=0), weight)
            up, down = self.votes.get(key) or (
                torch.zeros(kept.shape, dtype=torch.int32, device=self.device),
                torch.zeros(kept.shape, dtype=torch.int32, device=self.device),
            )
            self.votes[key] = (up + (kept > 0).int(), down + (kept < 0).int())

    def finish(self) -> dict[str, torch.Tensor]:
        total = self._close()
        scale = self.fuse_weight * self.weights.count / total
        merged: dict[str, torch.Tensor] = {}
        for key in self.keys:
            if key not in self.lora_keys:
                merged[key] = _result(self.others.take(key) / total)
                continue
            positive, negative = self.positive.take(key), self.negative.take(key)
            up, down = self.votes.pop(key)
            elected = torch.sign(positive + negative)
            chosen = torch.where(elected > 0, positive, torch.where(elected < 0, negative, 0.0))
            voters = torch.where(elected > 0, up, torch.where(elected < 0, down, 0))
            mean = torch.where(voters > 0, chosen / voters.clamp(min=1), torch.zeros_like(chosen))
            merged[key] = _result(scale * mean)
        return merged


class DareFold(_Fold):
    """DARE in rounds (module docstring): each client's factors dropped and rescaled with the
    masks ``Dare.merge_pair`` gives them, folded into weighted exact sums."""

    def __init__(self, method: Dare, layout_keys: list[str], device: torch.device | str = "cpu"):
        if method.form != "round" or not isinstance(method.fuse_weight, float):
            raise ValueError("DareFold folds DARE's round form with one shared fuse weight")
        super().__init__(layout_keys, device)
        self.drop_rate = method.drop_rate
        self.fuse_weight = method.fuse_weight
        self.layout = parse_layout(self.keys)
        self.seeds: dict[str, int] = {}  # each factor's mask seed, as merge_pair derives it
        for index, module in enumerate(self.layout.modules):
            base = (method.seed * 1_000_003 + index) * 2
            self.seeds[module.a_key], self.seeds[module.b_key] = base, base + 1
        self.sums = _Sums(device)

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
        self._accept(weight)
        for key, seed in self.seeds.items():
            # merge_pair digests the same float32 bytes and draws its mask over the same number
            # of entries in the same order, whatever shape it views the factor in
            value = tensors[key].to(device=self.device, dtype=torch.float32).contiguous()
            kept = drop_each_by_content(value[None], self.drop_rate, seed)[0]
            self.sums.add(key, kept, weight)
        for key in self.layout.other_keys:
            self.sums.add(key, tensors[key], weight)

    def finish(self) -> dict[str, torch.Tensor]:
        total = self._close()
        merged = {key: self.sums.take(key) * (self.fuse_weight / total) for key in self.seeds}
        merged |= {key: self.sums.take(key) / total for key in self.layout.other_keys}
        return {key: _result(merged[key]) for key in self.keys}


def _result(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(device="cpu", dtype=torch.float32)
