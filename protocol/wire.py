"""The wire protocol between ServerApp and ClientApp: every record and config key that travels.

Server and client import these names from here, so a key is spelled once; the tensor layouts
live beside the code that builds them (``protocol.sparse_codec`` for the sparse uplink,
``protocol.secagg_layout`` for the SecAgg+ vector) and are named in the table.

What travels (records of a Flower ``Message``; keys kebab-case like the run config)
------------------------------------------------------------------------------------

=====================  =============================================================================
Direction              Content
=====================  =============================================================================
train instruction      ``ARRAYS`` ("arrays"): ArrayRecord of the global LoRA tensors (keys as
(server -> client)     ``workload.model.get_lora_state``).
                       ``CONFIG`` ("config"): ConfigRecord with ``SERVER_ROUND`` ("server-round",
                       int) and ``UPLINK`` ("uplink", "dense" or "sparse") always,
                       ``LEARNING_RATE`` ("learning-rate") optionally; with a sparse
                       ``UPLINK`` the server's merge settings
                       ``KEEP_RATIO``, ``SCALE_QUANTILE``, ``MERGE_MODE``, ``FUSE_WEIGHT``
                       (``SPARSE_SETTINGS``); with ``dp = "client-clipping"`` Flower's clipping
                       norm.
train reply            ``ARRAYS``: the trained LoRA tensors, fp32, the received keys in the received
(client -> server)     order (dense), or the pruned delta in the wire form of
                       ``protocol.sparse_codec`` (sparse, then ``CONFIG`` = {``UPLINK``:
                       "sparse"}).
                       ``METRICS`` ("metrics"): MetricRecord {``NUM_EXAMPLES``, ``TRAIN_LOSS``,
                       ``LORA_RANK`` ("lora-rank", int: the rank the site trained; its tensors
                       are A r x d_in, B d_out x r at that rank, see ``strategies.merging.ranks``)}.
evaluate instruction   ``ARRAYS`` as above; ``CONFIG`` with ``SERVER_ROUND`` (read by nobody).
evaluate reply         ``METRICS``: {``NUM_EXAMPLES``, ``EVAL_LOSS``, and ``EVAL_ACCURACY``
                       (classification) or ``EVAL_PERPLEXITY`` (causal-lm)}; with run-config
                       ``personalization = "local-finetune"`` also ``PERSONALIZED_STEPS`` and
                       each score of the personal copy (``PERSONALIZED_SCORES``).
SecAgg+ instruction    Flower's legacy FitIns: the global adapter as ndarrays in the order of
(server -> client)     ``ADAPTER_KEYS`` ("adapter-keys", names joined by ``KEY_SEPARATOR``), plus
                       ``SERVER_ROUND``, ``SPARSE_SETTINGS`` and ``SECAGG_CLIPPING_RANGE``.
SecAgg+ reply          one masked float64 vector laid out by
(client -> server)     ``protocol.secagg_layout.TermLayout``
                       (``num_examples`` = 1, no metrics).
=====================  =============================================================================

A client needs nothing from the server beyond these: it never reads a merge setting from its
own run config (``protocol.merge_settings.merge_settings`` writes them,
``client.instruction.instructed_method`` reads them back and refuses an instruction that lacks
any).

Nothing else leaves a client: no texts, labels, label names, base weights or file paths.
"""

from __future__ import annotations

from typing import Final

# Record names inside a Message's RecordDict.
ARRAYS: Final = "arrays"
CONFIG: Final = "config"
METRICS: Final = "metrics"

# Train / evaluate instruction ConfigRecord keys.
SERVER_ROUND: Final = "server-round"
LEARNING_RATE: Final = "learning-rate"

# Reply MetricRecord keys.
NUM_EXAMPLES: Final = "num-examples"
TRAIN_LOSS: Final = "train-loss"
# The LoRA rank the site trained at (its reply's tensors have that rank; issue 16).
LORA_RANK: Final = "lora-rank"
EVAL_LOSS: Final = "eval-loss"
EVAL_ACCURACY: Final = "eval-accuracy"
EVAL_PERPLEXITY: Final = "eval-perplexity"
# Run-config personalization = "local-finetune" (issue 27; ``client.personalization``): the
# evaluate reply also scores the site's personal copy (the global fine-tuned for
# PERSONALIZED_STEPS local optimiser steps) on the same held-out split, each global score under
# its personalised key; absent with personalization = "none".
PERSONALIZED_LOSS: Final = "personalized-loss"
PERSONALIZED_ACCURACY: Final = "personalized-accuracy"
PERSONALIZED_PERPLEXITY: Final = "personalized-perplexity"
PERSONALIZED_STEPS: Final = "personalized-steps"

PERSONALIZED_SCORES: Final = (
    (EVAL_LOSS, PERSONALIZED_LOSS),
    (EVAL_ACCURACY, PERSONALIZED_ACCURACY),
    (EVAL_PERPLEXITY, PERSONALIZED_PERPLEXITY),
)

# Under run-config personalization = "shared-a" (FedSA-LoRA) a site keeps every LoRA B as its own
# and its train reply carries the rest of the adapter only; the server expects exactly that.
SITE_KEPT_FACTOR: Final = ".lora_B."


def site_keeps(key: str) -> bool:
    """Whether a "shared-a" site keeps ``key`` (a LoRA B) instead of sending it."""
    return SITE_KEPT_FACTOR in key


# Which uplink a train reply (and, for "sparse", the train instruction) uses.
UPLINK: Final = "uplink"
DENSE: Final = "dense"
SPARSE: Final = "sparse"
UPLINKS: Final = (DENSE, SPARSE)

# The merge settings a client needs to prune (sparse uplink) or build its terms (SecAgg+).
KEEP_RATIO: Final = "keep-ratio"
SCALE_QUANTILE: Final = "scale-quantile"
MERGE_MODE: Final = "merge-mode"
FUSE_WEIGHT: Final = "fuse-weight"
SPARSE_SETTINGS: Final = (KEEP_RATIO, SCALE_QUANTILE, MERGE_MODE, FUSE_WEIGHT)

# SecAgg+ FitIns config keys.
ADAPTER_KEYS: Final = "adapter-keys"
KEY_SEPARATOR: Final = "\n"
SECAGG_CLIPPING_RANGE: Final = "secagg-clipping-range"
