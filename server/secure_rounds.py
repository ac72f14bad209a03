"""The SecAgg+ mode of the round loop: one round of Flower's ``SecAggPlusWorkflow`` per call.

Flower 1.4x offers SecAgg+ only through its legacy workflow API, which drives a legacy
``flwr.server.strategy.Strategy``. ``SecAggPlusAdapter`` is that strategy, and nothing more: it
translates the workflow's calls to the FedRobustMerge core (sampling, the train instruction,
finishing the merge from the sums, the server step, the round report). The round loop
(``server.run_loop``) runs one workflow round per server round, so resume, evaluation,
checkpoints, metrics and the audit log are the loop's, as on every other path. Why the sums
suffice and what bounds the error: ``server.secure_aggregation``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat import LegacyContext
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid
from flwr.supercore import log

from protocol import wire
from protocol.merge_settings import merge_settings
from protocol.secagg_layout import CLIPPED_KEY, TRAIN_LOSS_KEY, TermLayout
from server.audit_log import secure_round_fields
from server.config import ConfigError, ServerSettings
from server.round_modes import NO_TRAFFIC, Traffic, TrainOutcome, as_tensors, round_entry
from server.round_modes import strategy_settings as core_settings
from server.secure_aggregation import (
    MODULUS_RANGE,
    check_secure_aggregation,
    quantization_level,
)
from strategies.fed_robustmerge import FedRobustMerge

HALTED = "halted (too few clients answered a stage)"


def masked_vector_bytes(layout: TermLayout) -> int:
    """Bytes of one client's masked vector as sent: the weight factor and every entry as int64
    in NumPy's .npy format (what ``secaggplus_mod`` uploads)."""
    shapes = [(1,), *(entry.shape for entry in layout.entries)]
    return sum(len(ndarray_to_bytes(np.zeros(shape, dtype=np.int64))) for shape in shapes)


