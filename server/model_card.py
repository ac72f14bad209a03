"""The model card (``README.md``) that goes with every adapter folder the server writes.

``final/`` and each ``checkpoints/round-NNNN/`` get a card in the Hugging Face model-card
format: a YAML header (``base_model``, ``library_name: peft``, ``tags``, ``license``) and a
Markdown body that says how the adapter was made: the merge method and its settings, the rounds,
the sites and examples per round, the per-task accuracy and its curve, the privacy settings (DP
epsilon, SecAgg+), the robust settings and the rejections, and the head digest of the run's
audit chain (``audit.jsonl``) when the card was written.

``model_card`` is a pure function of what the run loop already keeps (the run summary with its
run config, the history of metrics.json, the audit head), so a card can be rebuilt from any
run folder. It is built and checked with ``huggingface_hub``'s ``ModelCardData`` and
``ModelCard`` (offline: nothing here touches the network); the card file is written inside the
adapter folder's atomic write, beside the tensors (``server.checkpoints``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from workload.config import SCHEMA

CARD_FILE = "README.md"
# The embedded default model (run-config model = ""), as the Hub names it.
DEFAULT_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_LICENSE = "apache-2.0"  # the default model's, and this project's

MERGE_KEYS = (
    "merge-method",
    "merge-mode",
    "merge-target",
    "keep-ratio",
    "scale-quantile",
    "fuse-weight",
    "server-lr",
    "weight-by-examples",
    "min-merge-replies",
    "max-update-norm",
)
TRAINING_KEYS = (
    "task",
    "lora-r",
    "lora-alpha",
    "client-ranks",
    "target-modules",
    "train-factors",
    "local-epochs",
    "learning-rate",
    "batch-size",
    "train-examples",
    "seed",
)
PRIVACY_KEYS = ("dp", "dp-clipping-norm", "dp-noise-multiplier", "dp-delta", "uplink")
SECAGG_KEYS = (
    "secagg-num-shares",
    "secagg-reconstruction-threshold",
    "secagg-clipping-range",
    "secagg-quantization-range",
)
ROBUST_KEYS = (
    "robust-aggregation",
    "robust-norm-factor",
    "robust-clip",
    "robust-history",
    "robust-krum-malicious",
    "robust-krum-select",
    "robust-trim-fraction",
)
# The run summary's line for the defence that ran (``robust-aggregation`` "auto" resolved).
DEFENCE_KEY = "robust-defence"
DATA_KEYS = ("seen-tasks", "unseen-tasks", "partitioner", "partition-alpha", "partition-classes")


def model_card(
    summary: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    *,
    audit_head: str | None,
    server_round: int | None = None,
    seen_tasks: Sequence[str] = (),
    unseen_tasks: Sequence[str] = (),
) -> str:
    """The card of an adapter folder, as the text of its ``README.md``.

    Parameters
    ----------
    summary : Mapping
        The run summary of metrics.json (``server.app.run_summary``); its ``run-config`` gives
        the settings (a key it lacks is shown at the schema's default, as the apps read it).
    history : Sequence of Mapping
        metrics.json's rounds so far (round 0 = the initial adapter's evaluation, if any).
    audit_head : str or None
        The hash of the audit log's last record when the adapter was written.
    server_round : int or None (default: None)
        The round a checkpoint closes; None for ``final/``.
    seen_tasks, unseen_tasks : Sequence of str
        The tasks the server scores (rows of the accuracy table, in this order).

    Returns
    -------
    str
        YAML header and Markdown body; ``ModelCard(text)`` parses it (checked here).
    """
    config = _Settings(summary.get("run-config", {}))
    rounds = [entry for entry in history if int(entry.get("server-round", 0)) > 0]
    model = config.get("model")
    data = ModelCardData(
        base_model=DEFAULT_BASE_MODEL if not model else str(model),
        library_name="peft",
        license=DEFAULT_LICENSE if not model else "other",
        tags=_tags(config),
    )
    what = "final adapter" if server_round is None else f"checkpoint after round {server_round}"
    sections = [
        f"# Federated LoRA adapter ({config.get('merge-method')}), {what}",
        _intro(config, rounds, server_round),
        _settings_section("Merge", config, MERGE_KEYS),
        _settings_section("Training and data", config, TRAINING_KEYS + DATA_KEYS),
        _rounds_section(rounds),
        _accuracy_section(history, seen_tasks, unseen_tasks),
        _privacy_section(config, rounds),
        _robust_section(config, rounds, summary.get(DEFENCE_KEY)),
        _audit_section(audit_head),
        _usage_section(),
    ]
    text = f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(s for s in sections if s) + "\n"
    ModelCard(text)  # parses the YAML header back; raises on a malformed card
    return text


class _Settings:
    """Run-config values as the apps read them: absent keys at the schema's default."""

    def __init__(self, run_config: Mapping[str, Any]) -> None:
        self.run_config = run_config

    def get(self, key: str) -> Any:
        if key in self.run_config:
            return self.run_config[key]
        setting = SCHEMA.get(key)
        return setting.default if setting is not None else None


