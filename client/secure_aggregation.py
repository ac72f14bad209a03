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
   ``fuse-weight``, ``secagg-clipping-range``);
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

Transport format (``TermLayout``, shared with the server)
--------------------------------------------------------
The vector is: every adapter key in the order sent (its term), then one ``<module>::scale``
(r,) per LoRA module in ``parse_layout`` order, then two (1,) entries, ``::clipped`` and
``::train-loss``. SecAgg+ clips every entry to [-c, c] (c = ``secagg-clipping-range``) before
quantising, so each entry travels multiplied by a public constant (the server divides it out):

- LoRA and other terms: 1. They fit while |lambda * delta_A| and |lambda * s~ * delta_B| stay
  within c. s~ multiplies B and can approach d_in, so B's terms are the ones to watch: on the
  default workload (MiniLM, 512 examples, one round) the largest was 0.99 (s~ up to 82,
  |delta_B| up to 8e-3), A's 0.014, so the default c = 8 leaves 8x headroom. A client whose
  terms exceed c is counted (below) and the server logs a warning: raise the range then;
- s~: c / d_in (d_in = entries per row of A). s~ >= 1 is not bounded by any small constant, but
  it is by d_in: the entries pruning drops are all below tau and each kept one is >= tau, so
  a row with k >= 1 kept entries has s < d_in / k <= d_in (and s = 1 when none is kept). So
  the scale entries never clip, whatever the data;
- ``::clipped``: c if any other entry of this client exceeded c (was clipped), else 0. The
  server learns how many clients clipped, not which;
- ``::train-loss``: the local train loss clamped to [0, ``LOSS_RANGE``], times c / LOSS_RANGE;
  the server learns the mean train loss only.

Values are float64 here, so the quantiser's own rounding is far below one level.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from client.config import read_float
from client.uplink import ARRAYS_KEY, CONFIG_KEY
from strategies.merging.decomposed import client_terms, scale_key
from strategies.merging.lora_keys import parse_layout
from strategies.merging.robustmerge import RobustMerge
from strategies.sparse_uplink import UPLINK_KEY

Handler = Callable[[Message, Context], Message]

# FitIns config keys the server sends (kebab-case like the run config).
ADAPTER_KEYS = "adapter-keys"
KEY_SEPARATOR = "\n"
CLIPPED_KEY = "::clipped"
TRAIN_LOSS_KEY = "::train-loss"
LOSS_RANGE = 100.0


@dataclass(frozen=True)
class TermEntry:
    """One array of the transported vector: its name, shape and public transport factor."""

    name: str
    shape: tuple[int, ...]
    factor: float


