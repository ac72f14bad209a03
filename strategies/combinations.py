"""Which aggregation settings make sense together in federated rounds, with the reason when not.

One home for the refusals the strategy and the server's run-config reader share (docs: "What
combines with what"). Secure aggregation's own refusals live with it
(``server.secure_aggregation.check_secure_aggregation``), since they follow from what SecAgg+ lets
the server see.
"""

from __future__ import annotations

from strategies.merging import accepted_hyperparameters, create_method
from strategies.merging.method import MergeMethod, RoundFormError
from strategies.merging.ranks import mixed_rank_support
from strategies.robust import RobustSettings
from workload.config import SHARED_A


def configured_method(merge_method: str, mode: str) -> MergeMethod:
    """The method at its defaults with run-config ``merge-mode`` as its ``mode`` when it takes
    one (RobustMerge): what its declarations (``MergeMethod.prunes_on_client``, ...) are asked
    of before the other hyperparameters are resolved."""
    options = {"mode": mode} if "mode" in accepted_hyperparameters(merge_method) else {}
    return create_method(merge_method, **options)


def combination_refusal(
    merge_method: str,
    mode: str,
    merge_target: str,
    uplink: str,
) -> str | None:
    """Why these round settings cannot run together (a sentence naming the run-config keys and
    what to set instead), or None when they can. Hyperparameter values are checked elsewhere.

    What a method can do is its own declaration, never its name: merge-mode 'paper-equation'
    needs a method that takes a ``mode`` hyperparameter (RobustMerge's), the sparse uplink one
    that ``prunes_on_client()`` at its defaults (else the method is refused) and in the mode
    asked for (else the mode is)."""
    method = create_method(merge_method)
    try:
        method.round_form()
    except RoundFormError as error:
        return str(error)
    if mode == "paper-equation" and "mode" not in accepted_hyperparameters(merge_method):
        return (
            f"merge-mode 'paper-equation' is a form of RobustMerge, but merge-method is "
            f"{merge_method!r}; set merge-method = 'robustmerge' or merge-mode = 'paper-exact'"
        )
    if uplink == "sparse":
        if not method.prunes_on_client() or merge_target != "delta":
            return (
                "uplink 'sparse' has clients prune their own deltas (RobustMerge steps 1-2), so "
                "it needs merge-method 'robustmerge' and merge-target 'delta'; got "
                f"{merge_method!r} and {merge_target!r}"
            )
        if not configured_method(merge_method, mode).prunes_on_client():
            return (
                "uplink 'sparse' sends only each client's pruned deltas, but paper-equation's "
                "round form multiplies the pruned B delta by the client's whole A_t (docs: "
                "algorithm, round forms); set merge-mode = 'paper-exact' or uplink = 'dense'"
            )
    return None


def personalization_refusal(
    personalization: str, merge_method: str, mode: str, uplink: str
) -> str | None:
    """Why run-config ``personalization`` cannot run with these round settings (a sentence
    naming the keys), or None. Under "shared-a" the sites send their LoRA A factors only and keep
    every B, so the server merges A alone (with B's update zero): a method that merges the
    products B_t A_t needs each site's B, and the sparse uplink encodes both factors."""
    if personalization != SHARED_A:
        return None
    if configured_method(merge_method, mode).merges_products():
        return (
            f"personalization = 'shared-a' keeps each site's LoRA B on the site, but merge-method "
            f"{merge_method!r} (merge-mode {mode!r}) merges the products B_t A_t, which need every "
            "site's B; choose a method that merges the factors (robustmerge paper-exact, fedavg, "
            "ties, dare) or personalization = 'none'"
        )
    if uplink != "dense":
        return (
            f"personalization = 'shared-a' sends the LoRA A factors only, but uplink {uplink!r} "
            "encodes each site's pruned A and B deltas together; set uplink = 'dense'"
        )
    return None


def round_method(
    merge_method: str, merge_target: str, hyperparameters: dict[str, object]
) -> MergeMethod:
    """The merge method as rounds run it: its round form (size-invariant), except a method that
    ``keeps_one_shot_on_adapters()`` (paper-exact RobustMerge) with merge-target 'adapter',
    which keeps the released code's one-shot sum so that round 1 is exactly the paper's
    one-shot merge. Raises ``RoundFormError`` (a ValueError) for a method with no round form."""
    method = create_method(merge_method, **hyperparameters)
    one_shot = merge_target == "adapter" and method.keeps_one_shot_on_adapters()
    return method if one_shot else method.round_form()


def robust_refusal(robust: RobustSettings, uplink: str) -> str | None:
    """Why these robust options cannot run with this uplink (a sentence naming the keys), or
    None. Secure aggregation's refusals of them live with it, like its others."""
    if uplink == "sparse" and (robust.clip or robust.rewrites_coordinates):
        what = "robust-clip = true" if robust.clip else f"robust-aggregation {robust.aggregation!r}"
        return (
            f"{what} rewrites each client's update, but with uplink 'sparse' the clients have "
            "already pruned their deltas and computed RobustMerge's scales from them, which a "
            "rewrite on the server would not match; use uplink = 'dense', or robust-aggregation "
            "'norm' or 'krum' with robust-clip = false (rejecting and selecting need no rewrite)"
        )
    return None


def mixed_rank_refusal(
    merge_method: str,
    mode: str,
    merge_target: str,
    uplink: str,
    robust: RobustSettings,
    dp: str = "none",
) -> str | None:
    """Why these settings cannot merge sites of different LoRA ranks (run-config
    ``client-ranks`` with different entries, or a node-config ``lora-r`` other than the
    global's), a sentence naming the keys; None when they can (docs: strategy, "Mixed ranks").

    The server refuses such a run at start-up, and a reply of another rank at run time.
    """
    try:
        method = round_method(merge_method, merge_target, {"mode": mode})
    except (RoundFormError, TypeError, ValueError):
        method = create_method(merge_method)
    support = mixed_rank_support(method)
    if not support.mixed_ranks:
        return f"merge-method {merge_method!r} (merge-mode {mode!r}): {support.reason}"
    if merge_target != "delta":
        return (
            "merge-target 'adapter' averages full products, of which lower-rank sites were sent "
            "only a truncation (FlexLoRA's form, which shrinks the global's trailing directions "
            "every round); set merge-target = 'delta'"
        )
    if uplink != "dense":
        return (
            "uplink 'sparse' sends pruned factor deltas laid out at the global's rank; set "
            "uplink = 'dense'"
        )
    if robust.selects or robust.rewrites_coordinates or robust.clip:
        what = "robust-clip = true" if robust.clip else f"robust-aggregation {robust.aggregation!r}"
        if robust.chosen_by_auto is not None and not robust.clip:
            what += " (chosen by 'auto', which did not know the sites' ranks)"
        return (
            f"{what} compares or rewrites the clients' factors coordinate by coordinate, and "
            "factors of different ranks do not line up; use robust-aggregation 'norm' (the "
            "screen works on each site's own update norm) or 'none', with robust-clip = false, "
            "or give the sites' ranks in run-config client-ranks (then 'auto' picks 'norm')"
        )
    if dp != "none":
        return (
            f"dp {dp!r}: Flower's DP wrappers clip each update against the global adapter, "
            "which needs its shapes; set dp = 'none'"
        )
    return None
