"""Attack benchmark: what one or two hostile sites do to the global adapter, under each defence.

    python -m benchmarks.attacks [--quick] [--setups 1-of-4,2-of-8] [--out-dir benchmarks/results]

For each setup (1 of 4 clients malicious; 2 of 8, every seen task split over two clients), each
attack and each defence (run-config ``robust-aggregation``: none, norm (the default until
"auto"), krum, trimmed-mean, median), R federated rounds of the real client training and the real
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

These attacks ignore the defence. The adaptive attacks (``ADAPTIVE_ATTACKS``, issue 28) know it:
their math is ``benchmarks.adaptive_attacks``; ``AttackHooks`` runs them (and the attacks above)
in ``run_federated`` with the hostile sites as the *last* nodes, so that each round they see
every honest update before they reply (the omniscient model), and tracks the norm screen's
history as the server does, so that "just under the bound" is exact (checked against the
server's bound every round). Their benchmark is ``benchmarks.adaptive_attacks_run``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks import adaptive_attacks as math_
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


# ----------------------------------------------------------------------------- adaptive attacks


@dataclass(frozen=True)
class RoundView:
    """What an omniscient hostile site knows when it replies: the honest updates of the round
    (``honest``, n_h x d, flattened in the global's key order), its own honest update (``own``,
    d), the federation's size and hostile count, and the bound the norm screen will hold this
    round's updates to (None: no bound)."""

    honest: torch.Tensor
    own: torch.Tensor
    clients: int
    hostile: int
    bound: float | None


Recipe = Callable[[RoundView], torch.Tensor]


def _under(view: RoundView, direction: torch.Tensor) -> torch.Tensor:
    if view.bound is None:
        return direction
    return math_.scale_to(direction, math_.UNDER * view.bound)


def under_bound(view: RoundView) -> torch.Tensor:
    """Its own update, scaled to just under the screen's bound."""
    return _under(view, view.own)


def under_bound_reversed(view: RoundView) -> torch.Tensor:
    """Its own update reversed, scaled to just under the screen's bound (the attack that took
    the default from 72.9 % to 12.5 % seen on 2026-12-06)."""
    return _under(view, -view.own)


def alie_recipe(view: RoundView) -> torch.Tensor:
    """ALIE with the paper's z for this federation."""
    return math_.alie(view.honest, math_.alie_z(view.clients, view.hostile))


def ipm_recipe(epsilon: float) -> Recipe:
    """IPM with ``epsilon``."""

    def recipe(view: RoundView) -> torch.Tensor:
        return math_.ipm(view.honest, epsilon)

    return recipe


def min_max_recipe(kind: str) -> Recipe:
    """Min-max with perturbation ``kind``."""

    def recipe(view: RoundView) -> torch.Tensor:
        return math_.min_max(view.honest, kind)

    return recipe


def min_sum_recipe(kind: str) -> Recipe:
    """Min-sum with perturbation ``kind``."""

    def recipe(view: RoundView) -> torch.Tensor:
        return math_.min_sum(view.honest, kind)

    return recipe


@dataclass(frozen=True)
class AdaptiveAttack:
    """An attack that knows the defence: ``recipe`` crafts the malicious update from the round's
    view (``AttackHooks`` then scales it down to just under the screen's bound where it is
    longer); ``omniscient``: it uses only the honest updates, so the hostile site's own training
    is cut to one example (it is not used)."""

    name: str
    recipe: Recipe
    omniscient: bool = True