class SecAggPlusAdapter(Strategy):
    """The legacy strategy ``SecAggPlusWorkflow`` drives, as a thin adapter over the core.

    ``configure_fit`` samples with the core and sends the global adapter with the core's train
    instruction (plus the adapter's key order and SecAgg+'s clipping range); ``aggregate_fit``
    turns the workflow's mean back into sums and hands them to ``FedRobustMerge.aggregate_sums``.
    The outcome of the round it was given is kept in ``merged``/``metrics`` for ``SecureRounds``.
    """

    def __init__(
        self,
        core: FedRobustMerge,
        layout: TermLayout,
        keys: Sequence[str],
        clipping_range: float,
        quantization_range: int,
    ) -> None:
        super().__init__()
        self.core = core
        self.layout = layout
        self.keys = list(keys)
        self.clipping_range = clipping_range
        self.quantization_range = quantization_range
        self.sampled: list[int] = []
        self.summed: list[int] = []
        self.merged: ArrayRecord | None = None
        self.metrics: MetricRecord | None = None
        self.sent_bytes = 0

    def begin(self, server_round: int, global_tensors: Mapping[str, torch.Tensor]) -> Parameters:
        """Open round ``server_round`` in the core; the global adapter as legacy Parameters."""
        self.core.open_round(server_round, global_tensors)
        self.sampled, self.summed = [], []
        self.merged, self.metrics = None, None
        parameters = ndarrays_to_parameters(
            [global_tensors[key].to(torch.float32).contiguous().numpy() for key in self.keys]
        )
        self.sent_bytes = sum(len(tensor) for tensor in parameters.tensors)
        return parameters

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Unused: the round loop hands the workflow the global adapter each round."""
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The core's seeded sample; the global adapter with the core's train instruction."""
        nodes = self.core.sample_nodes(
            lambda: [p.node_id for p in client_manager.all().values()],
            self.core.fraction_train,
            self.core.min_train_nodes,
            server_round,
        )
        proxies = {proxy.node_id: proxy for proxy in client_manager.all().values()}
        if len(nodes) * self.quantization_range >= MODULUS_RANGE:
            raise ConfigError(
                f"{len(nodes)} sampled clients times secagg-quantization-range "
                f"{self.quantization_range} reach SecAgg+'s modulus 2**32: the sum would wrap; "
                f"lower the range to at most {(MODULUS_RANGE - 1) // len(nodes)}"
            )
        instruction: dict[str, Scalar] = {
            **self.core.train_instruction(server_round),
            **merge_settings(self.core.settings.method),  # type: ignore[arg-type]
            wire.ADAPTER_KEYS: wire.KEY_SEPARATOR.join(self.keys),
            wire.SECAGG_CLIPPING_RANGE: self.clipping_range,
        }
        self.sampled = nodes
        log(INFO, "configure_fit: sampled %d nodes for secure aggregation", len(nodes))
        return [(proxies[node], FitIns(parameters, dict(instruction))) for node in nodes]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Sums = T x the workflow's mean (see ``server.secure_aggregation``); the core merges."""
        count = len(results)
        self.summed = [proxy.node_id for proxy, _ in results]
        extra: dict[str, float] = {}
        sums: dict[str, torch.Tensor] = {}
        if count:
            aggregate = results[0][1].parameters
            if any(fitres.parameters is not aggregate for _, fitres in results):
                raise RuntimeError(
                    "aggregate_fit received different parameters per client: this strategy "
                    "must run under SecAggPlusWorkflow, which hands it only the aggregate"
                )
            sums = self.layout.unpack(parameters_to_ndarrays(aggregate), scale=float(count))
            clipped = round(float(sums.pop(CLIPPED_KEY)))
            extra = {
                "train-loss": float(sums.pop(TRAIN_LOSS_KEY)) / count,
                "secagg-clipped-clients": clipped,
            }
            if clipped:
                log(
                    WARNING,
                    "round %d: %d of %d clients had terms beyond secagg-clipping-range %g "
                    "(clipped); raise the range",
                    server_round,
                    clipped,
                    count,
                    self.clipping_range,
                )
        self.merged, self.metrics = self.core.aggregate_sums(
            server_round, sums, self.summed, extra, count * masked_vector_bytes(self.layout)
        )
        return None, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, Any]]:
        """No client-side evaluation under secure aggregation (refused in the config)."""
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list[Any], failures: list[Any]
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Nothing to aggregate."""
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """The round loop evaluates; nothing here."""
        return None


class SecureRounds:
    """Rounds under SecAgg+: one ``SecAggPlusWorkflow`` round per server round."""

    def __init__(
        self,
        core: FedRobustMerge,
        workflow: SecAggPlusWorkflow,
        context: Context,
        settings: ServerSettings,
        initial: Mapping[str, torch.Tensor],
        adapter_type: type[SecAggPlusAdapter] = SecAggPlusAdapter,
    ) -> None:
        self._core = core
        self.workflow = workflow
        self.clipping_range = settings.secagg_clipping_range
        self.quantization_range = settings.secagg_quantization_range
        layout = TermLayout.for_adapter(
            [(key, tuple(value.shape)) for key, value in initial.items()], self.clipping_range
        )
        self.received_bytes = masked_vector_bytes(layout)
        self.adapter = adapter_type(
            core, layout, list(initial), self.clipping_range, self.quantization_range
        )
        self.client_manager = SimpleClientManager()
        self.legacy = LegacyContext(
            context=context,
            config=ServerConfig(num_rounds=1, round_timeout=settings.round_timeout),
            strategy=self.adapter,
            client_manager=self.client_manager,
        )
        self._updater: tuple[threading.Thread, threading.Event] | None = None
        log(
            INFO,
            "Secure aggregation (SecAgg+): shares=%s threshold=%s clipping_range=%s "
            "quantization_range=%s, q = %.3g per client and entry",
            settings.secagg_num_shares,
            settings.secagg_reconstruction_threshold,
            self.clipping_range,
            self.quantization_range,
            quantization_level(self.clipping_range, self.quantization_range),
        )

    @classmethod
    def from_settings(
        cls,
        core: FedRobustMerge,
        context: Context,
        settings: ServerSettings,
        initial: Mapping[str, torch.Tensor],
        adapter_type: type[SecAggPlusAdapter] = SecAggPlusAdapter,
    ) -> SecureRounds:
        """The mode the run config describes (refusing what SecAgg+ cannot honour)."""
        workflow = check_secure_aggregation(settings)
        if workflow is None:
            raise ConfigError("SecureRounds needs run config secure-aggregation = true")
        return cls(core, workflow, context, settings, initial, adapter_type)

    @property
    def core(self) -> FedRobustMerge:
        """The FedRobustMerge the adapter merges with."""
        return self._core

    @property
    def uplink(self) -> str:
        """The uplink label in metrics.json."""
        return "secure-aggregation"

    def train(
        self,
        grid: Grid,
        server_round: int,
        global_tensors: Mapping[str, torch.Tensor],
        timeout: float,
    ) -> TrainOutcome:
        """Run the four SecAgg+ stages once; the core finishes the merge from the sums."""
        self._connect(grid)
        parameters = self.adapter.begin(server_round, global_tensors)
        self.legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {Key.CURRENT_ROUND: server_round}
        )
        self.legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            parameters, keep_input=True
        )
        self.workflow(grid, self.legacy)
        adapter = self.adapter
        metrics = adapter.metrics
        if metrics is None:  # the workflow halted before any sum reached the adapter
            _, metrics = self._core.skip_secure_round(server_round, HALTED)
        per_client = {
            "bytes-sent-per-client": adapter.sent_bytes,
            "bytes-received-per-client": self.received_bytes,
            "clients-dropped": len(adapter.sampled) - len(adapter.summed),
        }
        metrics.update(per_client)
        report = self._core.round_report(server_round)
        traffic: Traffic = (
            {str(node): adapter.sent_bytes for node in adapter.sampled},
            {str(node): self.received_bytes for node in adapter.summed},
        )
        return TrainOutcome(
            entry=round_entry(
                server_round, len(adapter.sampled), len(adapter.summed), metrics, report
            ),
            merged=as_tensors(adapter.merged),
            traffic=traffic,
            audit=secure_round_fields(adapter.sampled, adapter.summed, skipped=report.skipped),
        )

    def evaluate(
        self,
        grid: Grid,
        server_round: int,
        global_tensors: Mapping[str, torch.Tensor],
        timeout: float,
    ) -> tuple[dict[str, Any] | None, Traffic]:
        """No client-side evaluation under SecAgg+ (refused at start)."""
        return None, NO_TRAFFIC

    def checkpoint_state(self) -> dict[str, Any]:
        """The core's settings and SecAgg+'s ranges."""
        return {
            **core_settings(self._core),
            "secure-aggregation": {
                "clipping-range": self.clipping_range,
                "quantization-range": self.quantization_range,
                "modulus-range": MODULUS_RANGE,
            },
        }

    def restore(self, saved: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> None:
        """Nothing to restore: the server never saw a norm to screen with."""

    def close(self) -> None:
        """Stop the thread that keeps the legacy client manager in step with the grid."""
        if self._updater is not None:
            thread, stop = self._updater
            stop.set()
            thread.join(timeout=10)
            self._updater = None

    def _connect(self, grid: Grid) -> None:
        """Keep the legacy client manager in step with the grid's nodes (once per run)."""
        if self._updater is None:
            thread, stop, registered = start_update_client_manager_thread(grid, self.client_manager)
            registered.wait()
            self._updater = (thread, stop)
