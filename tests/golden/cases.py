"""The golden cases: fixed mock clients, every round mode x every merge method, two rounds each.

Everything here drives the server through surfaces a refactor of ``strategies/`` and ``server/``
must keep: Flower's Strategy API of ``FedRobustMerge`` (``configure_train`` to open a round,
``aggregate_train`` with Flower ``Message`` replies, ``round_report`` for who was accepted),
Flower's DP wrapper as ``server.privacy.wrap_with_privacy`` builds it, the secure path's
``aggregate_sums`` and its run-config check, and the client's own reply builders
(``client.uplink.reply_records``, ``strategies.merging.decomposed.client_terms`` as the SecAgg+
client mod computes them). The strategy's settings are built in one place, ``build_strategy``:
if the redesign changes how FedRobustMerge is constructed, that function is the only thing to
adapt, and the recorded digests must then still match.

The clients (seeded ``torch.Generator``, so every run builds the same bits):

- a global LoRA adapter of 2 modules, rank 4, d_in 24, d_out 20 (B not zero, so product-space
  methods have a product to work with);
- 6 nodes per round with different example counts and different step sizes (so a DP clipping
  norm clips some and not others);
- round 2's replies start from round 1's new global, as real clients do, and node ``OUTLIER``'s
  round-2 update is ``BOOST`` times its honest one: the default norm screen (factor 10) rejects
  it wherever a screen runs;
- at most 8 replies per round: above 8 a first round streams after a pool (issue 25), which is
  another behaviour than the one recorded here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from client.instruction import instructed_method
from client.uplink import reply_records
from protocol.merge_settings import merge_settings
from protocol.wire import LORA_RANK, METRICS, NUM_EXAMPLES, TRAIN_LOSS
from server.config import ServerSettings
from server.privacy import core_strategy, wrap_with_privacy
from server.secure_aggregation import check_secure_aggregation
from strategies.fed_robustmerge import FedRobustMerge
from strategies.merging.decomposed import client_terms
from strategies.merging.ranks import adapter_at_rank
from strategies.merging.robustmerge import RobustMerge
from strategies.robust import RobustSettings
from tests.messages import addressed

MODULES = ("base_model.model.layer.0.query", "base_model.model.layer.1.value")
RANK = 4
D_IN, D_OUT = 24, 20
NODES = (1, 2, 3, 4, 5, 6)
EXAMPLES = {1: 12, 2: 40, 3: 7, 4: 64, 5: 25, 6: 90}
STEP = {1: 0.05, 2: 0.08, 3: 0.11, 4: 0.06, 5: 0.09, 6: 0.12}
SITE_RANKS = {1: 4, 2: 2, 3: 4, 4: 3, 5: 4, 6: 2}  # mixed-ranks mode only
OUTLIER = 5
BOOST = 50.0
SERVER_LR = 0.7
DP_CLIPPING_NORM = 1.5  # honest update norms here are about 0.9 to 2.3: some clipped, some not
ROUNDS = (1, 2)

# Merge methods as the run config names them (merge-method, merge-mode): every registered
# method, RobustMerge in both of its modes.
METHODS: dict[str, dict[str, str]] = {
    "robustmerge": {"merge_method": "robustmerge", "mode": "paper-exact"},
    "robustmerge-paper-equation": {"merge_method": "robustmerge", "mode": "paper-equation"},
    "fedavg": {"merge_method": "fedavg"},
    "ties": {"merge_method": "ties"},
    "dare": {"merge_method": "dare"},
    "svd": {"merge_method": "svd"},
    "exact-mean": {"merge_method": "exact-mean"},
    "task_arithmetic": {"merge_method": "task_arithmetic"},
}

# Round modes: how replies reach the server and what it is set to do with them.
MODES = (
    "buffered",  # replies as a list; robust-history 0, so every round buffers and screens
    "streamed",  # a lazy generator; default screen (round 2 streams against round 1's norms)
    "sparse",  # uplink 'sparse': clients prune their own deltas (client.uplink)
    "adapter-target",  # merge-target 'adapter' (round 1 of paper-exact: the one-shot merge)
    "secagg-sums",  # SecAgg+: the core merges the sums of the clients' terms
    "dp-fixed-clipping",  # Flower's server-side fixed clipping around the core, noise 0
    "mixed-ranks",  # sites of LoRA ranks 2, 3, 4 under a rank-4 global
)


@dataclass
class RoundOutcome:
    """One round as recorded: the new global's digest and who was accepted and rejected."""

    sha256: str
    accepted: list[int]
    rejected: list[int]
    streamed: bool
    skipped: bool

    def to_json(self) -> dict[str, Any]:
        """The JSON form stored in golden_rounds.json."""
        return {
            "sha256": self.sha256,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "streamed": self.streamed,
            "skipped": self.skipped,
        }