@dataclass(frozen=True)
class TermLayout:
    """The order, shapes and transport factors of the vector that SecAgg+ sums (see module doc).

    Built identically by client and server from the adapter's keys and shapes (public: the
    server sends them) and the clipping range c.
    """

    entries: tuple[TermEntry, ...]
    clipping_range: float

    @classmethod
    def for_adapter(
        cls, shapes: Sequence[tuple[str, tuple[int, ...]]], clipping_range: float
    ) -> TermLayout:
        """Adapter keys in the given order, then each module's scale, then the two scalars."""
        if not clipping_range > 0:
            raise ValueError(f"clipping range must be > 0, got {clipping_range}")
        entries = [TermEntry(key, tuple(shape), 1.0) for key, shape in shapes]
        shape_of = dict(shapes)
        for module in parse_layout(shape_of).modules:
            a_shape = shape_of[module.a_key]
            rank = a_shape[0]
            width = math.prod(a_shape) // rank
            entries.append(TermEntry(scale_key(module.name), (rank,), clipping_range / width))
        entries.append(TermEntry(CLIPPED_KEY, (1,), clipping_range))
        entries.append(TermEntry(TRAIN_LOSS_KEY, (1,), clipping_range / LOSS_RANGE))
        return cls(tuple(entries), float(clipping_range))

    @property
    def names(self) -> list[str]:
        """Entry names in vector order."""
        return [entry.name for entry in self.entries]

    def pack(self, terms: Mapping[str, torch.Tensor], train_loss: float) -> list[np.ndarray]:
        """One client's terms as the float64 arrays SecAgg+ quantises (transport units).

        Raises ValueError for a missing, misshapen or non-finite term: SecAgg+ would turn a NaN
        into an arbitrary integer and corrupt everyone's sum.
        """
        arrays: list[np.ndarray] = []
        clipped = False
        for entry in self.entries[:-2]:
            if entry.name not in terms:
                raise ValueError(f"term {entry.name!r} is missing from the client's terms")
            value = terms[entry.name].detach().to("cpu", torch.float64).numpy()
            if tuple(value.shape) != entry.shape:
                raise ValueError(
                    f"term {entry.name!r} has shape {tuple(value.shape)}, expected {entry.shape}"
                )
            if not np.isfinite(value).all():
                raise ValueError(f"term {entry.name!r} is not finite; refusing to send it")
            scaled = value * entry.factor
            clipped = clipped or bool(np.abs(scaled).max(initial=0.0) > self.clipping_range)
            arrays.append(scaled)
        loss = min(max(train_loss, 0.0), LOSS_RANGE) if math.isfinite(train_loss) else LOSS_RANGE
        arrays.append(np.array([self.clipping_range if clipped else 0.0]))
        arrays.append(np.array([loss * self.entries[-1].factor]))
        return arrays

    def unpack(self, arrays: Sequence[np.ndarray], scale: float = 1.0) -> dict[str, torch.Tensor]:
        """Transport-unit arrays back to true units (times ``scale``), float64, by name."""
        if len(arrays) != len(self.entries):
            raise ValueError(f"expected {len(self.entries)} arrays, got {len(arrays)}")
        result: dict[str, torch.Tensor] = {}
        for entry, array in zip(self.entries, arrays, strict=True):
            value = np.asarray(array, dtype=np.float64)
            if tuple(value.shape) != entry.shape:
                raise ValueError(
                    f"array {entry.name!r} has shape {tuple(value.shape)}, expected {entry.shape}"
                )
            result[entry.name] = torch.from_numpy(value * (scale / entry.factor))
        return result


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
            f"the instruction has {len(arrays)} arrays but {len(keys)} names in {ADAPTER_KEYS!r}"
        )
    global_state = {
        key: torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
        for key, array in zip(keys, arrays, strict=True)
    }
    method = RobustMerge(
        keep_ratio=read_float(config, "keep-ratio", 0.2, low=0.0, source="train config"),
        scale_quantile=read_float(config, "scale-quantile", 0.2, low=0.0, source="train config"),
        fuse_weight=read_float(config, "fuse-weight", 2.0, low=-math.inf, source="train config"),
        mode="paper-exact",
    )
    clipping_range = read_float(
        config, "secagg-clipping-range", 8.0, low=0.0, low_open=True, source="train config"
    )
    inner_config: dict[str, Any] = {"server-round": config.get("server-round", 0)}
    if "learning-rate" in config:
        inner_config["learning-rate"] = config["learning-rate"]
    # The normal train handler's view of this instruction: same metadata, the new-style content.
    inner = Message(  # type: ignore[call-overload]
        content=RecordDict(
            {ARRAYS_KEY: ArrayRecord(global_state), CONFIG_KEY: ConfigRecord(inner_config)}
        ),
        metadata=msg.metadata,
    )
    reply = train(inner, context)
    if reply.has_error():
        raise RuntimeError(f"local training failed: {reply.error.reason}")
    reply_config = reply.content.config_records.get(CONFIG_KEY)
    if reply_config is not None and reply_config.get(UPLINK_KEY, "dense") != "dense":
        raise ValueError(
            "run config 'uplink' must be 'dense' under secure aggregation (the terms are built "
            "from the dense delta)"
        )
    trained = reply.content.array_records[ARRAYS_KEY].to_torch_state_dict()
    metrics = reply.content.metric_records.get("metrics")
    train_loss = float(metrics["train-loss"]) if metrics and "train-loss" in metrics else 0.0  # type: ignore[arg-type]
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
    value = config.get(ADAPTER_KEYS)
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"the secure-aggregation instruction lacks {ADAPTER_KEYS!r} (the adapter's key "
            "names, newline-separated); is the server running server.secure_aggregation?"
        )
    return value.split(KEY_SEPARATOR)
