"""Direct checks of ``rounds`` (one round's merge and server step): ``DeltaView``,
``global_change_norm`` and ``client_ranks`` by hand, every refusal with its whole message, the
report's fields and summed errors, float32 use of a float64 global, and the mixed-rank branch's
sent factors, target rank and non-LoRA keys against float64 readings written here.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from strategies.merging import create_method, rounds
from strategies.merging.errors import MergeInputError
from strategies.merging.method import MergeMethod
from strategies.merging.rank_rounds import merge_mixed_ranks
from strategies.merging.ranks import MixedRankError
from strategies.merging.rounds import DeltaView, client_ranks, global_change_norm, merge_round
from tests.strategies.test_rounds import A2_KEY, A_KEY, B2_KEY, B_KEY, HEAD, make_global, moved

F64 = torch.float64
MODULE_KEYS = [(A_KEY, B_KEY), (A2_KEY, B2_KEY)]
MODULE_NAMES = [A_KEY.replace(".lora_A", ""), A2_KEY.replace(".lora_A", "")]


def exact(message: str) -> str:
    """A pattern matching the whole message."""
    return "^" + re.escape(message) + "$"


def method_of(name: str, **options: object) -> MergeMethod:
    return create_method(name, **options).round_form()


def at_rank(base: dict[str, torch.Tensor], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A client of another LoRA rank (random factors of the global's module sizes; the head
    moved)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for a_key, b_key in MODULE_KEYS:
        out[a_key] = torch.randn(rank, base[a_key].shape[1], generator=g)
        out[b_key] = torch.randn(base[b_key].shape[0], rank, generator=g) * 0.3
    out[HEAD] = base[HEAD] + 0.1 * torch.randn(base[HEAD].shape, generator=g)
    return out


def own_sent(
    base: dict[str, torch.Tensor], ranks: list[int], seed: int = 50
) -> dict[int, dict[str, torch.Tensor]]:
    """Per-rank start adapters that are not the global's truncation."""
    return {rank: at_rank(base, rank, seed + rank) for rank in sorted(set(ranks))}


# --- DeltaView and global_change_norm ---------------------------------------------------------


def test_delta_view_is_the_float32_difference() -> None:
    """A key of the view is float32(client) - float32(global), whatever the inputs' dtype."""
    client = {"w": torch.tensor([1.0 + 2**-40, 3.0], dtype=F64)}
    base = {"w": torch.tensor([1.0, 2.0 + 2**-40], dtype=F64)}
    view = DeltaView(client, base)
    delta = view["w"]
    assert delta.dtype == torch.float32
    assert torch.equal(delta, torch.tensor([0.0, 1.0]))
    assert list(view) == ["w"] and len(view) == 1


def test_global_change_norm_by_hand() -> None:
    """||after - before||_F over every tensor, summed in float64 (2^-20 survives 25)."""
    before = {"x": torch.tensor([1.0, 5.0]), "y": torch.tensor([[2.0]])}
    after = {"x": torch.tensor([4.0, 5.0 + 2**-10]), "y": torch.tensor([[-2.0]])}
    assert global_change_norm(before, after) == math.sqrt(25.0 + 2**-20)
    assert global_change_norm(before, before) == 0.0


# --- client_ranks -----------------------------------------------------------------------------


def test_client_ranks_by_module_zero_of_a_global_with_unequal_module_ranks() -> None:
    """The rank is read from the first module's A: global-shaped clients give None."""
    base = make_global(0)
    base[A2_KEY] = base[A2_KEY][:2].clone()
    base[B2_KEY] = base[B2_KEY][:, :2].clone()
    same = moved(base, 1)
    assert client_ranks(base, [same, moved(base, 2)]) is None


def test_client_ranks_leaves_clients_with_other_keys_to_the_base_check() -> None:
    """A client whose keys differ from the global's gives None even when its rank differs."""
    base = make_global(0)
    client = at_rank(base, 2, 3)
    client["extra"] = torch.zeros(1)
    assert client_ranks(base, [client, moved(base, 1)]) is None
    assert client_ranks({HEAD: base[HEAD]}, [{HEAD: base[HEAD]}]) is None