@dataclass
class CaseOutcome:
    """A case's two rounds, or the refusal that stopped it (error type and where it came)."""

    rounds: list[RoundOutcome] = field(default_factory=list)
    refused: str | None = None
    refused_at: str | None = None
    globals_: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The JSON form stored in golden_rounds.json (the tensors themselves are not)."""
        if self.refused is not None:
            return {"refused": self.refused, "refused-at": self.refused_at}
        return {"rounds": [outcome.to_json() for outcome in self.rounds]}


def case_names() -> list[str]:
    """Every case, ``<mode>/<method>``."""
    return [f"{mode}/{method}" for mode in MODES for method in METHODS]


def digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors in sorted key order: per key its name, dtype, shape and bytes,
    each length-prefixed so no two different adapters hash the same stream."""
    hasher = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        for part in (
            key.encode(),
            str(tensor.dtype).encode(),
            repr(tuple(tensor.shape)).encode(),
            tensor.numpy().tobytes(),
        ):
            hasher.update(len(part).to_bytes(8, "little"))
            hasher.update(part)
    return hasher.hexdigest()


def initial_global() -> dict[str, torch.Tensor]:
    """The round-1 global adapter: A ~ N(0, 1), B ~ N(0, 0.1^2), rank ``RANK``."""
    generator = torch.Generator().manual_seed(2024)
    adapter: dict[str, torch.Tensor] = {}
    for name in MODULES:
        adapter[f"{name}.lora_A.weight"] = torch.randn(RANK, D_IN, generator=generator)
        adapter[f"{name}.lora_B.weight"] = 0.1 * torch.randn(D_OUT, RANK, generator=generator)
    return adapter


def trained(start: Mapping[str, torch.Tensor], node: int, server_round: int) -> dict[str, Any]:
    """What node ``node`` trains in round ``server_round`` from ``start``: start + its step x
    seeded noise; the outlier's round-2 update is ``BOOST`` times that."""
    generator = torch.Generator().manual_seed(1000 * server_round + node)
    boost = BOOST if (node == OUTLIER and server_round == 2) else 1.0
    return {
        key: value + boost * STEP[node] * torch.randn(value.shape, generator=generator)
        for key, value in start.items()
    }


class FakeGrid:
    """The part of Flower's Grid that sampling uses: the connected node ids."""

    def get_node_ids(self) -> list[int]:
        """Every node of the federation."""
        return list(NODES)


def answer(
    instruction: Message,
    records: Mapping[str, ArrayRecord | ConfigRecord],
    extra_metrics: Mapping[str, int] | None = None,
) -> Message:
    """The reply of the instruction's node, as Flower builds it (``reply_to``): ``records``
    plus a MetricRecord with its example count and a train loss."""
    node = instruction.metadata.dst_node_id
    content = RecordDict(dict(records))
    content[METRICS] = MetricRecord(
        {NUM_EXAMPLES: EXAMPLES[node], TRAIN_LOSS: 1.0 / node, **(extra_metrics or {})}
    )
    delivered = addressed(instruction, f"instruction-{node}")
    return Message(content, reply_to=delivered)


