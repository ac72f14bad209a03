"""The server step (``strategies.merging.server_step``), hand-checked on small tensors, and the
client-pruning declaration the sparse uplink reads (``decomposed.client_pruning``)."""

from __future__ import annotations

import pytest
import torch

from strategies.merging.decomposed import client_pruning
from strategies.merging.fedavg import FedAvg
from strategies.merging.robustmerge import RobustMerge
from strategies.merging.server_step import ServerStep


def test_a_delta_moves_the_global_by_eta_times_the_merge_in_place() -> None:
    base = {"w": torch.tensor([1.0, -2.0]), "v": torch.tensor([[0.5]])}
    merged = {"w": torch.tensor([2.0, 4.0]), "v": torch.tensor([[-1.0]])}
    held = merged["w"]
    ServerStep(0.5).apply(base, merged)
    assert torch.equal(merged["w"], torch.tensor([2.0, 0.0]))  # 1 + 1, -2 + 2
    assert torch.equal(merged["v"], torch.tensor([[0.0]]))  # 0.5 - 0.5
    assert merged["w"].data_ptr() == held.data_ptr()  # no second copy of the adapter
    assert torch.equal(base["w"], torch.tensor([1.0, -2.0]))  # the old global is untouched


def test_an_adapter_merge_moves_the_global_eta_of_the_way_towards_it() -> None:
    base = {"w": torch.tensor([1.0, -2.0])}
    merged = {"w": torch.tensor([3.0, 2.0])}
    ServerStep(0.25, "adapter").apply(base, merged)
    assert torch.equal(merged["w"], torch.tensor([1.5, -1.0]))  # 1 + (2)/4, -2 + 4/4


def test_the_other_forms_are_the_same_rule() -> None:
    step = ServerStep(4.0)
    start = torch.tensor([1.0, 2.0])
    assert torch.equal(step.moved_by(start, torch.tensor([0.5, -0.25])), torch.tensor([3.0, 1.0]))
    assert torch.equal(step.towards(start, torch.tensor([2.0, 2.0])), torch.tensor([5.0, 2.0]))
    assert torch.equal(step.scale_update(torch.tensor([[1.0, -0.5]])), torch.tensor([[4.0, -2.0]]))
    assert torch.equal(start, torch.tensor([1.0, 2.0]))


def test_an_unknown_target_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"target must be one of delta, adapter; got 'both'"):
        ServerStep(1.0, "both")


def test_client_pruning_follows_the_method_declaration() -> None:
    exact = RobustMerge(mode="paper-exact")
    assert client_pruning(exact) is exact
    with pytest.raises(ValueError, match="does not prune on the client"):
        client_pruning(RobustMerge(mode="paper-equation"))
    with pytest.raises(ValueError, match="does not prune on the client"):
        client_pruning(FedAvg())

    class Pretender(FedAvg):
        def prunes_on_client(self) -> bool:
            return True

    with pytest.raises(TypeError, match="Pretender declares prunes_on_client"):
        client_pruning(Pretender())
