"""The train handler's sparse uplink: the reply is the pruned delta of what the dense reply
carries, in the codec's wire form, marked, and nothing else."""

from __future__ import annotations

from pathlib import Path

import torch

from client.app import train
from protocol.merge_settings import merge_settings
from protocol.sparse_codec import decode_update
from protocol.wire import ARRAYS, CONFIG, METRICS, SERVER_ROUND, SPARSE, UPLINK
from strategies.merging.decomposed import prune_adapter
from strategies.merging.robustmerge import RobustMerge
from tests.client.test_app import context, instruction
from tests.workload.tiny_model import tiny_run_config
from workload.model import LoraSettings, initial_adapter


def test_sparse_reply_is_the_pruned_delta_of_the_dense_reply(tiny_model_dir: Path) -> None:
    run_config = tiny_run_config(
        tiny_model_dir,
        # The client's own keep-ratio plays no part: it prunes with the server's settings.
        **{"train-examples": 8, "seen-tasks": "mcid", "keep-ratio": 0.9, "uplink": "dense"},
    )
    method = RobustMerge(keep_ratio=0.3, scale_quantile=0.25)
    base = initial_adapter(LoraSettings.from_run_config(run_config), seed=0)
    node = {"partition-id": 0}
    dense = train(instruction(base, "train", {"server-round": 1}), context(run_config, **node))
    sparse = train(
        instruction(base, "train", {SERVER_ROUND: 1, UPLINK: SPARSE, **merge_settings(method)}),
        context(run_config, **node),
    )
    assert not sparse.has_error()
    assert set(sparse.content.keys()) == {ARRAYS, CONFIG, METRICS}
    assert dict(sparse.content.config_records[CONFIG]) == {UPLINK: SPARSE}
    assert dict(sparse.content.metric_records[METRICS]) == dict(
        dense.content.metric_records[METRICS]
    )

    trained = dense.content.array_records[ARRAYS].to_torch_state_dict()
    wire = {k: v.numpy() for k, v in sparse.content.array_records[ARRAYS].items()}
    pruned, scales = decode_update(wire, {key: tuple(value.shape) for key, value in base.items()})
    want, want_scales = prune_adapter({k: trained[k] - base[k] for k in base}, method)
    for key in base:
        assert torch.equal(pruned[key], want[key]), key
    assert scales.keys() == want_scales.keys()
    for name in scales:
        assert torch.equal(scales[name], want_scales[name]), name
    payload = sum(array.nbytes for array in wire.values())
    assert payload < 0.5 * sum(tensor.numel() * 4 for tensor in trained.values())