def instruction_config(instruction: Message) -> dict[str, Any]:
    """The train instruction's config record, as the client reads it."""
    (config,) = instruction.content.config_records.values()
    return dict(config)


def dense_reply(instruction: Message, start: Mapping[str, torch.Tensor], round_: int) -> Message:
    """A client at the global's rank: trains from the global it received, replies through
    ``client.uplink.reply_records`` (dense or sparse, as the instruction asks)."""
    node = instruction.metadata.dst_node_id
    records = reply_records(trained(start, node, round_), start, instruction_config(instruction))
    return answer(instruction, records)


def ranked_reply(instruction: Message, start: Mapping[str, torch.Tensor], round_: int) -> Message:
    """A site of rank ``SITE_RANKS[node]``: trains from the global truncated to its rank (what
    the client computes on receipt) and declares its rank."""
    node = instruction.metadata.dst_node_id
    site = adapter_at_rank(start, SITE_RANKS[node]).tensors
    tensors = trained(site, node, round_)
    records = {"arrays": ArrayRecord({key: tensors[key].contiguous() for key in site})}
    return answer(instruction, records, {LORA_RANK: SITE_RANKS[node]})


def build_strategy(mode: str, method: str) -> Strategy:
    """The strategy of one case (raises ValueError for a combination it refuses).

    Every mode runs on CPU with server_lr ``SERVER_LR``; weight-by-examples is on except where
    a mode refuses it (secagg) or where the default (off) is pinned (dp).
    """
    settings: dict[str, Any] = {
        **METHODS[method],
        "device": "cpu",
        "server_lr": SERVER_LR,
        "weight_by_examples": True,
        # the norm screen the outputs were recorded with ("auto" would pick centered clipping)
        "robust": RobustSettings("norm"),
    }
    if mode == "buffered":
        settings["robust"] = RobustSettings("norm", history=0)
    elif mode == "secagg-sums":
        settings["weight_by_examples"] = False
    elif mode == "sparse":
        settings["uplink"] = "sparse"
    elif mode == "adapter-target":
        settings["merge_target"] = "adapter"
    elif mode == "dp-fixed-clipping":
        settings["weight_by_examples"] = False
        return wrap_with_privacy(
            FedRobustMerge(**settings),
            "server-clipping",
            clipping_norm=DP_CLIPPING_NORM,
            noise_multiplier=0.0,
            num_sampled_clients=len(NODES),
            rank=RANK,
        )
    return FedRobustMerge(**settings)


def secure_strategy(method: str) -> FedRobustMerge:
    """The secure path's core. The server's run-config check runs first (it raises ConfigError
    for whatever SecAgg+ cannot honour); the core is then ``build_strategy``'s with the settings
    SecAgg+ requires (clients weighted equally). ``server.app.build_merge_strategy`` would build
    the same one, but importing the ServerApp pulls in PEFT (6 s here)."""
    run_config: dict[str, Any] = {
        "secure-aggregation": True,
        "merge-method": METHODS[method]["merge_method"],
        "merge-mode": METHODS[method].get("mode", "paper-exact"),
        "server-lr": SERVER_LR,
        "merge-device": "cpu",
        "min-train-nodes": len(NODES),
        "fraction-evaluate": 0.0,
    }
    check_secure_aggregation(ServerSettings.from_run_config(run_config))
    strategy = build_strategy("secagg-sums", method)
    assert isinstance(strategy, FedRobustMerge)
    return strategy


def _outcome(strategy: Strategy, server_round: int, arrays: ArrayRecord | None) -> RoundOutcome:
    core = core_strategy(strategy)
    report = core.round_report(server_round)
    assert core.current_global is not None
    new_global = (
        dict(arrays.to_torch_state_dict()) if arrays is not None else dict(core.current_global)
    )
    return RoundOutcome(
        sha256=digest(new_global),
        accepted=sorted(report.accepted_nodes),
        rejected=sorted(report.rejected),
        streamed=bool(report.streamed),
        skipped=bool(report.skipped),
    )


