"""FedSA-LoRA's split on the site (run-config ``personalization = "shared-a"``; issue 27).

Under "shared-a" the LoRA A factors are shared and every LoRA B is the site's own (FedSA-LoRA,
ICLR 2025: A learns what is general across sites, B what is particular to one). Each round the
site

1. starts from the global adapter with every B replaced by its own B from the last round it
   trained (``start_with_own_b``); a site that has none yet (its first round, or after its
   state was lost) starts from the global's B, as every site did in round 1;
2. trains as usual (both factors);
3. keeps its trained B (``SiteBStore.save``) and sends only the rest, the A factors
   (``shared_part``): half the LoRA uplink at equal shapes.

Where the B lives: with node-config ``site-state-dir`` set, in that folder
(``client.site_state``: one safetensors file written atomically, so a site that restarts goes on
with its own B); without it, in the ClientApp's ``context.state``, which lasts as long as the
node's process (every round of a simulation; a SuperNode until it restarts).

The site scores its personalised adapter (the global A with its own B) in client-side
evaluation; a site that has not trained yet has no B of its own and scores the global's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, Context
from flwr.common import log

from client.site_state import load_site_state, save_site_state
from protocol.wire import site_keeps

STATE_RECORD = "site-b"  # the context.state ArrayRecord holding the site's own B
STATE_DIR_KEY = "site-state-dir"  # node config: the folder that keeps the site's B on disk


def own_b_shapes(adapter: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The keys (and shapes) of ``adapter`` that the site keeps: every LoRA B."""
    return {key: tuple(value.shape) for key, value in adapter.items() if site_keeps(key)}


def shared_part(trained: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the site sends: the trained adapter without the tensors it keeps."""
    return {key: value for key, value in trained.items() if not site_keeps(key)}


def start_with_own_b(
    start: Mapping[str, torch.Tensor], own_b: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """``start`` (the global at the site's rank) with every B replaced by the site's own; the
    global's B where the site has none (``own_b`` None)."""
    if own_b is None:
        return dict(start)
    # What a restarted site's log shows: it went on from its own B, not the global's.
    log(INFO, "shared-a: starting from this site's own B (%d tensors)", len(own_b))
    return {key: own_b.get(key, value) for key, value in start.items()}


@dataclass(frozen=True)
class SiteBStore:
    """Where this site keeps its own B: a folder (node-config ``site-state-dir``) or the
    ClientApp's ``context.state``."""

    context: Context

    @property
    def folder(self) -> str:
        """The node's ``site-state-dir`` ("" when unset: the B lives in ``context.state``)."""
        return str(self.context.node_config.get(STATE_DIR_KEY, "") or "")

    def load(self, expected: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor] | None:
        """The site's own B with the ``expected`` keys and shapes, or None for a fresh start (no
        B kept yet, or one that does not fit: logged, never raised)."""
        if self.folder:
            return load_site_state(self.folder, expected)
        record = self.context.state.array_records.get(STATE_RECORD)
        if record is None:
            log(INFO, "shared-a: no B of this site's own yet; starting from the global's B")
            return None
        kept = {key: value.to(torch.float32) for key, value in record.to_torch_state_dict().items()}
        fits = set(kept) == set(expected) and all(
            tuple(kept[key].shape) == shape for key, shape in expected.items()
        )
        if not fits:
            log(
                WARNING,
                "shared-a: the B kept in this node's state does not fit the global adapter "
                "(keys or shapes differ: did lora-r or the model change?); starting from the "
                "global's B",
            )
            return None
        return {key: kept[key] for key in expected}

    def save(self, own_b: Mapping[str, torch.Tensor]) -> None:
        """Keep ``own_b`` for the next round (atomically, in the folder when there is one)."""
        if self.folder:
            save_site_state(self.folder, own_b)
            return
        tensors = {key: value.detach().to("cpu").contiguous() for key, value in own_b.items()}
        self.context.state.array_records[STATE_RECORD] = ArrayRecord(tensors)