def test_client_ranks_names_a_lora_key_of_the_wrong_rank() -> None:
    """Every module must have the client's rank: the client and key are named."""
    base = make_global(0)
    client = at_rank(base, 2, 3)
    client[A2_KEY] = torch.zeros(3, 7)
    message = (
        f"adapter site-x, key {A2_KEY!r}: shape (3, 7), expected (2, 7) at this client's rank 2 "
        "(global (4, 7))"
    )
    with pytest.raises(MergeInputError, match=exact(message)):
        client_ranks(base, [moved(base, 1), client], ["a", "site-x"])


def test_client_ranks_names_a_non_lora_key_of_another_shape() -> None:
    """Other keys keep the global's shape at any rank: the client and key are named."""
    base = make_global(0)
    client = at_rank(base, 2, 3)
    client[HEAD] = torch.zeros(3, 11)
    message = f"adapter 1, key {HEAD!r}: shape (3, 11) differs from the global's (3, 10)"
    with pytest.raises(MergeInputError, match=exact(message)) as caught:
        client_ranks(base, [moved(base, 1), client])
    assert caught.value.adapter == 1 and caught.value.key == HEAD


# --- merge_round: refusals --------------------------------------------------------------------


def test_round_refuses_other_keys_naming_the_first_three() -> None:
    """A client's odd keys (missing or extra, sorted, the first three) are named with its label."""
    base = make_global(0)
    client = moved(base, 1)
    del client[A_KEY]
    client.update({"z1": torch.zeros(1), "z2": torch.zeros(1), "a0": torch.zeros(1)})
    message = f"adapter lab: keys differ from the global adapter's: a0, {A_KEY}, z1"
    with pytest.raises(MergeInputError, match=exact(message)) as caught:
        merge_round(
            base, [moved(base, 2), client], method_of("svd"), server_lr=1.0, labels=["k", "lab"]
        )
    assert caught.value.adapter == "lab"


def test_round_refuses_a_key_of_another_shape_naming_the_label() -> None:
    """At the global's rank a key of another shape is refused with the label and key."""
    base = make_global(0)
    client = moved(base, 1)
    client[HEAD] = torch.zeros(3, 11)
    message = f"adapter lab, key {HEAD!r}: shape (3, 11) differs from the global's (3, 10)"
    with pytest.raises(MergeInputError, match=exact(message)):
        merge_round(base, [client], method_of("fedavg"), server_lr=1.0, labels=["lab"])


@pytest.mark.parametrize("name", ["svd", "fedavg"])
def test_round_refuses_labels_of_the_wrong_length(name: str) -> None:
    """Labels of another length than the clients are refused by the adapters' validation."""
    base = make_global(0)
    clients = [moved(base, 1), moved(base, 2)]
    message = "labels has 1 entries for 2 adapters; give one per adapter"
    with pytest.raises(MergeInputError, match=exact(message)):
        merge_round(base, clients, method_of(name), server_lr=1.0, labels=["only"])


def test_mixed_round_refuses_labels_of_the_wrong_length() -> None:
    """Mixed ranks: labels of another length reach ``merge_mixed_ranks``'s check."""
    base = make_global(0)
    clients = [at_rank(base, 2, 1), at_rank(base, 4, 2)]
    with pytest.raises(MergeInputError, match=exact("labels has 1 entries for 2 clients")):
        merge_round(base, clients, method_of("svd"), server_lr=1.0, labels=["only"])


def test_round_names_a_non_finite_client_by_its_label() -> None:
    """The product path validates the clients with their labels."""
    base = make_global(0)
    client = moved(base, 1)
    client[A_KEY][0, 0] = float("nan")
    with pytest.raises(MergeInputError, match=r"^adapter lab, key "):
        merge_round(
            base, [moved(base, 2), client], method_of("svd"), server_lr=1.0, labels=[0, "lab"]
        )


