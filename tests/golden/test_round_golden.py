"""Golden rounds (issue 24, item 1): the new global's SHA-256 after each of 2 rounds, for every
round mode x merge method, pinned before the strategy/server redesign moves the code.

Each case (``tests/golden/cases.py``) runs two rounds of 6 fixed mock clients through the
server's public surfaces and records, per round, the SHA-256 of the new global adapter (sorted
keys; name, dtype, shape and bytes of each tensor), the accepted and rejected node ids, whether
the round streamed and whether it was skipped. A combination the server refuses is recorded as
refused, with the error type and where it was raised, so a redesign that silently accepts it
fails here. The redesign must leave every digest as it is: a changed number is a changed
behaviour, whatever the reason.

Regenerate (only for an intended change of behaviour, said so in the change's description)::

    GOLDEN_UPDATE=1 pytest tests/golden

which rewrites ``golden_rounds.json`` from this run. Without it, a case missing from the file, a
recorded case no longer produced, or any changed field fails, naming the case, the round, the
expected and the actual value.

Determinism: every case was run twice in one process and in fresh processes (also with 1 and 2
intra-op threads) with the same digests, the SVD-based methods included, so all are pinned by
bytes; none needed rounding.

DP fixed clipping runs at noise multiplier 0: Flower's wrapper draws its noise from NumPy's
global RNG (``np.random.normal``), which no public surface of ours seeds, so only the clipping
(and the screen before it) is pinned. SecAgg+ is pinned from the core's side: the exact float32
sums of the clients' terms handed to ``aggregate_sums``; SecAgg+'s quantisation and masking are
Flower's and are not part of these numbers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from tests.golden.cases import (
    METHODS,
    MODES,
    OUTLIER,
    CaseOutcome,
    case_names,
    in_reverse_node_order,
    run_case,
)

GOLDEN = Path(__file__).with_name("golden_rounds.json")
UPDATING = os.environ.get("GOLDEN_UPDATE") == "1"
# Modes whose replies travel as Flower Messages (the others have no arrival order to permute).
MESSAGE_MODES = tuple(mode for mode in MODES if mode != "secagg-sums")
# Methods with a running-sum fold (docs/strategy.md, "Streaming rounds"): round 2 streams.
FOLDING_METHODS = ("robustmerge", "fedavg", "ties")


@pytest.fixture(scope="module")
def task_identity() -> Iterator[None]:
    """Flower stamps instructions with the running ServerApp task's identity; set one for the
    module (as ``tests/conftest.flower_task_identity`` does per test) and restore the old."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one intra-op thread for the module, then as it was. The digests are the same
    with 1 and 2 threads (checked); on a shared 2-core machine the tiny merges ran 5x slower
    with 2 threads spinning against other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def outcomes(task_identity: None, one_thread: None) -> Iterator[dict[str, CaseOutcome]]:
    """Every case run once, in node order; with GOLDEN_UPDATE=1 written to the golden file
    when the module is done."""
    results = {}
    for name in case_names():
        mode, method = name.split("/", 1)
        results[name] = run_case(mode, method)
    yield results
    if UPDATING:
        GOLDEN.write_text(golden_text({name: o.to_json() for name, o in results.items()}))


def golden_text(recorded: dict[str, dict[str, Any]]) -> str:
    """The golden file's JSON: one case per key, sorted, each round on one line (so a diff of
    a regenerated file shows which case and round moved)."""
    cases = []
    for name in sorted(recorded):
        outcome = recorded[name]
        if "rounds" in outcome:
            rounds = ",\n".join(
                "   " + json.dumps(entry, sort_keys=True) for entry in outcome["rounds"]
            )
            body = '{"rounds": [\n' + rounds + "\n ]}"
        else:
            body = json.dumps(outcome, sort_keys=True)
        cases.append(f" {json.dumps(name)}: {body}")
    return "{\n" + ",\n".join(cases) + "\n}\n"


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    """The recorded cases (empty when the file is missing)."""
    if not GOLDEN.exists():
        return {}
    recorded: dict[str, Any] = json.loads(GOLDEN.read_text())
    return recorded


