"""Attack benchmark: what one or two hostile sites do to the global adapter, under each defence.

    python -m benchmarks.attacks [--quick] [--setups 1-of-4,2-of-8] [--out-dir benchmarks/results]

For each setup (1 of 4 clients malicious; 2 of 8, every seen task split over two clients), each
attack and each defence (run-config ``robust-aggregation``: none, norm (the default), krum,
trimmed-mean, median), R federated rounds of the real client training and the real
``FedRobustMerge`` run in-process (``benchmarks.quality.run_federated``), and the final seen and
unseen test accuracy is recorded beside the same defence's no-attack run. Every finished run is
saved at once (``attacks[-quick].json``), so an interrupted benchmark resumes where it stopped;
the table (``attacks[-quick].md``) is rewritten from what is saved.

Attacks (the malicious nodes are the first ones; each acts on its own honest training):

- ``scaled-x10``, ``scaled-x1000``: the update multiplied (G + k (trained - G));
- ``sign-flip``: the update reversed (G - (trained - G));
- ``noise``: Gaussian noise with the norm of the update, instead of it;
- ``free-rider``: the global sent back unchanged (no work done);
- ``label-flip``: trains on its data with the labels permuted (a fixed derangement);
- ``boosted``: model replacement aimed at its own task, the update times the number of clients,
  so that averaged with the others the global becomes its adapter.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.quality import (
    QualityConfig,
    load_workload,
    run_federated,
    summarise,
)
from strategies.robust import RobustSettings
from workload.tasks import TaskData

Adapter = dict[str, torch.Tensor]
UpdateAttack = Callable[[Adapter, Adapter, int], Adapter]

DEFENCES = ("none", "norm", "krum", "trimmed-mean", "median")
SEEN = ("banking77", "stackoverflow", "sentiment", "hwu64")
UNSEEN = ("clinc150", "mcid")


def scaled(factor: float) -> UpdateAttack:
    """G + factor (trained - G): a boosted copy of the node's honest update."""

    def attack(start: Adapter, trained: Adapter, clients: int) -> Adapter:
        return {k: start[k] + factor * (trained[k] - start[k]) for k in start}

    return attack


def sign_flip(start: Adapter, trained: Adapter, clients: int) -> Adapter:
    """G - (trained - G): the honest update reversed."""
    return {k: 2.0 * start[k] - trained[k] for k in start}


def noise(start: Adapter, trained: Adapter, clients: int) -> Adapter:
    """Gaussian noise with the norm of the honest update (all tensors together), seeded."""
    generator = torch.Generator().manual_seed(1234)
    drawn = {k: torch.randn(v.shape, generator=generator) for k, v in start.items()}
    wanted = sum(float((trained[k] - start[k]).square().sum()) for k in start) ** 0.5
    scale = wanted / max(sum(float(v.square().sum()) for v in drawn.values()) ** 0.5, 1e-30)
    return {k: start[k] + scale * drawn[k] for k in start}


def free_rider(start: Adapter, trained: Adapter, clients: int) -> Adapter:
    """The global sent back unchanged."""
    return {k: v.clone() for k, v in start.items()}


def boosted(start: Adapter, trained: Adapter, clients: int) -> Adapter:
    """Model replacement: the update times the number of clients, so the mean becomes it."""
    return scaled(float(clients))(start, trained, clients)


def flip_labels(data: TaskData) -> TaskData:
    """The same texts with every label moved to the next class (a derangement of the classes)."""
    count = len(data.label_names)
    return replace(data, labels=[(label + 1) % count for label in data.labels])


@dataclass(frozen=True)
class Attack:
    """One attack: it changes a malicious node's training data, its reply, or both."""

    name: str
    update: UpdateAttack | None = None
    poison_data: Callable[[TaskData], TaskData] | None = None


ATTACKS: dict[str, Attack] = {
    attack.name: attack
    for attack in (
        Attack("none"),
        Attack("scaled-x10", update=scaled(10.0)),
        Attack("scaled-x1000", update=scaled(1000.0)),
        Attack("sign-flip", update=sign_flip),
        Attack("noise", update=noise),
        Attack("free-rider", update=free_rider),
        Attack("label-flip", poison_data=flip_labels),
        Attack("boosted", update=boosted),
    )
}


@dataclass(frozen=True)
class Setup:
    """A federation: each node's task, and how many of the first nodes are malicious."""

    name: str
    client_tasks: tuple[str, ...]
    malicious: int


SETUPS = {
    "1-of-4": Setup("1-of-4", SEEN, 1),
    "2-of-8": Setup("2-of-8", SEEN + SEEN, 2),
}


def robust_settings(defence: str, setup: Setup) -> RobustSettings:
    """The run-config robust options of a defence (Krum told how many nodes may be hostile)."""
    return RobustSettings(aggregation=defence, krum_malicious=max(1, setup.malicious))


def hooks(
    attack: Attack, setup: Setup
) -> tuple[
    Callable[[int, TaskData], TaskData] | None, Callable[[int, Adapter, Adapter], Adapter] | None
]:
    """``run_federated``'s data and reply hooks for the setup's malicious nodes."""
    hostile = set(range(1, setup.malicious + 1))
    clients = len(setup.client_tasks)
    data_hook = None
    reply_hook = None
    if attack.poison_data is not None:
        poison = attack.poison_data

        def data_hook(node: int, data: TaskData) -> TaskData:
            return poison(data) if node in hostile else data

    if attack.update is not None:
        update = attack.update

        def reply_hook(node: int, start: Adapter, trained: Adapter) -> Adapter:
            return update(start, trained, clients) if node in hostile else trained

    return data_hook, reply_hook


