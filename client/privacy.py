"""Client-side clipping for differential privacy: Flower's ``fixedclipping_mod``, when asked.

With run config ``dp = "client-clipping"`` the server's DP wrapper puts a clipping norm into
every train instruction's config; Flower's ``fixedclipping_mod`` then clips this client's update
(its trained LoRA tensors minus the global ones, all tensors together) to that L2 norm before
the reply leaves the node. Without the key (every other run, and evaluate messages) the mod
would answer with an error, so this guard calls it only when the instruction asks for clipping.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM


def asks_for_clipping(msg: Message) -> bool:
    """True for a train instruction whose config carries the DP clipping norm."""
    if msg.metadata.message_type != MessageType.TRAIN or msg.has_error():
        return False
    return any(KEY_CLIPPING_NORM in record for record in msg.content.config_records.values())


def clip_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A ClientApp mod: ``fixedclipping_mod`` for train instructions that carry a clipping norm."""
    if asks_for_clipping(msg):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
