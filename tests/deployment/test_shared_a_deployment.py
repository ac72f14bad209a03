"""Personalisation "shared-a" (FedSA-LoRA, issue 27) with two SuperNodes as real processes.

The topology of `test_deployment.py` (TLS, SuperNode authentication, a SuperExec with the
shared secret; `harness.start_federation`), each site naming its own folder for its state in
its node config (`site-state-dir`), as a real site would. Under "shared-a" a site sends only
its LoRA A factors and keeps its trained B in that folder (`client.shared_a.SiteBStore`,
`client.site_state`); the server merges A and keeps the B it started with (PEFT's zeros).

1. A 2-round run: completed; both sites merged every round, uplink about half the downlink;
   each site's folder holds its own B (only LoRA B keys, the global's shapes, trained: not
   zero), the two sites' B differ, and the final global's B is still zero (no B left a site);
   each site's personalised score is logged by the server next to the global's, and their mean
   is in metrics.json.
2. One site's SuperNode is stopped and started again (same key, port and node config), and a
   second run completes: the restarted site's log shows its B loaded from its folder (not a
   fresh start), and the B in its folder changed with the second run's training.

The module's waits share one deadline; `start_federation` ends every process at the end.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from client.site_state import SITE_STATE_FILE
from tests.deployment.harness import REPO_ROOT, Deadline, Federation, start_federation

pytestmark = pytest.mark.deployment

# Setup, a 2-round and a 1-round run of the tiny configuration (client-side evaluation every
# round) and one SuperNode restart, which waits for the SuperLink to mark the node offline (up
# to 60 s). Measured on the 2-core VM while two simulation benchmarks ran: 312 s at load ~6,
# 576 s at a heavier load; the bound leaves room above that.
MODULE_BUDGET_S = 900.0
CONNECTION = "robustmerge-shared-a"
SITES = ("site-a", "site-b")
RESTARTED = "site-b"

RUN_CONFIG: dict[str, object] = {
    "train-examples": 16,
    "eval-examples": 16,
    "max-length": 32,
    "min-train-nodes": 2,
    "server-eval": False,  # refused with shared-a: the global's B is not any site's
    "fraction-evaluate": 1.0,  # the personalised scores come from the sites' own evaluation
    "min-evaluate-nodes": 2,
    "merge-method": "robustmerge",  # paper-exact: merges the factors, so A alone is fine
    "merge-mode": "paper-exact",
    "personalization": "shared-a",
}


def state_dir(tmp: Path, site: str) -> Path:
    """The site-local folder that keeps `site`'s own B (its node-config `site-state-dir`)."""
    return tmp / "site-state" / site


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """SuperLink + SuperExec + two registered SuperNodes, each with its own state folder."""
    tmp = tmp_path_factory.mktemp("shared-a-deployment")
    sites = {
        site: (
            f"partition-id={index} num-partitions={len(SITES)} "
            f"site-state-dir={json.dumps(str(state_dir(tmp, site)))}"
        )
        for index, site in enumerate(SITES)
    }
    with start_federation(tmp, sites, Deadline(MODULE_BUDGET_S), connection=CONNECTION) as fed:
        yield fed


def run_to_completion(
    fed: Federation, rounds: int, out: Path
) -> tuple[int, dict[int, dict[str, Any]]]:
    """`flwr run` the app under shared-a for `rounds` rounds; fail unless it completes. Returns
    the run ID and metrics.json's rounds by number (round 0, before training, left out)."""
    run_id = fed.start_run(
        REPO_ROOT, {**RUN_CONFIG, "num-server-rounds": rounds, "output-dir": str(out)}
    )
    status = fed.wait_finished(run_id)
    if status != "finished:completed":
        fed.fail(f"run {run_id} ended as {status}\n{fed.run_log(run_id)}")
    metrics = json.loads((out / "metrics.json").read_text())
    by_round = {r["server-round"]: r for r in metrics["rounds"] if r.get("server-round", 0) > 0}
    assert sorted(by_round) == list(range(1, rounds + 1)), f"metrics.json: {sorted(by_round)}"
    return run_id, by_round


