"""Seeded random fault campaigns: N kills over stages, replicas, iterations and phases, each drawn
where it can fire.

Which kills can fire where (``moetion.faults.PHASE_RULES``): ``forward``, ``backward`` and ``step``
fire at any iteration; ``capture`` and ``replication`` only at the last iteration of a snapshot
window, so they are drawn only when the window is pinned (then windows end at ``k * W``) and only
for a stage whose window is its own (a replacement skips the captures of the window it joined in);
``persistence`` also needs a persist directory and is not drawn; ``replay`` fires only inside a
recovery nobody can schedule, so it is not drawn either.

Kills land on distinct iterations at least two apart, so each recovery finishes before the next
kill: two replicas of one stage, or two adjacent stages, are never lost in the same iteration
(those are not recoverable online, or replay as a chain, which the hand-written cases cover).
The draw is a pure function of its arguments: a failing seed is reproduced by the ``--kill`` flags
it prints.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from moetion.errors import ConfigError
from moetion.faults import KillSpec

ANY_ITERATION_PHASES = ("forward", "backward", "step")
WINDOW_END_PHASES = ("capture", "replication")
MIN_GAP = 2  # iterations between two kills


@dataclass(frozen=True)
class CampaignShape:
    """What the draw needs to know of the job."""

    stages: int
    replicas: int
    iterations: int
    window: int | None = None  # the pinned W; None: automatic (window-end phases cannot be aimed)
    replication: bool = True


def draw_kills(shape: CampaignShape, *, count: int, seed: int) -> list[KillSpec]:
    """``count`` kills for ``shape``, the same for the same ``seed``."""
    if count < 1:
        raise ConfigError(f"--random-kills must be >= 1, got {count}")
    room = shape.iterations - 1 - MIN_GAP * (count - 1)
    if room < count:
        raise ConfigError(f"--random-kills {count}: {shape.iterations} iterations leave no room for {count} kills "
                          f"{MIN_GAP} iterations apart after iteration 0; use fewer kills or more --iterations")
    rng = random.Random(seed)
    offsets = sorted(rng.sample(range(1, room + 1), count))
    iterations = [t + MIN_GAP * i for i, t in enumerate(offsets)]
    kills: list[KillSpec] = []
    for t in iterations:
        stage, replica = rng.randrange(shape.stages), rng.randrange(shape.replicas)
        phases = list(ANY_ITERATION_PHASES)
        if _window_end(shape, t) and not _joined_this_window(kills, stage, replica, t, shape.window):
            phases += [p for p in WINDOW_END_PHASES if p != "replication" or _has_peer(shape)]
        kills.append(KillSpec(stage, t, rng.choice(phases), replica))
    return kills


def _window_end(shape: CampaignShape, iteration: int) -> bool:
    return shape.window is not None and iteration >= shape.window and iteration % shape.window == 0


def _joined_this_window(kills: list[KillSpec], stage: int, replica: int, iteration: int, window: int) -> bool:
    """Whether an earlier kill replaced this rank inside the window ending at ``iteration``."""
    return any((k.stage, k.replica) == (stage, replica) and k.iteration > iteration - window for k in kills)


def _has_peer(shape: CampaignShape) -> bool:
    return shape.replication and shape.stages * shape.replicas > 1
