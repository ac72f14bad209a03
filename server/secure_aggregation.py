"""RobustMerge under Flower's SecAgg+ (run config ``secure-aggregation = true``): the server learns
only the sums of the clients' merge terms and finishes the merge with one division.

Why it works (spec, "Decomposition worth knowing"): in paper-exact mode with equal client
weights, A_m = sum_t lambda A^_t (divided by T in the round form rounds use),
B_m[:, i] = sum_t lambda s~_t[i] B^_t[:, i] / sum_t s~_t[i],
other tensors the mean: sums of per-client terms and one division. Each client computes its
terms on its delta (``client.secure_aggregation``), Flower's SecAgg+ sums them under masks,
``strategies.merging.decomposed.finish_from_sums`` divides, and the server step is FedRobustMerge's
delta step, G <- G + server_lr * merged.

How the sums come out of Flower's workflow
------------------------------------------
``SecAggPlusWorkflow`` hands ``Strategy.aggregate_fit`` the legacy results list with every
``FitRes.parameters`` replaced by one weighted *mean*: sum_t w_t x_t / sum_t w_t, with
w_t = round(num_examples_t / max_weight * Q) / Q. Every client reports num_examples = 1 and
``max_weight`` is 1, so w_t = 1 and the mean is (sum_t x_t) / T. T, the number of clients whose
masked vectors were summed, is ``len(results)``: the workflow builds that list from exactly the
stage-2 replies it sums and unmasks (clients that dropped before stage 2 are in neither; a
client that drops in the unmask stage is in both, its mask rebuilt from its neighbours' shares).
So sums = T * mean. Weighting by examples would need each n_t (or a second secure pass) and
is refused.

Dropouts: Flower 1.41's SecAgg+ tolerates clients lost from the vector stage on (while
training, or before unmasking), within the reconstruction threshold; 1.42 behaves the same (its
SecAggPlusWorkflow, secaggplus_mod and SecAgg+ protocol code are identical to 1.41's). A client
lost in the setup or share-keys stage halts the round (the unmask stage asks its neighbours for
shares they never received): the round is recorded as skipped, the global stays, the run goes on.

Error bound (stated for the defaults c = 8, Q = 2**22, M = 2**32)
----------------------------------------------------------------
SecAgg+ clips each transported value to [-c, c] (c = ``secagg-clipping-range``) and rounds
(x + c) * Q / (2c) stochastically to an integer (Q = ``secagg-quantization-range``): an error
below one level, q = 2c / Q (3.8e-6 by default), per client and entry, zero in expectation.
The server's dequantisation is exact in float64 up to ~1e-16. With T summed clients and no
clipping (``client.secure_aggregation`` says why s~ never clips and the terms practically never
do; ``secagg-clipped-clients`` in metrics.json counts clients that did), per entry:

- A_m (a plain sum):                         |err| < T q
- other (non-LoRA) keys (a mean):            |err| < q
- the scale sums D_i = sum_t s~_t[i]:        |err| < T q_i, q_i = 2 d_in / Q (s~ travels as
  s~ c / d_in), e.g. 1.8e-4 for MiniLM's d_in = 384, 2.0e-3 for d_in = 4096
- B_m[:, i] = N_i / D_i:                     |err| <= (T q + |B_m[:, i]| T q_i) / (D_i - T q_i)
  (N_i's error is below T q) and, as D_i >= T (every s~ >= 1), about q + q_i |B_m[:, i]|.

So the secure merge equals the plain one (FedRobustMerge on the same deltas) to within T q on A
(1.5e-5 for T = 4) and q + q_i |B_m| on B, plus float32 rounding of the finish (~1e-7
relative); the errors are zero in expectation. ``tests/server/test_secure_aggregation.py``
checks these bounds entry by entry. Measured on the default workload (MiniLM, 2 clients,
512 examples each, one round): largest error 6.5e-6 on A (entries up to 2.7e-2), 9.5e-7 on B,
1.2e-4 relative (Frobenius) on the whole merged update; 0 clients clipped.

The ranges are Flower's defaults (c = 8, Q = 2**22), kept: c = 8 gives B's terms 8x headroom on
that workload (see ``client.secure_aggregation``) and q is small against one round's update.
With at most 127 clients per round, Q = 2**25 makes q 8 times smaller (or allows c = 64 at the
same q).

Range constraints: each client's quantised value and the weight factor lie in [0, Q], and the
server sums T of them modulo M = 2**32 (``modulus_range``, Flower's default): T Q < M, i.e.
at most 1023 clients per round with Q = 2**22 (checked every round). Q must also stay below
2**31 (the quantiser's int32).

Refused combinations (``check_secure_aggregation``, ConfigError naming the key): see the
messages there: merge-mode paper-equation, another merge-method, merge-target adapter,
weight-by-examples, uplink sparse, dp != none, max-update-norm > 0, robust-aggregation krum /
trimmed-mean / median, robust-clip, fraction-evaluate > 0, fewer than 2 clients per round. The
default robust-aggregation 'norm' is accepted but not applied, with a warning at start
(``SECAGG_SCREEN_WARNING``): the server cannot see an update's norm under SecAgg+.

What the server holds: the aggregate only. The plaintext part of each client's reply is
``num_examples = 1``, an OK status and empty metrics; the train loss and the clipped flag
travel inside the masked vector, so only their sums are learned. With T = 2 each client can of
course infer the other's terms from the sum and its own: SecAgg hides individuals among T.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Context
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
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid
from flwr.supercore import log

from server.audit_log import AuditLog, secure_round_fields
from server.checkpoints import CheckpointStore
from server.communication import round_communication
from server.config import ConfigError, ServerSettings
from server.run_loop import (
    RunFiles,
    finish_run,
    log_server_eval,
    open_audit,
    resume_or_archive,
    save_round,
)
from strategies import wire
from strategies.fed_robustmerge import seeded_sample
from strategies.merging.decomposed import finish_from_sums
from strategies.merging.errors import MergeInputError
from strategies.merging.robustmerge import RobustMerge
from strategies.secagg_layout import CLIPPED_KEY, TRAIN_LOSS_KEY, TermLayout
from strategies.sparse_uplink import merge_settings

Evaluate = Callable[[Mapping[str, torch.Tensor]], dict[str, float]]
MODULUS_RANGE = 2**32  # Flower's default; its docs ask for at most 2**32
MAX_QUANTIZATION_RANGE = 2**31 - 1  # the quantiser rounds into int32


SECAGG_SCREEN_WARNING = (
    "robust-aggregation 'norm' is NOT applied under secure aggregation: SecAgg+ shows the server "
    "only the sum of the clients' terms, never one update or its norm. What bounds a client "
    "instead is weaker: an honest client's secaggplus_mod clips every value it sends to "
    "[-secagg-clipping-range, secagg-clipping-range] (8 by default, against update entries "
    "around 1e-2), which caps a runaway honest site; a hostile site runs its own code and can "
    "send any masked value, so nothing on the server bounds it. Where one site may be hostile, "
    "run without secure aggregation (the screen is on by default there)."
)


def quantization_level(clipping_range: float, quantization_range: int) -> float:
    """q = 2c / Q: one quantisation level, the bound on one client's error per entry."""
    return 2.0 * clipping_range / quantization_range


