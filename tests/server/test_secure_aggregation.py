"""RobustMerge under SecAgg+: Flower's real SecAggPlusWorkflow and secaggplus_mod, the real
ClientApp (tiny BERT), every message serialised to protobuf and back as on the wire, driven by an
in-process grid that can make a node vanish at any protocol stage.

(a) the secure merge equals the plain merge (FedRobustMerge's math on the same deltas) within
    the bound stated in ``server.secure_aggregation``;
(b) a client that drops within the SecAgg+ threshold does not stop the round;
(c) the strategy only ever receives the aggregate: every result it is handed carries the same
    parameters, which equal no client's terms, and every reply that reached the server carries
    empty arrays, num_examples = 1, no metrics, and a masked vector spread over [0, 2**32).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.common import FitRes, bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.server.client_proxy import ClientProxy
from flwr.server.workflow import SecAggPlusWorkflow

import client.secure_aggregation as client_secagg
from client.app import app as client_app
from client.secure_aggregation import is_secure_aggregation_message, secure_aggregation_mod
from protocol.secagg_layout import CLIPPED_KEY, LOSS_RANGE, TRAIN_LOSS_KEY, TermLayout
from server.app import build_merge_strategy
from server.checkpoints import CheckpointStore
from server.config import ConfigError, ServerSettings
from server.run_loop import LoopSettings, run_federation
from server.secure_aggregation import (
    MODULUS_RANGE,
    check_secure_aggregation,
    quantization_level,
)
from server.secure_rounds import SecAggPlusAdapter, SecureRounds
from strategies.adapter_io.config import adapter_config_for
from strategies.adapter_io.reading import read_adapter_dir
from strategies.audit import verify_run
from strategies.merging import merge_lora
from strategies.merging.decomposed import client_terms, scale_key
from strategies.merging.lora_keys import parse_layout
from strategies.merging.robustmerge import RobustMerge
from tests.messages import AnsweredOnPull
from tests.workload.tiny_model import save_tiny_bert, tiny_run_config
from workload.model import LoraSettings, initial_adapter

NODES = (1, 2, 3, 4)


pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def make_run_config(model: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    return tiny_run_config(
        model,
        **{
            "num-server-rounds": 1,
            "min-train-nodes": len(NODES),
            "server-eval": False,
            "round-timeout": 120.0,
            "output-dir": str(out),
            "secure-aggregation": True,
            "server-lr": 1.0,  # the bounds compare the merge itself: global + 1 x merged
            **overrides,
        },
    )


class InProcessGrid(AnsweredOnPull):
    """Delivers each message to the ClientApp of its node, through protobuf both ways.

    ``vanish`` names (stage, node) pairs whose message is never answered (the node is gone).
    ``replies`` keeps every reply that reached the server, with its size on the wire.
    """

    def __init__(
        self,
        run_config: dict[str, Any],
        vanish: Iterable[tuple[str, int]] = (),
        nodes: Iterable[int] = NODES,
    ) -> None:
        self.nodes = tuple(nodes)
        self.run = SimpleNamespace(run_id=1)
        self.vanish = set(vanish)
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": node - 1, "num-partitions": len(self.nodes)},
                state=RecordDict(),
                run_config=run_config,
            )
            for node in self.nodes
        }
        self.replies: list[tuple[str, Message, int]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def answer(self, message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        stage = str(message.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        if (stage, node) in self.vanish:
            return None
        delivered = message_from_proto(message_to_proto(message))
        try:
            reply = client_app(delivered, self.contexts[node])
        except Exception as error:  # Flower turns a ClientApp exception into an error reply
            reply = Message(Error(code=0, reason=repr(error)), reply_to=delivered)
        wire = message_to_proto(reply)
        received = message_from_proto(wire)
        self.replies.append((stage, received, wire.ByteSize()))
        return received


class Spy:
    """Records what each client computed (the test's oracle; nothing here reaches the server)."""

    def __init__(self) -> None:
        self.deltas: list[dict[str, torch.Tensor]] = []
        self.terms: list[dict[str, torch.Tensor]] = []

    def __call__(
        self, tensors: Mapping[str, torch.Tensor], method: RobustMerge
    ) -> dict[str, torch.Tensor]:
        terms = client_terms(tensors, method)
        self.deltas.append({key: value.clone() for key, value in tensors.items()})
        self.terms.append(terms)
        return terms


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    """Every client's terms recorded (the oracle), and a fresh record of aggregate_fit calls."""
    recorder = Spy()
    monkeypatch.setattr(client_secagg, "client_terms", recorder)
    RecordingStrategy.received = []
    return recorder


class RecordingStrategy(SecAggPlusAdapter):
    """Keeps every argument aggregate_fit receives."""

    received: ClassVar[list[tuple[list[tuple[ClientProxy, FitRes]], list[Any]]]] = []

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[Any],
    ) -> Any:
        RecordingStrategy.received.append((list(results), list(failures)))
        return super().aggregate_fit(server_round, results, failures)


