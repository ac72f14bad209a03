"""Two SuperNodes at different LoRA ranks (issue 16), as real processes on 127.0.0.1.

The topology of `test_deployment.py` (TLS, SuperNode authentication, a SuperExec with the
shared secret; `harness.start_federation`), with each site choosing its rank in its own node
config, as a real site would: `lora-r=4` on one SuperNode, `lora-r=8` on the other. The server
runs this project's app with a method that merges mixed ranks (svd, FlexLoRA) and the global at
run-config `lora-r = 8`, for 2 rounds. From the run's metrics.json: both sites were merged every
round, at ranks {4, 8}; each site's truncation error is recorded (0 at the global's rank, and
above 0 for the rank-4 site once the global has a product to truncate); the final adapter is a
PEFT adapter at rank 8.

The module's waits share one deadline; `start_federation` ends every process at the end.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from strategies.adapter_io.reading import read_adapter_dir
from tests.deployment.harness import REPO_ROOT, Deadline, Federation, start_federation

pytestmark = pytest.mark.deployment

# Setup plus one 2-round run of the tiny configuration: about 2 minutes on the idle 2-core VM;
# the bound leaves room for a busy machine, like test_deployment.py's.
MODULE_BUDGET_S = 480.0
CONNECTION = "robustmerge-ranks"
SITE_RANKS = {"site-low": 4, "site-high": 8}

RUN_CONFIG: dict[str, object] = {
    "num-server-rounds": 2,
    "train-examples": 16,
    "eval-examples": 16,
    "max-length": 32,
    "fraction-evaluate": 0.0,
    "min-train-nodes": 2,
    "server-eval": False,
    "merge-method": "svd",
    "lora-r": max(SITE_RANKS.values()),
    # the sites pick their ranks in their node config, so the server cannot know them at start:
    # "auto" would choose centered clipping, which refuses the rank-4 site's replies
    "robust-aggregation": "norm",
}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """SuperLink + SuperExec + two registered SuperNodes, each with its own `lora-r`."""
    tmp = tmp_path_factory.mktemp("mixed-rank-deployment")
    sites = {
        site: f"partition-id={index} num-partitions={len(SITE_RANKS)} lora-r={rank}"
        for index, (site, rank) in enumerate(SITE_RANKS.items())
    }
    with start_federation(tmp, sites, Deadline(MODULE_BUDGET_S), connection=CONNECTION) as fed:
        yield fed


def test_two_supernodes_at_ranks_4_and_8_merge_into_a_rank_8_global(
    federation: Federation,
) -> None:
    fed = federation
    out = fed.tmp / "app-outputs"
    run_id = fed.start_run(REPO_ROOT, {**RUN_CONFIG, "output-dir": str(out)})
    status = fed.wait_finished(run_id)
    if status != "finished:completed":
        fed.fail(f"run {run_id} ended as {status}\n{fed.run_log(run_id)}")

    metrics = json.loads((out / "metrics.json").read_text())
    rounds = {r["server-round"]: r for r in metrics["rounds"] if r.get("server-round", 0) > 0}
    assert sorted(rounds) == [1, 2], f"metrics.json has rounds {sorted(rounds)}"
    rank_of = {str(fed.node_ids[site]): rank for site, rank in SITE_RANKS.items()}
    low, high = (str(fed.node_ids[site]) for site in SITE_RANKS)
    for server_round, entry in rounds.items():
        merge = entry["merge"]
        assert sorted(merge["accepted-nodes"]) == sorted(fed.node_ids.values()), (
            f"round {server_round}: rejected {merge['rejected']}\n{fed.run_log(run_id)}"
        )
        assert merge["site-ranks"] == rank_of, merge
        assert set(merge["site-ranks"].values()) == {4, 8}
        errors = merge["site-truncation-errors"]
        assert set(errors) == set(rank_of), errors
        assert errors[high] == 0.0  # the global's own rank: sent as it is
        if server_round == 1:
            assert errors[low] == 0.0  # the initial global has B = 0: nothing to truncate
        else:
            assert 0.0 < errors[low] < 1.0, errors
    assert fed.replying_nodes() == set(fed.node_ids.values())

    final = read_adapter_dir(out / "final")
    assert final.config["r"] == max(SITE_RANKS.values())
    for key, tensor in final.tensors.items():
        rank = tensor.shape[0] if ".lora_A." in key else tensor.shape[1]
        assert rank == max(SITE_RANKS.values()), (key, tuple(tensor.shape))
