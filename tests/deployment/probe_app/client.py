"""Probe ClientApp: adds (partition-id + 1) to the weights, so the average is checkable."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Return the received weights shifted by this node's partition id + 1."""
    weights = msg.content.array_records["arrays"].to_numpy_ndarrays()
    shift = float(context.node_config["partition-id"]) + 1.0
    content = RecordDict(
        {
            "arrays": ArrayRecord([w + shift for w in weights]),
            "metrics": MetricRecord({"num-examples": 1}),
        }
    )
    return Message(content, reply_to=msg)
