"""The client side of RobustMerge under Flower's SecAgg+: train, turn the delta into RobustMerge's
additive terms, let ``secaggplus_mod`` mask them, so the server learns only their sum.

Flow (run-config ``secure-aggregation = true``; the server side is ``server.secure_aggregation``)
-------------------------------------------------------------------------------------------------
SecAgg+ lives in Flower's legacy workflow: its four stages arrive as ``train`` messages carrying
a ConfigRecord ``RECORD_KEY_CONFIGS``. ``secure_aggregation_mod`` (a mod on the ClientApp's
train handler) hands exactly those to Flower's ``secaggplus_mod``; every other message goes to
the normal handler untouched. In the stage that collects masked vectors, ``secaggplus_mod``
calls ``train_terms``, which

1. reads the legacy ``FitIns``: the global adapter as ndarrays in the order of the config's
   ``adapter-keys`` and the merge settings (``keep-ratio``, ``scale-quantile``,
   ``merge-mode``, ``fuse-weight``, ``secagg-clipping-range``; ``protocol.wire``);
2. runs the ordinary train handler on it (``client.app.train``: same data, seeds and model,
   classification or causal-lm);
3. takes the delta (trained - global) and computes its terms with
   ``strategies.merging.decomposed.client_terms`` (A -> lambda A^, B -> lambda s~ B^,
   ``<module>::scale`` -> s~, other keys -> the delta);
4. packs them into one float64 vector (``TermLayout``) and replies a legacy ``FitRes`` with
   ``num_examples = 1``. ``secaggplus_mod`` then quantises, masks and sends that vector, and
   empties the FitRes arrays: the terms themselves never leave the node. ``num_examples`` is 1
   for every client (the server's ``max_weight`` is 1), so the weights SecAgg+ applies are all
   equal and carry nothing about the site; the FitRes metrics are empty.

The vector's layout (``TermLayout``: order, shapes, transport factors) is shared with the server
and lives in ``protocol.secagg_layout``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from client.instruction import instructed_method
from protocol import wire
from protocol.secagg_layout import TermLayout
from strategies.merging.decomposed import client_terms
from workload.config import Reader

Handler = Callable[[Message, Context], Message]


def is_secure_aggregation_message(msg: Message) -> bool:
    """True for a train message of Flower's SecAgg+ protocol (any of its four stages)."""
    return (
        msg.metadata.message_type == MessageType.TRAIN
        and msg.has_content()
        and RECORD_KEY_CONFIGS in msg.content.config_records
    )


def secure_aggregation_mod(msg: Message, context: Context, call_next: Handler) -> Message:
    """Route SecAgg+ messages through Flower's ``secaggplus_mod`` (training via ``call_next``,
    the normal train handler, inside ``train_terms``); pass every other message on unchanged."""
    if not is_secure_aggregation_message(msg):
        return call_next(msg, context)

    def terms_handler(inner: Message, ctxt: Context) -> Message:
        return train_terms(inner, ctxt, call_next)

    return secaggplus_mod(msg, context, terms_handler)


def train_terms(msg: Message, context: Context, train: Handler) -> Message:
    """Train on the legacy FitIns with ``train`` and reply the packed terms as a legacy FitRes."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = fitins.config
    keys = _adapter_keys(config)
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(keys):
        raise ValueError(
            f"the instruction has {len(arrays)} arrays but {len(keys)} names in "
            f"{wire.ADAPTER_KEYS!r}"
        )
    global_state = {
        key: torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
        for key, array in zip(keys, arrays, strict=True)
    }
    method = instructed_method(config)
    clipping_range = Reader(config, "train config").number(wire.SECAGG_CLIPPING_RANGE)
    inner_config: dict[str, Any] = {wire.SERVER_ROUND: config.get(wire.SERVER_ROUND, 0)}
    if wire.LEARNING_RATE in config:
        inner_config[wire.LEARNING_RATE] = config[wire.LEARNING_RATE]
    # The normal train handler's view of this instruction: same metadata, the new-style content.
    inner = Message(  # type: ignore[call-overload]
        content=RecordDict(
            {wire.ARRAYS: ArrayRecord(global_state), wire.CONFIG: ConfigRecord(inner_config)}
        ),
        metadata=msg.metadata,
    )
    reply = train(inner, context)
    if reply.has_error():
        raise RuntimeError(f"local training failed: {reply.error.reason}")
    reply_config = reply.content.config_records.get(wire.CONFIG)
    if reply_config is not None and reply_config.get(wire.UPLINK, wire.DENSE) != wire.DENSE:
        raise ValueError(
            "run config 'uplink' must be 'dense' under secure aggregation (the terms are built "
            "from the dense delta)"
        )
    trained = reply.content.array_records[wire.ARRAYS].to_torch_state_dict()
    metrics = reply.content.metric_records.get(wire.METRICS)
    train_loss = float(metrics[wire.TRAIN_LOSS]) if metrics and wire.TRAIN_LOSS in metrics else 0.0  # type: ignore[arg-type]
    odd = [key for key, value in global_state.items() if trained[key].shape != value.shape]
    if odd:
        raise ValueError(
            f"this site trained shape {tuple(trained[odd[0]].shape)} for {odd[0]!r} but the global "
            f"is {tuple(global_state[odd[0]].shape)}: secure aggregation sums same-shaped terms, "
            "so every site must train the global's rank (no node-config 'lora-r', no run-config "
            "'client-ranks' with different ranks)"
        )
    delta = {key: trained[key].to(torch.float32) - value for key, value in global_state.items()}
    terms = client_terms(delta, method)
    layout = TermLayout.for_adapter(
        [(key, tuple(value.shape)) for key, value in global_state.items()], clipping_range
    )
    fitres = FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters(layout.pack(terms, train_loss)),
        num_examples=1,
        metrics={},
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _adapter_keys(config: Mapping[str, Any]) -> list[str]:
    value = config.get(wire.ADAPTER_KEYS)
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"the secure-aggregation instruction lacks {wire.ADAPTER_KEYS!r} (the adapter's key "
            "names, newline-separated); is the server running server.secure_aggregation?"
        )
    return value.split(wire.KEY_SEPARATOR)