def check_secure_aggregation(settings: ServerSettings) -> SecAggPlusWorkflow | None:
    """Refuse, with the reason, every setting the secure path cannot honour; the SecAgg+
    workflow those settings make (None when secure aggregation is off)."""
    if not settings.secure_aggregation:
        return None
    refusals: list[tuple[bool, str, str]] = [
        (
            settings.merge_mode != "paper-exact",
            "merge-mode",
            f"is {settings.merge_mode!r}: the paper's equation multiplies each client's own "
            "pruned factors (B^_t diag(s_t / sum s) A^_t), a product that no sum of per-client "
            "terms can express, so the server would need every client's factors; set "
            "merge-mode = 'paper-exact'",
        ),
        (
            settings.merge_method != "robustmerge",
            "merge-method",
            f"is {settings.merge_method!r}: the secure path sums RobustMerge's per-client terms "
            "(ties' sign election, dare's per-client drop and svd's factorisation need the "
            "individual updates); set merge-method = 'robustmerge'",
        ),
        (
            settings.merge_target != "delta",
            "merge-target",
            f"is {settings.merge_target!r}: SecAgg+ clips every value to a fixed range, which "
            "suits one round's deltas; full adapters grow round after round (A by about 2T "
            "times its kept mass per round in adapter mode) until they clip silently; set "
            "merge-target = 'delta'",
        ),
        (
            settings.weight_by_examples,
            "weight-by-examples",
            "is true: weights n_t / sum(n) must multiply each client's terms before the sum, "
            "so the server would have to learn every n_t (or run a second secure pass); set "
            "weight-by-examples = false (clients are weighted equally)",
        ),
        (
            settings.uplink != "dense",
            "uplink",
            f"is {settings.uplink!r}: a sparse reply reveals which entries survived each "
            "client's pruning, and SecAgg+ masks dense integer vectors; set uplink = 'dense' "
            "(or secure-aggregation = false to keep the sparse uplink)",
        ),
        (
            settings.dp != "none",
            "dp",
            f"is {settings.dp!r}: Flower's DP wrappers clip and noise individual updates of the "
            "Message-API strategy; with SecAgg+ the server holds only sums of RobustMerge terms, "
            "which they do not calibrate for; set dp = 'none'",
        ),
        (
            settings.max_update_norm is not None,
            "max-update-norm",
            "is set: it rejects individual updates by their norm, which the server never sees "
            "under secure aggregation; set max-update-norm = 0",
        ),
        (
            settings.robust.selects or settings.robust.rewrites_coordinates,
            "robust-aggregation",
            f"is {settings.robust.aggregation!r}: multi-Krum and the coordinate-wise stages need "
            "every client's update, and SecAgg+ shows the server only their sum; set "
            "robust-aggregation = 'norm' (the default, not applied under SecAgg+, see the "
            "warning at start) or 'none'",
        ),
        (
            settings.robust.clip,
            "robust-clip",
            "is true: clipping an update to the robust bound needs its norm, which the server "
            "never sees under secure aggregation; set robust-clip = false",
        ),
        (
            settings.fraction_evaluate > 0,
            "fraction-evaluate",
            f"is {settings.fraction_evaluate:g}: client-side evaluation is not wired into the "
            "SecAgg+ (legacy) workflow; set fraction-evaluate = 0 (server-eval still runs)",
        ),
        (
            settings.min_train_nodes < 2,
            "min-train-nodes",
            f"is {settings.min_train_nodes}: SecAgg+ needs at least 2 clients per round (the "
            "sum of one client's terms is those terms); set min-train-nodes >= 2",
        ),
    ]
    for refused, key, reason in refusals:
        if refused:
            raise ConfigError(
                f"secure-aggregation = true cannot run with run config {key!r}, which {reason} "
                "(or set secure-aggregation = false)"
            )
    if settings.robust.screens:
        log(WARNING, SECAGG_SCREEN_WARNING)
    if settings.secagg_quantization_range > MAX_QUANTIZATION_RANGE:
        raise ConfigError(
            "run config 'secagg-quantization-range' must be < 2**31 (SecAgg+ quantises into "
            f"int32), got {settings.secagg_quantization_range}"
        )
    if settings.min_train_nodes * settings.secagg_quantization_range >= MODULUS_RANGE:
        raise ConfigError(
            f"run config 'secagg-quantization-range' = {settings.secagg_quantization_range} "
            f"times min-train-nodes = {settings.min_train_nodes} reaches SecAgg+'s modulus "
            "2**32: the sum would wrap; lower the quantization range"
        )
    return build_workflow(settings)