def differences(case: str, expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Every field where ``actual`` differs from ``expected``, one line each naming the case,
    the round and both values."""
    if "refused" in expected or "refused" in actual:
        if expected == actual:
            return []
        return [f"{case}: expected {expected}, got {actual}"]
    lines = []
    for number, (want, got) in enumerate(
        zip(expected["rounds"], actual["rounds"], strict=False), start=1
    ):
        for key in sorted(set(want) | set(got)):
            if want.get(key) != got.get(key):
                where = f"{case} round {number} {key}"
                lines.append(f"{where}: expected {want.get(key)!r}, got {got.get(key)!r}")
    if len(expected["rounds"]) != len(actual["rounds"]):
        lines.append(
            f"{case}: expected {len(expected['rounds'])} rounds, got {len(actual['rounds'])}"
        )
    return lines


def assert_matches_golden(case: str, actual: dict[str, Any], golden: dict[str, Any]) -> None:
    """``actual`` is the recorded outcome of ``case`` (see the module docstring to regenerate)."""
    if case not in golden:
        pytest.fail(
            f"{case}: no recorded outcome in {GOLDEN.name} (actual: {actual}); run "
            "GOLDEN_UPDATE=1 pytest tests/golden to record it"
        )
    lines = differences(case, golden[case], actual)
    assert not lines, "golden round outcome changed:\n" + "\n".join(lines)


@pytest.mark.parametrize("case", case_names())
def test_the_round_outcome_is_the_recorded_one(
    case: str, outcomes: dict[str, CaseOutcome], golden: dict[str, Any]
) -> None:
    actual = outcomes[case].to_json()
    if UPDATING:
        return
    assert_matches_golden(case, actual, golden)


def test_every_recorded_case_is_still_produced(golden: dict[str, Any]) -> None:
    if UPDATING:
        return
    stale = sorted(set(golden) - set(case_names()))
    assert not stale, f"{GOLDEN.name} records cases no longer run: {stale}"


def test_every_case_is_either_pinned_or_refused(outcomes: dict[str, CaseOutcome]) -> None:
    """A pinned case ran both rounds and the screen rejected the outlier in round 2 wherever a
    screen runs (not under SecAgg+, where the server sees only sums)."""
    for case, outcome in outcomes.items():
        if outcome.refused is not None:
            continue
        assert len(outcome.rounds) == 2, case
        second = outcome.rounds[1]
        if case.startswith("secagg-sums/"):
            assert OUTLIER in second.accepted, case
        else:
            assert OUTLIER in second.rejected, case


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("mode", MESSAGE_MODES)
def test_the_arrival_order_does_not_change_the_outcome(
    mode: str, method: str, outcomes: dict[str, CaseOutcome]
) -> None:
    """Replies in reverse node order give the same digests: buffered rounds sort by content,
    streamed ones sum exactly (docs/strategy.md, "Order independence"); a refused case is
    refused the same way."""
    forward = outcomes[f"{mode}/{method}"]
    reverse = run_case(mode, method, order=in_reverse_node_order)
    assert reverse.to_json() == forward.to_json()


@pytest.mark.parametrize("method", FOLDING_METHODS)
def test_a_streamed_round_merges_what_the_buffered_round_merges(
    method: str, outcomes: dict[str, CaseOutcome]
) -> None:
    """Round 1 buffers in both modes (6 replies, no history): the same bits. Round 2 streams
    with a history and buffers without one; both reject the outlier and merge the other five.
    The code promises the streamed global equals the batch merge to float tolerance, not bit
    for bit (the fold sums exactly, the batch merge in float32: tests/strategies/
    test_streamed_rounds.py), so round 2 is compared by value here and pinned by digest
    separately in each mode."""
    buffered = outcomes[f"buffered/{method}"]
    streamed = outcomes[f"streamed/{method}"]
    assert [r.streamed for r in buffered.rounds] == [False, False]
    assert [r.streamed for r in streamed.rounds] == [False, True]
    assert buffered.rounds[0].sha256 == streamed.rounds[0].sha256
    assert buffered.rounds[1].accepted == streamed.rounds[1].accepted
    got, want = streamed.globals_[1], buffered.globals_[1]
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_streamed_sparse_round_has_the_dense_rounds_bits(
    outcomes: dict[str, CaseOutcome], task_identity: None
) -> None:
    """docs/strategy.md: the sparse uplink folds the client's own pruned delta and scales "with
    the same bits as the dense path". Round 2 of both, from the same global (the dense round
    1's), must then hash the same."""
    dense = outcomes["streamed/robustmerge"]
    sparse = run_case("sparse", "robustmerge", round2_start=dense.globals_[0])
    assert sparse.refused is None
    assert sparse.rounds[1].streamed and dense.rounds[1].streamed
    assert sparse.rounds[1].accepted == dense.rounds[1].accepted
    assert sparse.rounds[1].sha256 == dense.rounds[1].sha256
