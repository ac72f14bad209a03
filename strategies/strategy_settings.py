"""What a FedRobustMerge federation merges with and how: its settings, checked and resolved once.

``MergeSettings.build`` turns the strategy's keyword arguments into one frozen object (the merge
method in its round form, the robust options, the limits), refusing a bad value or a combination
that cannot run with a sentence naming the setting. The strategy's parts (reply admission, the
robust stages, the buffered and streamed rounds) read their settings from it, so each is written
once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.supercore import log

from protocol import wire
from protocol.merge_settings import merge_settings
from strategies.combinations import (
    combination_refusal,
    mixed_rank_refusal,
    personalization_refusal,
    robust_refusal,
    round_method,
)
from strategies.merging import accepted_hyperparameters, available_methods, resolve_device
from strategies.merging.decomposed import client_pruning
from strategies.merging.method import MergeMethod
from strategies.merging.robustmerge import RobustMerge
from strategies.merging.server_step import TARGETS, ServerStep
from strategies.robust import RobustSettings
from workload.config import PERSONALIZATION_MODES, schema_default


class Defaults:
    """FedRobustMerge's defaults: the run-config schema's, so a library user and an app user
    get the same federation."""

    merge_method = schema_default("merge-method", str)
    mode = schema_default("merge-mode", str)
    keep_ratio = schema_default("keep-ratio", float)
    scale_quantile = schema_default("scale-quantile", float)
    fuse_weight = schema_default("fuse-weight", float)
    merge_target = schema_default("merge-target", str)
    server_lr = schema_default("server-lr", float)
    weight_by_examples = schema_default("weight-by-examples", bool)
    min_merge_replies = schema_default("min-merge-replies", int)
    seed = schema_default("seed", int)
    uplink = schema_default("uplink", str)
    personalization = schema_default("personalization", str)
    buffer_replies = schema_default("buffer-replies", int)
    fraction_train = schema_default("fraction-train", float)
    fraction_evaluate = schema_default("fraction-evaluate", float)
    min_train_nodes = schema_default("min-train-nodes", int)
    min_evaluate_nodes = schema_default("min-evaluate-nodes", int)


@dataclass(frozen=True)
class MergeSettings:
    """The resolved merge settings of one strategy (see ``FedRobustMerge`` for each one's
    meaning). ``method`` is the merge method as rounds run it (``combinations.round_method``);
    ``other_ranks_refused`` says why a reply of another LoRA rank than the global's is refused
    (None: such replies are merged)."""

    merge_method: str
    hyperparameters: dict[str, Any]
    method: MergeMethod
    merge_target: str
    uplink: str
    server_lr: float
    weight_by_examples: bool
    device: str
    min_merge_replies: int
    max_update_norm: float | None
    max_num_examples: int
    diagnostics_modules: int
    seed: int
    robust: RobustSettings
    other_ranks_refused: str | None
    personalization: str = Defaults.personalization
    buffer_replies: int = Defaults.buffer_replies
    spill_dir: Path | None = None

    @classmethod
    def build(
        cls,
        *,
        merge_method: str,
        mode: str,
        keep_ratio: float,
        scale_quantile: float,
        fuse_weight: float,
        merge_options: Mapping[str, Any] | None,
        merge_target: str,
        server_lr: float,
        weight_by_examples: bool,
        device: str | None,
        min_merge_replies: int,
        max_update_norm: float | None,
        max_num_examples: int,
        diagnostics_modules: int,
        seed: int,
        uplink: str,
        robust: RobustSettings | None,
        personalization: str = Defaults.personalization,
        buffer_replies: int = Defaults.buffer_replies,
        spill_dir: str | Path | None = None,
    ) -> MergeSettings:
        """Check and resolve ``FedRobustMerge``'s merge arguments; ValueError names what is
        wrong.

        Every default but ``device``'s, ``max_num_examples``' and ``diagnostics_modules``' is the
        run-config schema's (``workload.config.SCHEMA``; docs/run-config.md), so a library user
        and an app user get the same federation.

        Parameters
        ----------
        merge_method : str
            Any registered merge method (``strategies.available_methods()``).
        mode : str
            RobustMerge's mode ("paper-exact" or "paper-equation").
        keep_ratio : float
        scale_quantile : float
        fuse_weight : float
            Passed to the method when it takes them.
        merge_options : dict, optional
            Further method hyperparameters (e.g. ``{"drop_rate": 0.3}`` for dare).
        merge_target : str
            "delta" or "adapter" (``FedRobustMerge``).
        server_lr : float
            eta in the server step.
        weight_by_examples : bool
            Weight clients by num-examples in RobustMerge (lambda_t = lambda T n_t / sum n); fedavg,
            svd and exact-mean always weight by examples.
        device : str, optional
            Merge device; None picks CUDA when available.
        min_merge_replies : int
            Fewer accepted replies than this skip the round; the global stays as it was.
        max_update_norm : float, optional
            Replies whose update (delta) Frobenius norm exceeds this are rejected.
        robust : RobustSettings, optional (default: "auto", resolved here with ``uplink``:
            centered clipping on the dense uplink, the norm screen alone on the sparse one)
            Byzantine-robust stages (``strategies.robust``): every option but "none" screens each
            update norm against ``norm_factor`` x the lower median of this round's norms and the
            last ``history`` accepted norms, rejecting (or, with ``clip``, clipping) outsized ones;
            "krum" then keeps the multi-Krum selection, "trimmed-mean" and "median" clamp each
            client's delta coordinate-wise before the merge. A lone first reply (no history yet)
            is accepted and its norm recorded.
        max_num_examples : int (default: 1e9)
            Upper bound on a reply's num-examples (it weights the merge).
        diagnostics_modules : int (default: 8)
            Modules sampled (evenly spaced) for the direction-robustness diagnostics; 0 disables.
        seed : int
            Seeds node sampling (round r samples with seed + r) so runs and resumes repeat.
        uplink : str
            "dense": replies carry the trained LoRA tensors. "sparse": each client sends its own
            pruned delta and scale vectors (``strategies.sparse_uplink``); needs merge_method
            "robustmerge" and merge_target "delta"; the merged global equals the dense one.
        personalization : str
            "shared-a": the sites send their LoRA A factors only and keep every B (run-config
            ``personalization``; ``client.shared_a``); the server reads each missing B as the
            global's (a zero update), so B stays as the run started. "none", "local-finetune":
            the replies carry the whole adapter.
        buffer_replies : int (run-config ``buffer-replies``)
            A buffered round (one that cannot fold its replies: docs/strategy.md, "What buffers,
            and why"; the default centered clipping among them) keeps this many accepted
            replies in memory and spills each further one to a safetensors file
            (``strategies.reply_spill``), read back key by key; the merge is the same bit for
            bit. The default 4 keeps the default round's peak near 10 adapters at any number of
            clients (issue 25's bar: < 16), where 16 in memory alone were 16 adapters; a round
            of 1,024 LLaMA-7B adapters (160 MB each) holds 0.6 GB of replies instead of 160 GB.
            Must be >= 1 (there is no "never spill").
        spill_dir : path, optional
            Where spill folders are made (the app: ``output-dir``/spill); None: the system
            temp folder. Each round's folder is removed when the round closes.
        """
        if merge_method not in available_methods():
            raise ValueError(
                f"unknown merge method {merge_method!r}; known methods: "
                f"{', '.join(available_methods())}"
            )
        if merge_target not in TARGETS:
            raise ValueError(f"merge_target must be one of {TARGETS}, got {merge_target!r}")
        if min_merge_replies < 1:
            raise ValueError(f"min_merge_replies must be >= 1, got {min_merge_replies}")
        if uplink not in wire.UPLINKS:
            raise ValueError(f"uplink must be one of {wire.UPLINKS}, got {uplink!r}")
        if personalization not in PERSONALIZATION_MODES:
            raise ValueError(
                f"personalization must be one of {PERSONALIZATION_MODES}, got {personalization!r}"
            )
        refusal = combination_refusal(
            merge_method, mode, merge_target, uplink
        ) or personalization_refusal(personalization, merge_method, mode, uplink)
        if refusal is not None:
            raise ValueError(refusal)
        robust = (robust if robust is not None else RobustSettings()).resolve(uplink=uplink)
        refusal = robust_refusal(robust, uplink)
        if refusal is not None:
            raise ValueError(refusal)
        if isinstance(buffer_replies, bool) or not (
            isinstance(buffer_replies, int) and buffer_replies >= 1
        ):
            raise ValueError(
                f"buffer_replies (run config 'buffer-replies') must be an integer >= 1, "
                f"got {buffer_replies!r}"
            )
        if max_update_norm is not None and not max_update_norm > 0:
            raise ValueError(f"max_update_norm must be > 0, got {max_update_norm}")
        accepted = accepted_hyperparameters(merge_method)
        unknown = sorted(set(merge_options or {}) - set(accepted))
        if unknown:
            raise ValueError(
                f"merge method {merge_method!r} does not take {', '.join(unknown)}; "
                f"it takes: {', '.join(accepted) or 'no hyperparameters'}"
            )
        offered = {
            "mode": mode,
            "keep_ratio": keep_ratio,
            "scale_quantile": scale_quantile,
            "fuse_weight": fuse_weight,
            **(merge_options or {}),
        }
        hyperparameters = {k: v for k, v in offered.items() if k in accepted}
        method = round_method(merge_method, merge_target, hyperparameters)
        return cls(
            merge_method=merge_method,
            hyperparameters=hyperparameters,
            method=method,
            merge_target=merge_target,
            uplink=uplink,
            server_lr=float(server_lr),
            weight_by_examples=weight_by_examples or method.weights_by_examples(),
            device=str(resolve_device(device)),
            min_merge_replies=min_merge_replies,
            max_update_norm=max_update_norm,
            max_num_examples=max_num_examples,
            diagnostics_modules=diagnostics_modules,
            seed=seed,
            robust=robust,
            other_ranks_refused=mixed_rank_refusal(
                merge_method, mode, merge_target, uplink, robust
            ),
            personalization=personalization,
            buffer_replies=buffer_replies,
            spill_dir=Path(spill_dir) if spill_dir is not None else None,
        )

    @property
    def sparse_method(self) -> RobustMerge | None:
        """The RobustMerge the clients prune with on the sparse uplink (None: dense uplink)."""
        if self.uplink == "sparse" and self.method.prunes_on_client():
            return client_pruning(self.method)
        return None

    @property
    def server_step(self) -> ServerStep:
        """The round's server step (``server-lr`` towards the ``merge-target``'s merge)."""
        return ServerStep(self.server_lr, self.merge_target)

    @property
    def method_form(self) -> str:
        """The form the merge method runs in (``strategies.merging.method.FORMS``)."""
        return str(getattr(self.method, "form", "round"))

    def train_instruction(self, server_round: int) -> dict[str, int | float | str]:
        """What a client needs from the server to train round ``server_round``
        (``protocol.wire``): the round, the uplink, and the merge settings when the client
        prunes (sparse uplink)."""
        instruction: dict[str, int | float | str] = {
            wire.SERVER_ROUND: server_round,
            wire.UPLINK: self.uplink,
        }
        if self.sparse_method is not None:
            instruction.update(merge_settings(self.sparse_method))
        return instruction

    def log_summary(self) -> None:
        """The merge's part of the strategy's start-up summary, with a warning for a setting
        known to misbehave."""
        log(INFO, "\t└──> Merge: %s %s on %s", self.merge_method, self.hyperparameters, self.device)
        log(
            INFO,
            "\t\t target=%s server_lr=%s weight_by_examples=%s min_merge_replies=%d uplink=%s",
            self.merge_target,
            self.server_lr,
            self.weight_by_examples,
            self.min_merge_replies,
            self.uplink,
        )
        log(INFO, "\t\t robust aggregation: %s", self.robust.describe())
        if self.merge_target == "adapter" and self.method_form == "one-shot":
            log(
                WARNING,
                "merge-target 'adapter' with %s keeps the one-shot sum of lambda * A over clients "
                "that share the global A: the merged A is about lambda x clients times one "
                "client's, so the step grows with the federation (the quality benchmark fell "
                "below zero-shot at lambda 2); prefer merge-target 'delta' (size-invariant), "
                "fuse-weight 1 or merge-mode 'paper-equation'",
                self.merge_method,
            )
