"""The wire keys are a contract with deployed clients: their spelling must not drift."""

from __future__ import annotations

from protocol import wire


def test_wire_keys_keep_their_spelling() -> None:
    """A renamed key would break every client or server still running the old code."""
    assert (wire.ARRAYS, wire.CONFIG, wire.METRICS) == ("arrays", "config", "metrics")
    assert (wire.SERVER_ROUND, wire.LEARNING_RATE) == ("server-round", "learning-rate")
    assert (wire.NUM_EXAMPLES, wire.TRAIN_LOSS) == ("num-examples", "train-loss")
    assert wire.LORA_RANK == "lora-rank"
    assert (wire.EVAL_LOSS, wire.EVAL_ACCURACY, wire.EVAL_PERPLEXITY) == (
        "eval-loss",
        "eval-accuracy",
        "eval-perplexity",
    )
    assert (wire.UPLINK, wire.UPLINKS) == ("uplink", ("dense", "sparse"))
    assert wire.SPARSE_SETTINGS == ("keep-ratio", "scale-quantile", "merge-mode", "fuse-weight")
    assert (wire.ADAPTER_KEYS, wire.KEY_SEPARATOR) == ("adapter-keys", "\n")
    assert wire.SECAGG_CLIPPING_RANGE == "secagg-clipping-range"