def _tags(config: _Settings) -> list[str]:
    tags = ["lora", "peft", "federated-learning", "flower", "robustmerge-fl"]
    tags.append(str(config.get("merge-method")))
    tags.append(str(config.get("task")))
    if config.get("dp") != "none":
        tags.append("differential-privacy")
    if config.get("secure-aggregation"):
        tags.append("secure-aggregation")
    return list(dict.fromkeys(tags))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value) if value != "" else '""'
    return text.replace("|", "\\|")


def _percent(value: Any) -> str:
    return f"{100 * float(value):.1f} %" if isinstance(value, int | float) else "-"


def _intro(config: _Settings, rounds: Sequence[Mapping[str, Any]], server_round: int | None) -> str:
    total = config.get("num-server-rounds")
    done = server_round if server_round is not None else len(rounds)
    return (
        f"A LoRA adapter trained with federated learning ([Flower](https://flower.ai), the "
        f"robustmerge-fl app): {done} of {total} server rounds, each merging the sites' LoRA "
        f"updates with `{config.get('merge-method')}`. Only LoRA tensors left the sites. It "
        "loads with `PeftModel.from_pretrained` (see *How to load*)."
    )


def _settings_table(config: _Settings, keys: Sequence[str]) -> list[str]:
    rows = [f"| `{key}` | {_cell(config.get(key))} |" for key in keys if key in SCHEMA]
    return ["| run-config key | value |", "| --- | --- |", *rows]


def _settings_section(title: str, config: _Settings, keys: Sequence[str]) -> str:
    return "\n".join([f"## {title}", "", *_settings_table(config, keys)])


def _rejected(entry: Mapping[str, Any]) -> int:
    train = entry.get("train", {})
    if "clients-rejected" in train:
        return int(train["clients-rejected"])
    return len(entry.get("merge", {}).get("rejected", {}))