CONFIG = QualityConfig(
    seen=SEEN,
    unseen=UNSEEN,
    seeds=(0,),
    train_examples=128,
    eval_examples=96,
    rounds=3,
    tag="attacks",
)
QUICK = replace(CONFIG, unseen=("mcid",), train_examples=32, eval_examples=24, rounds=2)


def run(
    config: QualityConfig,
    setups: list[str],
    attacks: list[str],
    defences: list[str],
    out: Path,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every (setup, attack, defence) not yet in ``out``'s JSON; saves after each run."""
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault("runs", {})
    results["config"] = {
        "train-examples": config.train_examples,
        "eval-examples": config.eval_examples,
        "rounds": config.rounds,
        "seen": list(config.seen),
        "unseen": list(config.unseen),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
    }
    work = load_workload(config)
    for setup_name in setups:
        setup = SETUPS[setup_name]
        for defence in defences:
            for attack_name in attacks:
                key = f"{setup_name}/{attack_name}/{defence}"
                if key in results["runs"]:
                    continue
                began = time.perf_counter()
                data_hook, reply_hook = hooks(ATTACKS[attack_name], setup)
                history = run_federated(
                    work,
                    method="robustmerge",
                    seed=0,
                    rounds=config.rounds,
                    fuse_weight=2.0,
                    server_lr=1.0,
                    split="test",
                    log=log,
                    client_tasks=setup.client_tasks,
                    strategy_options={"robust": robust_settings(defence, setup)},
                    data_hook=data_hook,
                    reply_hook=reply_hook,
                )
                final = summarise(history[-1], config)
                results["runs"][key] = {
                    "seen": final.get("seen-avg"),
                    "unseen": final.get("unseen-avg"),
                    "seconds": time.perf_counter() - began,
                }
                results["updated"] = datetime.datetime.now(datetime.UTC).isoformat()
                out.write_text(json.dumps(results, indent=1))
                log(f"{key}: {results['runs'][key]}")
    return results


def table(results: Mapping[str, Any]) -> str:
    """Markdown: per setup, attack rows x defence columns, seen / unseen accuracy (%) and the
    seen difference to that defence's no-attack run."""
    runs = results.get("runs", {})
    lines = []
    for setup in SETUPS:
        present = [k for k in runs if k.startswith(setup + "/")]
        if not present:
            continue
        lines += [f"### {setup}", "", "| attack | " + " | ".join(DEFENCES) + " |"]
        lines.append("|---" * (len(DEFENCES) + 1) + "|")
        for attack in ATTACKS:
            cells = []
            for defence in DEFENCES:
                row = runs.get(f"{setup}/{attack}/{defence}")
                clean = runs.get(f"{setup}/none/{defence}")
                if row is None:
                    cells.append("")
                    continue
                text = f"{100 * row['seen']:.1f} / {100 * (row['unseen'] or 0):.1f}"
                if clean is not None and attack != "none":
                    text += f" ({100 * (row['seen'] - clean['seen']):+.1f})"
                cells.append(text)
            lines.append(f"| {attack} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


TOLERANCE = 0.02  # the bar: within 2 seen points of the no-attack run


def _points(change: float) -> str:
    """A change in accuracy as signed points, one decimal (no "-0.0")."""
    return f"{round(100 * change, 1) + 0.0:+.1f}"


def verdicts(results: Mapping[str, Any], tolerance: float = TOLERANCE) -> str:
    """Markdown: per setup and defence, what it costs with nobody attacking (seen points against
    the undefended no-attack run), its worst attack, and the attacks that take the seen accuracy
    more than ``tolerance`` below the undefended no-attack run."""
    runs = results.get("runs", {})
    lines: list[str] = []
    for setup in SETUPS:
        base = runs.get(f"{setup}/none/none")
        if base is None:
            continue
        lines += [
            f"### {setup}: against the undefended no-attack run ({100 * base['seen']:.1f} seen)",
            "",
            "| defence | cost with no attacker | worst attack | attacks beyond "
            f"{100 * tolerance:.0f} points |",
            "|---|---|---|---|",
        ]
        for defence in DEFENCES:
            clean = runs.get(f"{setup}/none/{defence}")
            drops = {
                attack: base["seen"] - row["seen"]
                for attack in ATTACKS
                if attack != "none" and (row := runs.get(f"{setup}/{attack}/{defence}"))
            }
            if clean is None or not drops:
                continue
            worst = max(drops, key=lambda attack: drops[attack])
            beyond = [f"{a} ({_points(-d)})" for a, d in drops.items() if d > tolerance]
            missing = len(ATTACKS) - 1 - len(drops)
            lines.append(
                f"| {defence} | {_points(clean['seen'] - base['seen'])} | {worst} "
                f"({_points(-drops[worst])}) | {', '.join(beyond) or 'none'}"
                f"{f' ({missing} attacks not run)' if missing else ''} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run what is missing, then rewrite the results table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--defences", default=",".join(DEFENCES))
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    config = QUICK if args.quick else CONFIG
    stem = "attacks-quick" if args.quick else "attacks"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"{stem}.json"
    results = run(
        config,
        [s for s in args.setups.split(",") if s],
        [a for a in args.attacks.split(",") if a],
        [d for d in args.defences.split(",") if d],
        out,
    )
    (args.out_dir / f"{stem}.md").write_text(
        "# Attack benchmark\n\nFinal seen / unseen test accuracy (%) after "
        f"{config.rounds} rounds; in brackets the seen change against the same defence without "
        "an attack. Sizes and machine: see the JSON beside this file.\n\n"
        + table(results)
        + "\n## Verdicts\n\n"
        + verdicts(results)
    )


if __name__ == "__main__":
    main()