def test_mixed_round_refuses_adapter_target_with_the_whole_reason() -> None:
    """Mixed ranks with merge-target 'adapter' are refused with the whole reason."""
    base = make_global(0)
    clients = [at_rank(base, 2, 1), at_rank(base, 4, 2)]
    message = (
        "clients of different ranks are merged by their updates (merge-target 'delta'); "
        "merge-target 'adapter' would average full products of which lower-rank sites were "
        "sent only a truncation (FlexLoRA's form, which shrinks the global's trailing "
        "directions every round)"
    )
    with pytest.raises(MixedRankError, match=exact(message)):
        merge_round(base, clients, method_of("svd"), server_lr=1.0, target="adapter")


# --- merge_round: values and reports ----------------------------------------------------------


def test_factor_wise_adapter_target_steps_towards_the_mean_adapter() -> None:
    """fedavg with target 'adapter': G + eta (sum_t p_t C_t - G), key by key, in float64."""
    base = make_global(1)
    clients = [moved(base, 3), moved(base, 4)]
    result = merge_round(
        base, clients, method_of("fedavg"), [1.0, 3.0], server_lr=0.5, target="adapter"
    )
    for key, value in base.items():
        mean = 0.25 * clients[0][key].to(F64) + 0.75 * clients[1][key].to(F64)
        expected = value.to(F64) + 0.5 * (mean - value.to(F64))
        assert torch.allclose(result.tensors[key].to(F64), expected, rtol=0, atol=1e-6), key
    assert result.report.num_adapters == 2
    assert result.report.method == method_of("fedavg").describe()


@pytest.mark.parametrize("name", ["svd", "fedavg"])
def test_report_names_the_method_count_and_device_asked_for(name: str) -> None:
    """The report carries the method, the client count and the device as asked ('cpu:0')."""
    base = make_global(2)
    clients = [moved(base, 5), moved(base, 6), moved(base, 7)]
    method = method_of(name)
    result = merge_round(base, clients, method, server_lr=1.0, device="cpu:0")
    assert result.report.method == method.describe()
    assert result.report.num_adapters == 3
    assert result.report.device == "cpu:0"
    assert list(result.tensors) == list(base)


def test_mixed_report_names_the_method_count_and_device_asked_for() -> None:
    """Mixed ranks: the same report fields."""
    base = make_global(2)
    clients = [at_rank(base, 2, 5), at_rank(base, 3, 6), moved(base, 7)]
    method = method_of("exact-mean")
    result = merge_round(base, clients, method, server_lr=1.0, device="cpu:0")
    assert result.report.method == method.describe()
    assert result.report.num_adapters == 3
    assert result.report.device == "cpu:0"


@pytest.mark.parametrize("mixed", [False, True])
def test_a_float64_global_is_used_as_float32(mixed: bool) -> None:
    """A float64 global gives the round of its float32 cast, bit for bit (every key)."""
    base32 = make_global(3)
    base64 = {key: value.to(F64) + 1e-9 for key, value in base32.items()}
    base32 = {key: value.to(torch.float32) for key, value in base64.items()}
    if mixed:
        clients = [at_rank(base32, 2, 8), moved(base32, 9)]
    else:
        clients = [moved(base32, 8), moved(base32, 9)]
    for name in ("svd", "fedavg") if not mixed else ("svd",):
        method = method_of(name)
        want = merge_round(base32, clients, method, [1.0, 2.0], server_lr=0.7)
        got = merge_round(base64, clients, method, [1.0, 2.0], server_lr=0.7)
        for key in base32:
            assert got.tensors[key].dtype == torch.float32
            assert torch.equal(got.tensors[key], want.tensors[key]), (name, key)