def assert_both_sites_merged_and_scored(
    fed: Federation, run_id: int, rounds: dict[int, dict[str, Any]]
) -> None:
    """Every round merged both sites' A-only replies, and evaluated both sites with their
    personalised scores (per site in the server's log, the mean in metrics.json)."""
    nodes = sorted(fed.node_ids.values())
    run_log = fed.run_log(run_id)
    for server_round, entry in rounds.items():
        merge = entry["merge"]
        assert sorted(merge["accepted-nodes"]) == nodes, (
            f"round {server_round}: rejected {merge['rejected']}\n{run_log}"
        )
        assert entry["train"]["clients-accepted"] == len(nodes), entry["train"]
        # Only A goes up: about half of what comes down (A and B have the same size here).
        traffic = entry["communication"]
        down = sum(traffic["train-down-bytes"].values())
        up = sum(traffic["train-up-bytes"].values())
        assert 0.45 < up / down < 0.55, traffic
        evaluated = entry["client-eval"]
        for key in ("eval-accuracy", "personalized-accuracy", "personalized-loss"):
            assert key in evaluated, (server_round, evaluated)
        for node in nodes:
            line = rf"round {server_round}: node {node}: .*global -> [\d.]+ personalised"
            assert re.search(line, run_log), f"no personalised scores of node {node}\n{run_log}"
        assert re.search(rf"round {server_round}: mean over the sites: .*personalised", run_log)


def own_b(fed: Federation, site: str) -> dict[str, torch.Tensor]:
    """What `site` keeps in its folder: its own LoRA B."""
    path = state_dir(fed.tmp, site) / SITE_STATE_FILE
    assert path.is_file(), f"{site} kept no B in {path}\n{fed.supernode(site).tail()}"
    return load_file(str(path))


def test_each_site_keeps_its_own_b_across_rounds_and_a_restart(federation: Federation) -> None:
    fed = federation
    out = fed.tmp / "run-1"
    run_id, rounds = run_to_completion(fed, 2, out)
    assert_both_sites_merged_and_scored(fed, run_id, rounds)
    assert fed.replying_nodes() == set(fed.node_ids.values())

    final = load_file(str(out / "final" / "adapter_model.safetensors"))
    global_b = {key: tensor for key, tensor in final.items() if ".lora_B." in key}
    assert global_b and any(".lora_A." in key for key in final)
    # No site's B reached the server: the global's B is still PEFT's initial zeros.
    assert all(not tensor.any() for tensor in global_b.values())

    kept = {site: own_b(fed, site) for site in SITES}
    for site, tensors in kept.items():
        assert set(tensors) == set(global_b), f"{site} keeps {sorted(tensors)}"
        for key, tensor in tensors.items():
            assert tensor.shape == global_b[key].shape, (site, key, tuple(tensor.shape))
            assert torch.isfinite(tensor).all(), (site, key)
        assert any(tensor.any() for tensor in tensors.values()), f"{site}'s B never trained"
    first, second = (kept[site] for site in SITES)
    assert any(not torch.equal(first[key], second[key]) for key in first), "the sites' B match"
    for site in SITES:  # each site's log: a fresh start in round 1, its own B from round 2 on
        node = fed.supernode(site)
        assert "no saved state, starting fresh" in node.log(), f"{site}: {node.tail()}"
        assert "shared-a, own B" in node.log(), f"{site} never scored its own B: {node.tail()}"

    # One site restarts (same key, port and folder) and the federation runs again.
    before = (state_dir(fed.tmp, RESTARTED) / SITE_STATE_FILE).read_bytes()
    restarted = fed.restart_supernode(RESTARTED)
    run_id, rounds = run_to_completion(fed, 1, fed.tmp / "run-2")
    assert_both_sites_merged_and_scored(fed, run_id, rounds)

    log = restarted.log()
    path = re.escape(str(state_dir(fed.tmp, RESTARTED) / SITE_STATE_FILE))
    loaded = re.search(rf"site state {path}: loaded (\d+) saved tensors", log)
    assert loaded, f"{RESTARTED} did not load its own B after the restart\n{restarted.tail()}"
    assert int(loaded.group(1)) == len(global_b)
    assert "starting fresh" not in log, f"{RESTARTED} started fresh: {restarted.tail()}"
    # ... and trained from it: the line comes before the first round's training ends.
    own_start = log.find("shared-a: starting from this site's own B")
    trained = log.find("client: round 1,")
    assert 0 <= own_start < trained, f"{RESTARTED} trained from the global's B: {restarted.tail()}"
    assert "shared-a, own B" in log, f"{RESTARTED} did not score its own B: {restarted.tail()}"
    after = own_b(fed, RESTARTED)
    assert set(after) == set(global_b)
    assert (state_dir(fed.tmp, RESTARTED) / SITE_STATE_FILE).read_bytes() != before
    assert any(not torch.equal(after[key], kept[RESTARTED][key]) for key in after)
