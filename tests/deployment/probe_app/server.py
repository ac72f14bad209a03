"""Probe ServerApp: a few rounds of plain averaging straight on the Grid, with a record of
which SuperNodes replied, written the way the real ServerApp writes its outputs."""

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def _wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """Return the connected node IDs once at least `count` are there (bounded wait)."""
    end = time.monotonic() + timeout
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= count or time.monotonic() > end:
            return node_ids
        time.sleep(0.5)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Send the weights to every node each round, average the replies, checkpoint."""
    out = Path(str(context.run_config["output-dir"]))
    rounds = int(context.run_config["num-server-rounds"])
    node_ids = _wait_for_nodes(grid, int(context.run_config["min-train-nodes"]), 60.0)
    weights = np.zeros(4, dtype=np.float32)
    history = []
    for server_round in range(1, rounds + 1):
        messages = [
            Message(
                RecordDict({"arrays": ArrayRecord([weights])}),
                dst_node_id=node_id,
                message_type="train",
                group_id=str(server_round),
            )
            for node_id in node_ids
        ]
        replies = [m for m in grid.send_and_receive(messages, timeout=120) if m.has_content()]
        replied = sorted(m.metadata.src_node_id for m in replies)
        arrays = [m.content.array_records["arrays"].to_numpy_ndarrays()[0] for m in replies]
        weights = np.mean(arrays, axis=0).astype(np.float32)
        checkpoint = out / "checkpoints" / f"round-{server_round:04d}"
        checkpoint.mkdir(parents=True, exist_ok=True)
        state = {"round": server_round, "replied": replied, "weights": weights.tolist()}
        (checkpoint / "state.json").write_text(json.dumps(state))
        history.append(state)
    (out / "metrics.json").write_text(json.dumps({"sent-to": node_ids, "rounds": history}))
