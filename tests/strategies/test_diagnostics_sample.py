"""The round's direction diagnostics sample: a streamed round keeps copies of the sampled
clients' factors (their replies are dropped once folded); a buffered round, which holds its
replies until it closes, keeps the replies themselves; both score the same."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strategies.merging.diagnostics import factorwise_gap
from strategies.merging.lora_keys import parse_layout
from strategies.round_diagnostics import DiagnosticsSample, HeldFactors, _factor_stacks
from strategies.round_report import RoundReport
from tests.strategies.test_rounds import A2_KEY, A_KEY, B2_KEY, B_KEY, make_global, moved


@dataclass(frozen=True)
class Client:
    """A client as the diagnostics read it."""

    node_id: int
    tensors: dict[str, torch.Tensor]

    def tensor(self, key: str) -> torch.Tensor:
        return self.tensors[key]


def _base() -> dict[str, torch.Tensor]:
    base = make_global(40)
    g = torch.Generator().manual_seed(41)
    base[A2_KEY] = torch.randn(4, 10, generator=g)
    base[B2_KEY] = torch.randn(7, 4, generator=g)
    return base


def _scored(by_reference: bool, clients: list[Client], base: dict[str, torch.Tensor]) -> tuple:
    sample = DiagnosticsSample(
        list(base), 2, seed=5, server_round=3, clients=3, by_reference=by_reference
    )
    for index, client in enumerate(clients):
        sample.offer(client, 1.0 + index)
    new_global = {k: v + 0.05 for k, v in base.items()}
    report = RoundReport(server_round=3)
    sample.score(base, new_global, True, report)
    return sample, report


def test_by_reference_holds_the_replies_and_scores_as_the_copies_do() -> None:
    base = _base()
    clients = [Client(node, moved(base, 50 + node, size=0.3)) for node in range(1, 7)]
    copied, copied_report = _scored(False, clients, base)
    referenced, referenced_report = _scored(True, clients, base)
    assert sorted(copied.held) == sorted(referenced.held)  # the same seeded pick of 3 of 6
    assert len(referenced.held) == 3
    for node, (_, held, _) in referenced.held.items():
        assert held is clients[node - 1]
    for node, (_, held, _) in copied.held.items():
        assert isinstance(held, HeldFactors)
        assert set(held.tensors) == {A_KEY, B_KEY, A2_KEY, B2_KEY}
        assert held.tensors[A_KEY].data_ptr() != clients[node - 1].tensors[A_KEY].data_ptr()
    assert referenced_report.direction_scores == copied_report.direction_scores
    assert referenced_report.direction_scores  # the scores exist
    assert referenced_report.factorwise_gap == copied_report.factorwise_gap > 0


def test_copies_do_not_follow_a_reply_changed_after_the_offer() -> None:
    base = _base()
    client = Client(1, moved(base, 60, size=0.3))
    sample = DiagnosticsSample(list(base), 2, seed=5, server_round=3)
    sample.offer(client, 1.0)
    before = client.tensors[B_KEY].clone()
    client.tensors[B_KEY].add_(1.0)
    held = sample.held[1][1]
    assert torch.equal(held.tensor(B_KEY), before)


def test_factor_stacks_lay_b_out_so_the_blocks_are_a_view() -> None:
    """[B_1 | ... | B_T] of ``factorwise_gap`` reads the B stack without copying it, and the
    stacks hold each client's factors in float64, in node order as given."""
    base = _base()
    clients = [Client(node, moved(base, 70 + node, size=0.3)) for node in range(1, 4)]
    module = next(m for m in parse_layout(list(base)).modules if m.a_key == A_KEY)
    a_stack, b_stack = _factor_stacks(clients, module)
    assert a_stack.dtype == b_stack.dtype == torch.float64
    for index, client in enumerate(clients):
        assert torch.equal(a_stack[index], client.tensors[A_KEY].double())
        assert torch.equal(b_stack[index], client.tensors[B_KEY].double())
    blocks = b_stack.permute(1, 0, 2).reshape(b_stack.shape[1], -1)
    assert blocks.data_ptr() == b_stack.data_ptr() and blocks._base is not None
    p = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    f32 = factorwise_gap(
        (base[A_KEY], base[B_KEY]),
        torch.stack([c.tensors[A_KEY] for c in clients]),
        torch.stack([c.tensors[B_KEY] for c in clients]),
        p,
    )
    assert factorwise_gap((base[A_KEY], base[B_KEY]), a_stack, b_stack, p) == f32