def _message_round(
    strategy: Strategy,
    server_round: int,
    start: dict[str, torch.Tensor],
    make_reply: Callable[[Message, Mapping[str, torch.Tensor], int], Message],
    *,
    lazy: bool,
    order: Callable[[list[Message]], list[Message]],
) -> ArrayRecord | None:
    """configure_train on ``start``, each sampled node answers, aggregate_train; the replies
    go in as a list or as a generator that builds each one only when pulled."""
    instructions = list(
        strategy.configure_train(
            server_round,
            ArrayRecord({key: value.contiguous() for key, value in start.items()}),
            ConfigRecord(),
            FakeGrid(),  # type: ignore[arg-type]
        )
    )
    instructions = order(instructions)

    def pulled() -> Iterator[Message]:
        for instruction in instructions:
            yield make_reply(instruction, start, server_round)

    replies: Iterator[Message] | list[Message] = pulled() if lazy else list(pulled())
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays


def _secure_round(
    strategy: FedRobustMerge, server_round: int, start: dict[str, torch.Tensor]
) -> ArrayRecord | None:
    """One SecAgg+ round as the core sees it: the round opened on ``start``, then the sums
    over every node of its ``client_terms`` (computed as the client mod does: its delta, the
    server's merge settings). The sums are exact float32 sums in node order, not SecAgg+'s
    quantised ones: the quantisation is Flower's, the merge from sums is ours."""
    strategy.open_round(server_round, start)
    method = instructed_method(
        {"uplink": "dense", **merge_settings(RobustMerge(**strategy.settings.hyperparameters))}
    )
    sums: dict[str, torch.Tensor] = {}
    for node in NODES:
        client = trained(start, node, server_round)
        terms = client_terms({key: client[key] - start[key] for key in start}, method)
        for key, value in terms.items():
            sums[key] = sums[key] + value if key in sums else value.clone()
    arrays, _ = strategy.aggregate_sums(server_round, sums, list(NODES))
    return arrays


def in_node_order(messages: list[Message]) -> list[Message]:
    """Instructions sorted by destination node."""
    return sorted(messages, key=lambda message: message.metadata.dst_node_id)


def in_reverse_node_order(messages: list[Message]) -> list[Message]:
    """Instructions in descending destination node (another arrival order)."""
    return in_node_order(messages)[::-1]


def run_case(
    mode: str,
    method: str,
    order: Callable[[list[Message]], list[Message]] = in_node_order,
    round2_start: Mapping[str, torch.Tensor] | None = None,
) -> CaseOutcome:
    """Both rounds of one case; a ValueError (ConfigError included) on the way is recorded as
    the case's refusal, with where it came ("strategy" or "round N").

    ``round2_start``: send this global in round 2 instead of round 1's new one (to compare two
    paths from one global after each has its own round-1 history)."""
    outcome = CaseOutcome()
    stage = "strategy"
    try:
        if mode == "secagg-sums":
            strategy: Strategy = secure_strategy(method)
        else:
            strategy = build_strategy(mode, method)
        start = initial_global()
        for server_round in ROUNDS:
            stage = f"round {server_round}"
            if mode == "secagg-sums":
                assert isinstance(strategy, FedRobustMerge)
                arrays = _secure_round(strategy, server_round, start)
            else:
                arrays = _message_round(
                    strategy,
                    server_round,
                    start,
                    ranked_reply if mode == "mixed-ranks" else dense_reply,
                    lazy=mode != "buffered",
                    order=order,
                )
            outcome.rounds.append(_outcome(strategy, server_round, arrays))
            if arrays is not None:
                start = {key: value.clone() for key, value in arrays.to_torch_state_dict().items()}
            outcome.globals_.append(start)
            if round2_start is not None:
                start = {key: value.clone() for key, value in round2_start.items()}
    except ValueError as error:
        outcome.refused = type(error).__name__
        outcome.refused_at = stage
        outcome.rounds = []
        outcome.globals_ = []
    return outcome