ADAPTIVE_ATTACKS: dict[str, AdaptiveAttack] = {
    attack.name: attack
    for attack in (
        AdaptiveAttack("under-bound", under_bound, omniscient=False),
        AdaptiveAttack("under-bound-reversed", under_bound_reversed, omniscient=False),
        AdaptiveAttack("alie", alie_recipe),
        AdaptiveAttack("ipm-0.1", ipm_recipe(0.1)),
        AdaptiveAttack("ipm-10", ipm_recipe(10.0)),
        AdaptiveAttack("min-max", min_max_recipe("unit-mean")),
        AdaptiveAttack("min-max-std", min_max_recipe("std")),
        AdaptiveAttack("min-sum", min_sum_recipe("unit-mean")),
        AdaptiveAttack("min-sum-std", min_sum_recipe("std")),
    )
}
# Every attack the adaptive benchmark runs: no attack, today's, the adaptive ones.
ALL_ATTACKS = (*ATTACKS, *ADAPTIVE_ATTACKS)
# The candidate defences beside the run-config options: "norm-clip-2" is the norm screen with
# robust-norm-factor 2 and robust-clip true (clip to 2 x the median norm instead of rejecting
# at 10 x); "centered-clip" is strategies.robust.centered_clip.
ADAPTIVE_DEFENCES = (*DEFENCES, "norm-clip-2", "centered-clip")


def defence_settings(defence: str, setup: Setup) -> RobustSettings:
    """The robust options of a defence of the adaptive benchmark."""
    if defence == "norm-clip-2":
        return RobustSettings(aggregation="norm", norm_factor=2.0, clip=True)
    return robust_settings(defence, setup)


def share_setup(seen: tuple[str, ...], copies: int, hostile: int) -> Setup:
    """``copies`` sites per seen task (each with its own data draw), ``hostile`` of them hostile:
    named "<hostile>-of-<sites>"."""
    tasks = seen * copies
    return Setup(f"{hostile}-of-{len(tasks)}", tasks, hostile)


def _one_example(data: TaskData) -> TaskData:
    return replace(data, texts=data.texts[:1], labels=data.labels[:1])