def _count_or_fraction(value: float) -> int | float:
    """Flower reads an int as a count and a float as a fraction of the sampled clients."""
    return int(value) if value == int(value) else value


def build_workflow(settings: ServerSettings) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ workflow with this run's shares, threshold and ranges (max_weight 1)."""
    try:
        return SecAggPlusWorkflow(
            num_shares=_count_or_fraction(settings.secagg_num_shares),
            reconstruction_threshold=_count_or_fraction(settings.secagg_reconstruction_threshold),
            max_weight=1.0,
            clipping_range=settings.secagg_clipping_range,
            quantization_range=settings.secagg_quantization_range,
            modulus_range=MODULUS_RANGE,
            timeout=settings.round_timeout,
        )
    except (TypeError, ValueError) as error:
        raise ConfigError(
            "run config 'secagg-num-shares' / 'secagg-reconstruction-threshold' / "
            f"'secagg-quantization-range' rejected by SecAgg+: {error} (a count >= 3 of shares "
            "or a fraction <= 1 of the sampled clients; a threshold below the share count)"
        ) from None


def masked_vector_bytes(layout: TermLayout) -> int:
    """Bytes of one client's masked vector as sent: the weight factor and every entry as int64
    in NumPy's .npy format (what ``secaggplus_mod`` uploads)."""
    shapes = [(1,), *(entry.shape for entry in layout.entries)]
    return sum(len(ndarray_to_bytes(np.zeros(shape, dtype=np.int64))) for shape in shapes)