def _rounds_section(rounds: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "## Rounds",
        "",
        "Sites sampled, their replies accepted into the merge, rejected and timed out, the "
        "examples the accepted sites trained on, their mean train loss, and the server-side "
        "accuracy averages after the round (the curve; the plot is `accuracy.png` in the run "
        "folder).",
        "",
        "| round | sites sampled | accepted | rejected | timed out | examples | train loss "
        "| seen accuracy | unseen accuracy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in rounds:
        train = entry.get("train", {})
        evaluation = entry.get("server-eval", {})
        merge = entry.get("merge", {})
        accepted = train.get("clients-accepted", len(merge.get("accepted-nodes", [])))
        lines.append(
            f"| {entry.get('server-round')} | {_cell(entry.get('clients-sampled'))} "
            f"| {_cell(accepted)} | {_rejected(entry)} | {_cell(entry.get('clients-timed-out'))} "
            f"| {_cell(train.get('num-examples'))} | {_cell(train.get('train-loss'))} "
            f"| {_percent(evaluation.get('seen-accuracy'))} "
            f"| {_percent(evaluation.get('unseen-accuracy'))} |"
        )
    if not rounds:
        lines.append("| - | - | - | - | - | - | - | - | - |")
    return "\n".join(lines)


def _accuracy_section(
    history: Sequence[Mapping[str, Any]], seen: Sequence[str], unseen: Sequence[str]
) -> str:
    scored = [entry for entry in history if entry.get("server-eval")]
    if not scored:
        return "## Accuracy per task\n\nNo server-side evaluation in this run (`server-eval`)."
    first, last = scored[0], scored[-1]
    first_eval, last_eval = first["server-eval"], last["server-eval"]
    tasks = [(task, "seen") for task in seen] + [(task, "unseen") for task in unseen]
    if not tasks:  # the kind plots nothing per task: show every accuracy the evaluation has
        tasks = [
            (key.removesuffix("-accuracy"), "")
            for key in last_eval
            if key.endswith("-accuracy") and key not in ("seen-accuracy", "unseen-accuracy")
        ]
    lines = [
        "## Accuracy per task",
        "",
        "Server-side accuracy of the global adapter on each task's test examples, at round "
        f"{first['server-round']} (0 = the initial adapter) and round {last['server-round']}.",
        "",
        f"| task | seen / unseen | round {first['server-round']} | round {last['server-round']} |",
        "| --- | --- | --- | --- |",
    ]
    for task, group in tasks:
        key = f"{task}-accuracy"
        lines.append(
            f"| {task} | {group or '-'} | {_percent(first_eval.get(key))} "
            f"| {_percent(last_eval.get(key))} |"
        )
    for group in ("seen", "unseen"):
        key = f"{group}-accuracy"
        if key in last_eval:
            label = f"**{group} average**"
            lines.append(
                f"| {label} | | {_percent(first_eval.get(key))} | {_percent(last_eval.get(key))} |"
            )
    return "\n".join(lines)


def _privacy_section(config: _Settings, rounds: Sequence[Mapping[str, Any]]) -> str:
    epsilon = None
    for entry in rounds:
        epsilon = entry.get("train", {}).get("dp-epsilon", epsilon)
    lines = ["## Privacy", ""]
    if config.get("dp") == "none":
        lines.append('Differential privacy: off (`dp = "none"`).')
    else:
        reported = (
            f"epsilon {epsilon:.4g} at delta {_cell(config.get('dp-delta'))} after the rounds above"
            if isinstance(epsilon, int | float)
            else "no epsilon reported (no noise, or no adapter released yet)"
        )
        lines.append(f"Differential privacy: `{config.get('dp')}`, {reported}.")
    if config.get("secure-aggregation"):
        lines.append(
            "Secure aggregation: on (Flower's SecAgg+); the server saw only sums of the sites' "
            "merge terms."
        )
    else:
        lines.append("Secure aggregation: off.")
    secagg = SECAGG_KEYS if config.get("secure-aggregation") else ()
    return "\n".join([*lines, "", *_settings_table(config, (*PRIVACY_KEYS, *secagg))])


def _robust_section(
    config: _Settings, rounds: Sequence[Mapping[str, Any]], defence: str | None
) -> str:
    rejected = sum(_rejected(entry) for entry in rounds)
    counts = dict.fromkeys(("screened", "clipped", "krum-dropped"), 0)
    for entry in rounds:
        robust = entry.get("merge", {}).get("robust") or {}
        for name in counts:
            counts[name] += len(robust.get(name) or [])
    lines = [
        "## Robustness",
        "",
        f"Replies rejected over the rounds above: {rejected} (of them screened out by the "
        f"update-norm bound: {counts['screened']}); replies clipped to the bound: "
        f"{counts['clipped']}; left out by Krum: {counts['krum-dropped']}.",
    ]
    if defence is not None:
        lines += ["", f"The defence that ran: {defence}."]
    return "\n".join([*lines, "", *_settings_table(config, ROBUST_KEYS)])


def _audit_section(audit_head: str | None) -> str:
    head = f"`{audit_head}`" if audit_head else "not recorded"
    return (
        "## Audit\n\n"
        f"Head digest of the run's audit chain (`audit.jsonl`) when this adapter was written: "
        f"{head}. `robustmerge-fl audit verify RUN_DIR` checks the chain, the checkpoints and "
        "`final/` against it, and prints the head hash."
    )


def _usage_section() -> str:
    return (
        "## How to load\n\n"
        "```python\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModel\n\n"
        'base = AutoModel.from_pretrained("<base model>")\n'
        'model = PeftModel.from_pretrained(base, "<this folder>")\n'
        "```"
    )
