"""RobustMerge under Flower's SecAgg+ (run config ``secure-aggregation = true``): the server learns
only the sums of the clients' merge terms and finishes the merge with one division.

Why it works (spec, "Decomposition worth knowing"): in paper-exact mode with equal client
weights, A_m = sum_t lambda A^_t (divided by T in the round form rounds use),
B_m[:, i] = sum_t lambda s~_t[i] B^_t[:, i] / sum_t s~_t[i],
other tensors the mean: sums of per-client terms and one division. Each client computes its
terms on its delta (``client.secure_aggregation``), Flower's SecAgg+ sums them under masks,
``strategies.merging.decomposed.finish_from_sums`` divides, and the server step is FedRobustMerge's
delta step, G <- G + server_lr * merged. This module holds the reasoning and the start-up
refusals; the rounds run in the one round loop, as its SecAgg+ mode (``server.secure_rounds``),
and the merge is FedRobustMerge's (``aggregate_sums``).

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

from collections.abc import Callable, Mapping
from logging import WARNING

import torch
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.supercore import log

from server.config import ConfigError, ServerSettings
from strategies.combinations import configured_method

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
            not configured_method(settings.merge_method, settings.merge_mode).sums_client_terms(),
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
            settings.mixes_ranks,
            "client-ranks",
            f"is {','.join(map(str, settings.client_ranks))!r}: SecAgg+ sums every client's "
            "terms entry by entry, so every site must train the same rank (terms of different "
            "ranks do not line up, and each site's truncation of the global would have to be "
            "known to the sum); set client-ranks = '' or one rank",
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