@dataclass
class RunRecord:
    """What the run writes after every round: history, checkpoints, metrics.json, the plot."""

    store: CheckpointStore
    files: RunFiles
    audit: AuditLog
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluate: Evaluate | None = None


class SecureRobustMerge(Strategy):
    """Legacy Flower strategy for ``SecAggPlusWorkflow``: sends the global adapter with the merge
    settings, finishes RobustMerge from the securely summed terms, applies the server step.

    ``evaluate`` (called by ``DefaultWorkflow`` after every round, halted or not) closes the
    round: server-side evaluation, checkpoint, metrics.json. Workflow round r is server round
    ``start_round + r`` (resume).

    Parameters
    ----------
    initial : Mapping[str, torch.Tensor]
        The global adapter to start from (key order = the wire order).
    record : RunRecord
        Where rounds are recorded.
    keep_ratio, scale_quantile, fuse_weight : float
        RobustMerge's settings, sent to the clients (they compute the terms).
    server_lr : float (default: 1.0)
        eta in G <- G + eta * merged.
    fraction_train : float (default: 1.0)
    min_train_nodes : int (default: 2)
        Sampling, as in FedRobustMerge (seeded with ``seed`` + round).
    min_merge_replies : int (default: 1)
        Fewer summed clients than this (or than 2) skip the round.
    clipping_range : float (default: 8.0)
    quantization_range : int (default: 4194304)
        SecAgg+'s c and Q (for the transport layout and the modulus check).
    seed : int (default: 0)
    start_round : int (default: 0)
        Rounds already done (resume).
    """

    def __init__(
        self,
        *,
        initial: Mapping[str, torch.Tensor],
        record: RunRecord,
        keep_ratio: float = 0.2,
        scale_quantile: float = 0.2,
        fuse_weight: float = 2.0,
        server_lr: float = 1.0,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_merge_replies: int = 1,
        clipping_range: float = 8.0,
        quantization_range: int = 4194304,
        seed: int = 0,
        start_round: int = 0,
    ) -> None:
        super().__init__()
        self.global_tensors = {key: value.to(torch.float32) for key, value in initial.items()}
        self.keys = list(self.global_tensors)
        self.record = record
        self.keep_ratio = keep_ratio
        self.scale_quantile = scale_quantile
        self.fuse_weight = fuse_weight
        self.server_lr = float(server_lr)
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.min_merge_replies = min_merge_replies
        self.clipping_range = clipping_range
        self.quantization_range = quantization_range
        self.seed = seed
        self.start_round = start_round
        self.layout = TermLayout.for_adapter(
            [(key, tuple(value.shape)) for key, value in self.global_tensors.items()],
            clipping_range,
        )
        self._entry: dict[str, Any] | None = None
        self._started = 0.0
        self._sampled_nodes: list[int] = []
        self._summed_nodes: list[int] = []

    def __repr__(self) -> str:
        return (
            f"SecureRobustMerge(keep_ratio={self.keep_ratio}, scale_quantile="
            f"{self.scale_quantile}, fuse_weight={self.fuse_weight}, server_lr={self.server_lr}, "
            f"c={self.clipping_range}, Q={self.quantization_range})"
        )

    def settings_state(self) -> dict[str, Any]:
        """The merge settings stored with each checkpoint (like run_loop.strategy_settings)."""
        return {
            "merge-method": "robustmerge",
            "merge-hyperparameters": {
                "mode": "paper-exact",
                "keep_ratio": self.keep_ratio,
                "scale_quantile": self.scale_quantile,
                "fuse_weight": self.fuse_weight,
            },
            "merge-target": "delta",
            "server-lr": self.server_lr,
            "weight-by-examples": False,
            "seed": self.seed,
            "secure-aggregation": {
                "clipping-range": self.clipping_range,
                "quantization-range": self.quantization_range,
                "modulus-range": MODULUS_RANGE,
            },
        }

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """The global adapter the run starts (or resumes) from."""
        return self._parameters()

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Sample (seeded) and send the global adapter with the keys and the merge settings."""
        self._started = time.perf_counter()
        round_number = self.start_round + server_round
        proxies = self._sample(client_manager, round_number)
        if len(proxies) * self.quantization_range >= MODULUS_RANGE:
            raise ConfigError(
                f"{len(proxies)} sampled clients times secagg-quantization-range "
                f"{self.quantization_range} reach SecAgg+'s modulus 2**32: the sum would wrap; "
                f"lower the range to at most {(MODULUS_RANGE - 1) // len(proxies)}"
            )
        outgoing = self._parameters()
        config: dict[str, Scalar] = {
            wire.SERVER_ROUND: round_number,
            wire.ADAPTER_KEYS: wire.KEY_SEPARATOR.join(self.keys),
            **merge_settings(
                RobustMerge(
                    keep_ratio=self.keep_ratio,
                    scale_quantile=self.scale_quantile,
                    fuse_weight=self.fuse_weight,
                    mode="paper-exact",
                )
            ),
            wire.SECAGG_CLIPPING_RANGE: self.clipping_range,
        }
        self._entry = {
            "server-round": round_number,
            "clients-sampled": len(proxies),
            "train": {
                "clients-accepted": 0,
                "clients-rejected": 0,
                "clients-dropped": len(proxies),
                "round-skipped": 1,
                "bytes-sent-per-client": sum(len(t) for t in outgoing.tensors),
                "bytes-received-per-client": masked_vector_bytes(self.layout),
            },
            "merge": {"secure-aggregation": "halted (too few clients answered a stage)"},
        }
        self._sampled_nodes = [proxy.node_id for proxy in proxies]
        self._summed_nodes = []
        log(INFO, "configure_fit: sampled %d nodes for secure aggregation", len(proxies))
        return [(proxy, FitIns(outgoing, dict(config))) for proxy in proxies]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Sums = T x the workflow's mean; finish the merge; G <- G + server_lr * merged."""
        round_number = self.start_round + server_round
        entry: dict[str, Any] = self._entry or {"server-round": round_number}
        self._entry = entry
        train: dict[str, Any] = entry.setdefault("train", {})
        count = len(results)
        self._summed_nodes = [proxy.node_id for proxy, _ in results]
        train["clients-accepted"] = count
        train["clients-dropped"] = entry.get("clients-sampled", count) - count
        train["bytes-received"] = count * train.get("bytes-received-per-client", 0)
        train["bytes-sent"] = entry.get("clients-sampled", count) * train.get(
            "bytes-sent-per-client", 0
        )
        if count < max(self.min_merge_replies, 2):
            entry["merge"] = {"secure-aggregation": f"{count} clients summed: round skipped"}
            log(
                WARNING,
                "round %d: %d clients summed: skipped, global unchanged",
                round_number,
                count,
            )
            return None, self._metrics(train)
        aggregate = results[0][1].parameters
        if any(fitres.parameters is not aggregate for _, fitres in results):
            raise RuntimeError(
                "aggregate_fit received different parameters per client: this strategy must "
                "run under SecAggPlusWorkflow, which hands it only the aggregate"
            )
        started = time.perf_counter()
        sums = self.layout.unpack(parameters_to_ndarrays(aggregate), scale=float(count))
        clipped = round(float(sums.pop(CLIPPED_KEY)))
        train_loss = float(sums.pop(TRAIN_LOSS_KEY)) / count
        try:
            merged = finish_from_sums(sums, count, form="round")
        except MergeInputError as error:
            entry["merge"] = {"secure-aggregation": f"unusable sums: {error}"}
            log(
                WARNING,
                "round %d: unusable secure sums (%s): global unchanged",
                round_number,
                error,
            )
            return None, self._metrics(train)
        squared = 0.0
        for key, value in self.global_tensors.items():
            update = merged[key].mul_(self.server_lr)
            squared += float(update.square().sum())
            self.global_tensors[key] = value + update
        train.update(
            {
                "round-skipped": 0,
                "merge-seconds": time.perf_counter() - started,
                "merged-update-norm": squared**0.5,
                "train-loss": train_loss,
                "secagg-clipped-clients": clipped,
            }
        )
        entry["merge"] = {"secure-aggregation": "completed", "clients-summed": count}
        if clipped:
            log(
                WARNING,
                "round %d: %d of %d clients had terms beyond secagg-clipping-range %g (clipped); "
                "raise the range",
                round_number,
                clipped,
                count,
                self.clipping_range,
            )
        log(
            INFO,
            "round %d: merged the secure sum of %d clients (%d dropped), |update| = %.4g",
            round_number,
            count,
            train["clients-dropped"],
            squared**0.5,
        )
        return self._parameters(), self._metrics(train)

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
        """Close the round: server-side evaluation, checkpoint, metrics.json (round 0: the
        initial adapter's evaluation on a fresh run)."""
        record = self.record
        if server_round == 0:
            if self.start_round == 0 and record.evaluate is not None:
                record.history.append(
                    {"server-round": 0, "server-eval": record.evaluate(self.global_tensors)}
                )
                log_server_eval(0, record.history[-1]["server-eval"])
                record.files.write(record.history)
            return None
        round_number = self.start_round + server_round
        entry: dict[str, Any] = self._entry or {"server-round": round_number}
        self._entry = None
        if record.evaluate is not None:
            entry["server-eval"] = record.evaluate(self.global_tensors)
            log_server_eval(round_number, entry["server-eval"])
        entry["seconds"] = time.perf_counter() - self._started if self._started else 0.0
        train = entry.get("train", {})
        entry["communication"] = round_communication(
            uplink="secure-aggregation",
            train_down={
                str(node): int(train.get("bytes-sent-per-client", 0))
                for node in self._sampled_nodes
            },
            train_up={
                str(node): int(train.get("bytes-received-per-client", 0))
                for node in self._summed_nodes
            },
            history=record.history,
        )
        record.history.append(entry)
        record.audit.round(
            round_number,
            self.global_tensors,
            secure_round_fields(
                self._sampled_nodes,
                self._summed_nodes,
                skipped=entry.get("merge", {}).get("secure-aggregation") != "completed",
            ),
        )
        save_round(
            record.store,
            record.files,
            round_number,
            record.history,
            self.global_tensors,
            self.settings_state(),
        )
        return None

    def _parameters(self) -> Parameters:
        return ndarrays_to_parameters(
            [self.global_tensors[key].contiguous().numpy() for key in self.keys]
        )

    def _sample(self, client_manager: ClientManager, server_round: int) -> list[ClientProxy]:
        """Seeded sampling by node id, so a resumed run asks the same nodes."""
        available = client_manager.num_available()
        wanted = max(int(available * self.fraction_train), self.min_train_nodes)
        while client_manager.num_available() < wanted:
            log(INFO, "Waiting for nodes: %d connected (need %d).", available, wanted)
            time.sleep(1)
            available = client_manager.num_available()
        by_id = {proxy.node_id: proxy for proxy in client_manager.all().values()}
        return [by_id[node] for node in seeded_sample(by_id, wanted, self.seed, server_round)]

    @staticmethod
    def _metrics(train: Mapping[str, Any]) -> dict[str, Scalar]:
        return {
            key: value
            for key, value in train.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }


def run_secure_federation(
    grid: Grid,
    context: Context,
    settings: ServerSettings,
    *,
    initial: Mapping[str, torch.Tensor],
    store: CheckpointStore,
    summary: dict[str, Any],
    evaluate: Evaluate | None = None,
    seen_tasks: Sequence[str] = (),
    unseen_tasks: Sequence[str] = (),
    strategy_type: type[SecureRobustMerge] = SecureRobustMerge,
) -> dict[str, torch.Tensor]:
    """Run (or resume) the federation under SecAgg+; returns the final global adapter."""
    workflow = check_secure_aggregation(settings)
    if workflow is None:
        raise ConfigError("run_secure_federation needs run config secure-aggregation = true")
    log(
        INFO,
        "Secure aggregation (SecAgg+): robustmerge paper-exact keep_ratio=%s scale_quantile=%s "
        "fuse_weight=%s server_lr=%s; shares=%s threshold=%s clipping_range=%s "
        "quantization_range=%s",
        settings.keep_ratio,
        settings.scale_quantile,
        settings.fuse_weight,
        settings.server_lr,
        settings.secagg_num_shares,
        settings.secagg_reconstruction_threshold,
        settings.secagg_clipping_range,
        settings.secagg_quantization_range,
    )
    start, resumed, history, _ = resume_or_archive(store, settings.output_dir, settings.resume)
    record = RunRecord(
        store=store,
        files=RunFiles(settings.output_dir, summary, tuple(seen_tasks), tuple(unseen_tasks)),
        audit=open_audit(
            settings.output_dir, summary, start, resumed if resumed is not None else initial
        ),
        history=history,
        evaluate=evaluate,
    )
    strategy = strategy_type(
        initial=resumed if resumed is not None else initial,
        record=record,
        keep_ratio=settings.keep_ratio,
        scale_quantile=settings.scale_quantile,
        fuse_weight=settings.fuse_weight,
        server_lr=settings.server_lr,
        fraction_train=settings.fraction_train,
        min_train_nodes=settings.min_train_nodes,
        min_merge_replies=settings.min_merge_replies,
        clipping_range=settings.secagg_clipping_range,
        quantization_range=settings.secagg_quantization_range,
        seed=settings.seed,
        start_round=start,
    )
    remaining = settings.num_server_rounds - start
    log(
        INFO,
        "Secure aggregation (SecAgg+): %s; %d rounds to run; q = %.3g per client and entry",
        strategy,
        max(remaining, 0),
        quantization_level(settings.secagg_clipping_range, settings.secagg_quantization_range),
    )
    if remaining > 0:
        legacy = LegacyContext(
            context=context,
            config=ServerConfig(num_rounds=remaining, round_timeout=settings.round_timeout),
            strategy=strategy,
        )
        DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
    finish_run(store, record.files, record.history, strategy.global_tensors, record.audit)
    return strategy.global_tensors
