"""Three mock sites for real round loops in the server tests: each trains (``trained``) from the
global it is sent; the hostile one scales its update x1000, so the default's norm screen rejects
it every round."""

from __future__ import annotations

from flwr.app import Message

from tests.messages import AnsweredOnPull
from tests.strategies.test_fed_robustmerge import reply, trained

HOSTILE = 3  # its update is 1000x an honest one's: the norm screen rejects it


class ThreeSites(AnsweredOnPull):
    """Nodes 1-3 (node n reports 10 n examples); ``HOSTILE`` scales its update x1000.
    ``extra_metrics`` adds metrics to a node's reply in a round (none by default)."""

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]

    def extra_metrics(self, node: int, server_round: int) -> dict[str, float]:
        """Metrics added to ``node``'s reply in ``server_round``."""
        return {}

    def answer(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        server_round = int(message.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
        base = {
            k: v.float()
            for k, v in message.content.array_records["arrays"].to_torch_state_dict().items()
        }
        moved = trained(base, 100 * server_round + node)
        factor = 1000.0 if node == HOSTILE else 1.0
        tensors = {k: base[k] + factor * (moved[k] - base[k]) for k in base}
        extra = self.extra_metrics(node, server_round)
        sent = reply(node, tensors, 10 * node, extra_metrics=extra or None)
        return Message(sent.content, reply_to=message)