def test_mixed_round_is_merge_mixed_ranks_with_the_given_sent_and_the_global_rank() -> None:
    """Mixed ranks: per module merge_mixed_ranks(sent, global rank); head and summed errors."""
    base = make_global(4)
    ranks = [2, 6, 4]
    clients = [at_rank(base, r, 20 + r) for r in ranks]
    sent = own_sent(base, ranks)
    weights = [1.0, 2.0, 3.0]
    method = method_of("exact-mean")
    result = merge_round(base, clients, method, weights, server_lr=0.8, sent=sent)
    dropped = total = update = 0.0
    for (a_key, b_key), name in zip(MODULE_KEYS, MODULE_NAMES, strict=True):
        expected = merge_mixed_ranks(
            method,
            base[a_key],
            base[b_key],
            [c[a_key] for c in clients],
            [c[b_key] for c in clients],
            weights,
            server_lr=0.8,
            rank=4,
            sent={r: (s[b_key], s[a_key]) for r, s in sent.items()},
        )
        assert torch.equal(result.tensors[a_key], expected.a)
        assert torch.equal(result.tensors[b_key], expected.b)
        assert result.tensors[a_key].shape == base[a_key].shape
        assert result.report.relative_errors[name] == expected.relative_error
        assert expected.dropped_energy > 0
        dropped += expected.dropped_energy
        total += expected.total_energy
        update += expected.update_energy
    assert result.report.relative_error == pytest.approx((dropped / total) ** 0.5, rel=1e-12)
    assert result.report.update_relative_error == pytest.approx(
        (dropped / update) ** 0.5, rel=1e-12
    )
    p = [w / sum(weights) for w in weights]
    mean = sum(share * c[HEAD].to(F64) for share, c in zip(p, clients, strict=True))
    head = base[HEAD].to(F64) + 0.8 * (mean - base[HEAD].to(F64))
    assert torch.allclose(result.tensors[HEAD].to(F64), head, rtol=0, atol=1e-6)


def test_mixed_round_without_sent_is_merge_mixed_ranks_from_the_sites_starts() -> None:
    """Without ``sent`` (or with an empty one) each rank starts from ``adapter_at_rank``."""
    base = make_global(5)
    clients = [at_rank(base, 2, 30), moved(base, 31)]
    method = method_of("svd")
    result = merge_round(base, clients, method, server_lr=1.0)
    sent_none = merge_round(base, clients, method, server_lr=1.0, sent={})
    for key in base:
        assert torch.equal(result.tensors[key], sent_none.tensors[key])
    assert set(result.report.relative_errors) == set(MODULE_NAMES)


def test_small_round_reports_its_truncation_error() -> None:
    """A round of total energy below 1 still reports sqrt(dropped / total), not 0."""
    base = {key: value * 0.05 for key, value in make_global(6).items()}
    clients = [moved(base, s, size=0.05) for s in (40, 41, 42)]
    result = merge_round(base, clients, method_of("svd"), server_lr=1.0)
    assert result.report.relative_error is not None and result.report.relative_error > 0
    assert result.report.update_relative_error is not None
    assert result.report.update_relative_error > result.report.relative_error


@pytest.mark.parametrize("mixed", [False, True])
def test_an_all_zero_round_reports_zero_errors(mixed: bool) -> None:
    """Zero global, zero clients: total and update energy 0, both errors 0.0 (not 0 / 0)."""
    base = {key: torch.zeros_like(value) for key, value in make_global(7).items()}
    if mixed:
        clients = [{key: torch.zeros_like(v) for key, v in at_rank(base, 2, 1).items()}]
        clients[0][HEAD] = torch.zeros_like(base[HEAD])
    else:
        clients = [{key: value.clone() for key, value in base.items()}]
    result = merge_round(base, clients, method_of("exact-mean"), server_lr=1.0)
    assert result.report.relative_error == 0.0
    assert result.report.update_relative_error == 0.0
    for key in base:
        assert not bool(result.tensors[key].any())


@pytest.mark.parametrize("mixed", [False, True])
def test_report_seconds_is_the_rounds_own_duration(
    mixed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``report.seconds`` is the clock's advance from the round's start to its report (a fake
    clock from 10 s, 1.5 s a reading: one reading at the start, one at the end)."""
    ticks = iter(10.0 + 1.5 * step for step in range(100))
    monkeypatch.setattr(rounds.time, "perf_counter", lambda: next(ticks))
    base = make_global(8)
    clients = [at_rank(base, 2, 9) if mixed else moved(base, 9), moved(base, 10)]
    result = merge_round(base, clients, method_of("svd"), server_lr=1.0)
    assert result.report.seconds == 1.5