@dataclass
class AttackHooks:
    """``run_federated``'s data, reply and round hooks for one attack (today's or adaptive) by
    the setup's last ``malicious`` nodes, against ``settings``.

    Each round the honest nodes reply first (``run_federated`` trains in node order); the hooks
    keep their updates, and the first hostile node crafts the update every hostile node sends
    (its own update for the under-bound attacks). After the merge, ``round_hook`` checks that
    the bound the attackers predicted is the server's (RuntimeError otherwise: the attack would
    not be what it says), counts hostile replies the defence rejected, and adds the accepted
    norms to the attackers' copy of the screen's history as the server does.
    """

    attack: str
    setup: Setup
    settings: RobustSettings
    history: deque[float] = field(init=False)
    honest: dict[int, torch.Tensor] = field(default_factory=dict)
    norms: dict[int, float] = field(default_factory=dict)
    crafted: torch.Tensor | None = None
    predicted: float | None = None
    rounds: int = 0
    hostile_rejected: int = 0

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS and self.attack not in ADAPTIVE_ATTACKS:
            raise ValueError(f"unknown attack {self.attack!r}; known: {', '.join(ALL_ATTACKS)}")
        self.history = deque(maxlen=self.settings.history)

    @property
    def hostile_nodes(self) -> range:
        """The hostile nodes (1-based): the last ``malicious`` ones."""
        clients = len(self.setup.client_tasks)
        return range(clients - self.setup.malicious + 1, clients + 1)

    @property
    def streamed(self) -> bool:
        """Whether a round with a history is judged against the history alone (the plain
        screen, or the bound the attackers assume when there is no screen)."""
        return not (self.settings.selects or self.settings.rewrites_coordinates)

    def data_hook(self, node: int, data: TaskData) -> TaskData:
        """A hostile node's training data: poisoned (label-flip), one example (an omniscient
        attack does not use its own update), or as drawn."""
        if node not in self.hostile_nodes:
            return data
        if self.attack in ATTACKS:
            poison = ATTACKS[self.attack].poison_data
            return poison(data) if poison is not None else data
        return _one_example(data) if ADAPTIVE_ATTACKS[self.attack].omniscient else data

    def reply_hook(self, node: int, start: Adapter, trained: Adapter) -> Adapter:
        """An honest node's reply is kept and passed on; a hostile node's is crafted."""
        keys = list(start)
        if node not in self.hostile_nodes:
            delta = math_.flatten({k: trained[k] - start[k] for k in keys}, keys)
            self.honest[node] = delta
            self.norms[node] = math_.update_norm({k: trained[k] - start[k] for k in keys})
            return trained
        if self.attack in ATTACKS:
            update = ATTACKS[self.attack].update
            reply = update(start, trained, len(self.setup.client_tasks)) if update else trained
        else:
            reply = self._adaptive_reply(start, trained, keys)
        self.norms[node] = math_.update_norm({k: reply[k] - start[k] for k in keys})
        return reply

    def _adaptive_reply(self, start: Adapter, trained: Adapter, keys: list[str]) -> Adapter:
        """The crafted reply; ``predicted`` becomes the bound the server will hold the round to.

        The recipe sees the bound with the hostile norms at the top of the pool; an update longer
        than ``UNDER`` x that bound is scaled to it (so it is above the median and the bound is
        that one); a shorter one stays, and the bound is recomputed with its true norm (it may
        lower the median, never below its own norm, so it passes either way).
        """
        attack = ADAPTIVE_ATTACKS[self.attack]
        expected = len(self.setup.client_tasks) - self.setup.malicious
        if len(self.honest) != expected:
            raise RuntimeError(
                f"a hostile node replied after {len(self.honest)} of {expected} honest nodes; "
                "the omniscient attacks need the hostile nodes last in the round"
            )
        honest_norms = [self.norms[node] for node in sorted(self.honest)]
        history = list(self.history)
        factor, hostile = self.settings.norm_factor, self.setup.malicious
        if self.crafted is None or not attack.omniscient:
            top = math_.screen_bound(
                honest_norms, history, hostile, factor, self.streamed, self.settings.pool
            )
            view = RoundView(
                honest=torch.stack([self.honest[node] for node in sorted(self.honest)]),
                own=math_.flatten({k: trained[k] - start[k] for k in keys}, keys),
                clients=len(self.setup.client_tasks),
                hostile=hostile,
                bound=top,
            )
            self.crafted = math_.cap_norm(
                attack.recipe(view), top if self.settings.screens else None
            )
        delta = math_.unflatten(self.crafted, start)
        reply = {k: start[k] + delta[k] for k in keys}
        sent = math_.update_norm({k: reply[k] - start[k] for k in keys})
        self.predicted = math_.screen_bound(
            [*honest_norms, *([sent] * hostile)],
            history,
            0,
            factor,
            self.streamed,
            self.settings.pool,
        )
        return reply

    def _check_prediction(self, server_round: int, bound: float) -> None:
        """RuntimeError when the attackers' predicted bound is not the server's ``bound``."""
        if self.predicted is not None and abs(bound - self.predicted) > 1e-9 * bound:
            raise RuntimeError(
                f"round {server_round}: the attackers predicted the screen's bound "
                f"{self.predicted:.6g}, the server's is {bound:.6g}"
            )

    def round_hook(self, server_round: int, report: Any) -> None:
        """After the merge: check the predicted bound, count rejected hostile replies, extend
        the history, and forget the round."""
        bound = report.norm_bound
        if self.settings.screens and bound is not None:
            self._check_prediction(server_round, bound.bound)
        hostile = set(self.hostile_nodes)
        self.hostile_rejected += len(hostile & set(report.rejected))
        if not report.skipped:
            limit = bound.bound if bound is not None else float("inf")
            for node in report.accepted_nodes:
                norm = report.update_norms.get(node, self.norms.get(node))
                if norm is not None:
                    self.history.append(min(norm, limit))
        self.rounds += 1
        self.honest.clear()
        self.norms.clear()
        self.crafted = None
        self.predicted = None


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