def run(
    tmp_path: Path, run_config: dict[str, Any], grid: InProcessGrid
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """One secure federation; returns (initial global, final global, metrics.json)."""
    settings = ServerSettings.from_run_config(run_config)
    lora = LoraSettings.from_run_config(run_config)
    initial = initial_adapter(lora, seed=0)
    store = CheckpointStore(
        settings.output_dir,
        adapter_config_for(lora.model, lora.r, lora.alpha, lora.target_modules),
    )
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    mode = SecureRounds.from_settings(
        build_merge_strategy(settings), context, settings, initial, RecordingStrategy
    )
    final = run_federation(
        grid,  # type: ignore[arg-type]
        mode,
        LoopSettings(
            num_rounds=settings.num_server_rounds,
            round_timeout=settings.round_timeout,
            run_dir=settings.output_dir,
            resume=settings.resume,
        ),
        initial=initial,
        store=store,
        summary={},
    )
    metrics = json.loads((settings.output_dir / "metrics.json").read_text())
    audit = verify_run(settings.output_dir)  # raises AuditError naming a bad record
    assert audit.rejected == audit.accepted == 0  # SecAgg+: only sums, no per-reply verdicts
    return initial, final, metrics


def assert_within_bound(
    secure_delta: Mapping[str, torch.Tensor],
    deltas: list[dict[str, torch.Tensor]],
    terms: list[dict[str, torch.Tensor]],
    clipping_range: float,
    quantization_range: int,
) -> float:
    """The module docstring's bounds, entry by entry; returns the largest error seen."""
    count = len(deltas)
    plain = merge_lora(
        deltas,
        "robustmerge",
        device="cpu",
        keep_ratio=0.2,
        scale_quantile=0.2,
        fuse_weight=2.0,
        form="round",
    )
    q = quantization_level(clipping_range, quantization_range)
    layout = parse_layout(plain)
    largest = 0.0
    for module in layout.modules:
        a_error = (secure_delta[module.a_key] - plain[module.a_key]).abs()
        slack_a = 1e-6 * plain[module.a_key].abs() + 1e-9
        assert bool((a_error <= count * q + slack_a).all()), (module.a_key, a_error.max())
        a_shape = plain[module.a_key].shape
        q_scale = 2.0 * (a_shape.numel() // a_shape[0]) / quantization_range
        total = torch.stack([t[scale_key(module.name)] for t in terms]).sum(dim=0)
        b_plain = plain[module.b_key]
        bound = (count * q + b_plain.abs() * count * q_scale) / (total - count * q_scale)
        b_error = (secure_delta[module.b_key] - b_plain).abs()
        slack_b = 1e-6 * b_plain.abs() + 1e-9
        assert bool((b_error <= bound + slack_b).all()), (module.b_key, (b_error - bound).max())
        largest = max(largest, float(a_error.max()), float(b_error.max()))
    return largest


def test_secure_merge_matches_the_plain_merge_within_the_quantisation_bound(
    tmp_path: Path, tiny_model: Path, spy: Spy
) -> None:
    run_config = make_run_config(tiny_model, tmp_path / "run")
    grid = InProcessGrid(run_config)
    initial, final, metrics = run(tmp_path, run_config, grid)

    assert len(spy.deltas) == len(NODES)
    secure_delta = {key: final[key] - initial[key] for key in initial}
    largest = assert_within_bound(secure_delta, spy.deltas, spy.terms, 8.0, 4194304)
    assert 0.0 < largest < 1e-3  # quantisation noise is there, and small

    (entry,) = metrics["rounds"]
    # one round record on every path: the plain loop's entry, merge report and train metrics
    assert set(entry) == {
        "server-round",
        "clients-sampled",
        "clients-timed-out",
        "train",
        "merge",
        "communication",
        "seconds",
    }
    assert entry["clients-sampled"] == 4 and entry["clients-timed-out"] == 0
    assert entry["merge"]["secure-aggregation"] == "completed"
    assert sorted(entry["merge"]["accepted-nodes"]) == list(NODES)
    assert entry["merge"]["rejected"] == {} and not entry["merge"]["skipped"]
    assert entry["merge"]["merged-update-norm"] == entry["train"]["merged-update-norm"] > 0
    train = entry["train"]
    assert train["clients-accepted"] == 4
    assert train["clients-dropped"] == 0
    assert train["round-skipped"] == 0
    assert train["secagg-clipped-clients"] == 0
    # the mean train loss travelled inside the masked vector
    assert 0.0 < train["train-loss"] < LOSS_RANGE
    # bytes: what the metrics say is what went over the wire (masked int64 vector)
    masked = [
        sum(len(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS])  # type: ignore[union-attr]
        for stage, reply, _ in grid.replies
        if stage == Stage.COLLECT_MASKED_VECTORS
    ]
    assert masked == [train["bytes-received-per-client"]] * 4
    assert train["bytes-received"] == entry["merge"]["bytes-received"] == sum(masked)
    traffic = entry["communication"]
    assert traffic["uplink"] == "secure-aggregation"
    assert sorted(traffic["train-up-bytes"].values()) == masked
    assert len(traffic["train-down-bytes"]) == 4
    assert traffic["cumulative-bytes"] == sum(masked) + sum(traffic["train-down-bytes"].values())
    written = read_adapter_dir(tmp_path / "run" / "final").tensors
    for key, value in final.items():
        assert torch.equal(written[key], value)
    state = json.loads((tmp_path / "run" / "checkpoints" / "round-0001" / "state.json").read_text())
    assert state["strategy"]["secure-aggregation"]["modulus-range"] == MODULUS_RANGE


@pytest.mark.parametrize(
    ("stage", "summed"),
    [(Stage.COLLECT_MASKED_VECTORS, 3), (Stage.UNMASK, 4)],
    ids=["drops-before-sending-its-vector", "drops-before-unmasking"],
)
def test_a_client_dropping_within_the_threshold_does_not_stop_the_round(
    tmp_path: Path,
    tiny_model: Path,
    spy: Spy,
    stage: str,
    summed: int,
) -> None:
    run_config = make_run_config(tiny_model, tmp_path / "run")
    grid = InProcessGrid(run_config, vanish={(stage, 3)})
    initial, final, metrics = run(tmp_path, run_config, grid)

    (entry,) = metrics["rounds"]
    assert entry["train"]["round-skipped"] == 0
    assert entry["train"]["clients-accepted"] == summed
    assert entry["train"]["clients-dropped"] == 4 - summed
    (received,) = RecordingStrategy.received
    assert len(received[0]) == summed
    # a node vanishing in the unmask stage had sent its vector: its terms are in the sum
    assert len(spy.deltas) == summed
    secure_delta = {key: final[key] - initial[key] for key in initial}
    assert_within_bound(secure_delta, spy.deltas, spy.terms, 8.0, 4194304)


def test_the_strategy_never_holds_an_individual_clients_terms(
    tmp_path: Path, tiny_model: Path, spy: Spy
) -> None:
    run_config = make_run_config(tiny_model, tmp_path / "run")
    grid = InProcessGrid(run_config)
    initial, _, _ = run(tmp_path, run_config, grid)

    (received,) = RecordingStrategy.received
    results, failures = received
    assert failures == []
    aggregate = results[0][1].parameters
    assert all(fitres.parameters is aggregate for _, fitres in results)
    assert all(fitres.num_examples == 1 and fitres.metrics == {} for _, fitres in results)
    layout = TermLayout.for_adapter(
        [(key, tuple(value.shape)) for key, value in initial.items()], 8.0
    )
    mean = parameters_to_ndarrays(aggregate)
    q = quantization_level(8.0, 4194304)
    individual = [layout.pack(terms, 0.0) for terms in spy.terms]
    expected_mean = [sum(parts) / len(individual) for parts in zip(*individual, strict=True)]
    lora = slice(0, len(initial))  # the tensor entries (scalars and scales differ less)
    for arrays in individual:
        # far from every individual vector, ...
        distance = max(
            float(np.abs(a - m).max()) for a, m in zip(arrays[lora], mean[lora], strict=True)
        )
        assert distance > 100 * q
    # ... and within a level of their mean (the tensor entries)
    for got, want in zip(mean[lora], expected_mean[lora], strict=True):
        assert float(np.abs(got - want).max()) < q

    # What reached the server from each client in the vector stage: no arrays, num_examples = 1,
    # no metrics, and integers that look uniform on [0, 2**32) (quantised values are <= 2**22).
    stage_two = [reply for stage, reply, _ in grid.replies if stage == Stage.COLLECT_MASKED_VECTORS]
    assert len(stage_two) == 4
    for reply in stage_two:
        content = reply.content
        assert all(len(record) == 0 for record in content.array_records.values())
        assert content.metric_records["fitres.num_examples"]["num_examples"] == 1
        assert len(content.config_records["fitres.metrics"]) == 0
        vector = np.concatenate(
            [
                bytes_to_ndarray(b).reshape(-1)
                for b in content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]  # type: ignore[union-attr]
            ]
        )
        assert vector.dtype == np.int64
        assert float((vector > 2**23).mean()) > 0.95
    # nothing else the clients sent carries arrays either
    assert all(
        len(record) == 0
        for _, reply, _ in grid.replies
        if reply.has_content()
        for record in reply.content.array_records.values()
    )


def test_a_round_below_the_threshold_is_skipped_and_the_run_goes_on(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_secagg, "client_terms", Spy())
    RecordingStrategy.received = []
    run_config = make_run_config(tiny_model, tmp_path / "run")
    # two of four nodes vanish before sharing their keys: SecAgg+ halts the round
    grid = InProcessGrid(run_config, vanish={(Stage.SHARE_KEYS, 2), (Stage.SHARE_KEYS, 3)})
    initial, final, metrics = run(tmp_path, run_config, grid)
    (entry,) = metrics["rounds"]
    assert entry["train"]["round-skipped"] == 1
    assert "halted" in entry["merge"]["secure-aggregation"]
    assert RecordingStrategy.received == []
    for key, value in initial.items():
        assert torch.equal(final[key], value)


def test_resume_runs_only_the_missing_rounds(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_secagg, "client_terms", Spy())
    run_config = make_run_config(tiny_model, tmp_path / "run")
    _, first, _ = run(tmp_path, run_config, InProcessGrid(run_config))
    resumed = {**run_config, "num-server-rounds": 2, "resume": True}
    RecordingStrategy.received = []
    _, final, metrics = run(tmp_path, resumed, InProcessGrid(resumed))
    assert [entry["server-round"] for entry in metrics["rounds"]] == [1, 2]
    assert len(RecordingStrategy.received) == 1
    assert any(not torch.equal(final[key], first[key]) for key in first)


def test_the_secure_path_samples_the_nodes_the_plain_path_would(tiny_model: Path) -> None:
    """SecAggPlusAdapter asks the core: same seed and round, same nodes as FedRobustMerge."""
    run_config = make_run_config(
        tiny_model, Path("unused"), **{"fraction-train": 0.5, "min-train-nodes": 2, "seed": 3}
    )
    settings = ServerSettings.from_run_config(run_config)
    initial = initial_adapter(LoraSettings.from_run_config(run_config), seed=0)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    nodes = list(range(11, 19))
    manager = SimpleNamespace(all=lambda: {str(n): SimpleNamespace(node_id=n) for n in nodes})
    for server_round in (1, 2, 7):
        secure = SecureRounds.from_settings(
            build_merge_strategy(settings), context, settings, initial
        )
        parameters = secure.adapter.begin(server_round, initial)
        asked = [
            proxy.node_id
            for proxy, _ in secure.adapter.configure_fit(
                server_round,
                parameters,
                manager,  # type: ignore[arg-type]
            )
        ]
        plain = build_merge_strategy(settings)
        messages = plain.configure_train(
            server_round,
            ArrayRecord(dict(initial)),
            ConfigRecord(),
            SimpleNamespace(get_node_ids=lambda: nodes),  # type: ignore[arg-type]
        )
        assert asked == [m.metadata.dst_node_id for m in messages]
        assert len(asked) == 4


def test_normal_train_messages_pass_the_mod_unchanged() -> None:
    message = Message(RecordDict(), dst_node_id=1, message_type="train")
    assert not is_secure_aggregation_message(message)
    seen: list[Message] = []

    def handler(msg: Message, context: Context) -> Message:
        seen.append(msg)
        return msg

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert secure_aggregation_mod(message, context, handler) is message
    assert seen == [message]


def test_scales_never_clip_even_for_a_row_with_one_kept_entry() -> None:
    """s~ < d_in always; the transport factor c / d_in keeps it inside [-c, c]."""
    d_in = 64
    a = torch.full((2, d_in), 0.01)
    a[0, 0] = 0.0101  # row 0: one entry above the others; keep_ratio small keeps only it
    a[1] = 0.2
    b = torch.ones(8, 2) * 1e-3
    delta = {"m.lora_A.weight": a, "m.lora_B.weight": b}
    method = RobustMerge(keep_ratio=0.5, scale_quantile=0.0)
    terms = client_terms(delta, method)
    name = scale_key(parse_layout(delta).modules[0].name)
    scale = terms[name]
    assert float(scale.max()) > 60.0  # row 0: (63 * 0.01 + 0.0101) / 0.0101
    assert float(scale.max()) <= d_in
    layout = TermLayout.for_adapter([(k, tuple(v.shape)) for k, v in delta.items()], 1.0)
    packed = layout.pack(terms, 3.0)
    assert all(float(np.abs(array).max()) <= 1.0 for array in packed)
    assert packed[-2][0] == 0.0  # nothing clipped
    restored = layout.unpack(packed)
    torch.testing.assert_close(restored[name].float(), scale)
    assert float(restored[TRAIN_LOSS_KEY][0]) == pytest.approx(3.0)
    # a term beyond the range is flagged (the server learns only how many clients clipped)
    big = {**terms, "m.lora_A.weight": terms["m.lora_A.weight"] * 1000}
    assert layout.pack(big, 3.0)[-2][0] == 1.0
    assert layout.names[-2:] == [CLIPPED_KEY, TRAIN_LOSS_KEY]


REFUSALS: list[tuple[str, Any]] = [
    ("merge-mode", "paper-equation"),
    ("merge-method", "ties"),
    ("merge-target", "adapter"),
    ("weight-by-examples", True),
    ("uplink", "sparse"),
    ("dp", "server-clipping"),
    ("max-update-norm", 1.0),
    ("fraction-evaluate", 0.5),
    ("min-train-nodes", 1),
    ("secagg-quantization-range", 2**31),
    ("secagg-num-shares", 2),
]


@pytest.mark.parametrize(("key", "value"), REFUSALS)
def test_settings_secure_aggregation_cannot_honour_are_refused_with_the_key(
    key: str, value: Any
) -> None:
    settings = ServerSettings.from_run_config({"secure-aggregation": True, key: value})
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        check_secure_aggregation(settings)


def test_the_defaults_pass_and_secure_aggregation_off_checks_nothing() -> None:
    workflow = check_secure_aggregation(
        ServerSettings.from_run_config({"secure-aggregation": True})
    )
    assert isinstance(workflow, SecAggPlusWorkflow)
    # every setting the secure path refuses is let through, with no workflow, when it is off
    for key, value in REFUSALS:
        off = ServerSettings.from_run_config({"secure-aggregation": False, key: value})
        assert check_secure_aggregation(off) is None, key
