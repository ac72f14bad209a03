"""A checked reply's tensors as a mapping the merge engine reads key by key."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from strategies.reply_checks import AcceptedReply


class ReplyTensors(Mapping[str, torch.Tensor]):
    """A reply's tensors, decoded key by key when the merge asks for them.

    The merge engine works module by module, so it never holds more than one module of every
    reply at once; decoding every reply first would double the round's memory.
    """

    def __init__(self, reply: AcceptedReply) -> None:
        self.reply = reply
        self.keys_in_order = reply.keys()

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.reply.tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_in_order)

    def __len__(self) -> int:
        return len(self.keys_in_order)
