"""Seeded random fault campaigns: the draw (pure) and a short soak of the built-in model."""
import pytest

from moetion.demo import DemoSettings
from moetion.errors import ConfigError
from moetion.harness.campaign import MIN_GAP, WINDOW_END_PHASES, CampaignShape, draw_kills
from moetion.harness.runner import FaultHarness, Job

SHAPE = CampaignShape(stages=4, replicas=2, iterations=40, window=3)


@pytest.mark.parametrize("seed", range(20))
def test_a_draw_is_reproducible_and_every_kill_can_fire(seed):
    kills = draw_kills(SHAPE, count=8, seed=seed)
    assert kills == draw_kills(SHAPE, count=8, seed=seed)
    iterations = [k.iteration for k in kills]
    assert all(b - a >= MIN_GAP for a, b in zip(iterations, iterations[1:])) and iterations[0] >= 1
    for k in kills:
        k.check_against(stages=SHAPE.stages, replicas=SHAPE.replicas, iterations=SHAPE.iterations)
        if k.phase in WINDOW_END_PHASES:  # fires only when a window ends, on a rank that owns its window
            assert k.iteration % SHAPE.window == 0
            assert not any((e.stage, e.replica) == (k.stage, k.replica) and k.iteration - SHAPE.window < e.iteration < k.iteration
                           for e in kills)


def test_draws_differ_between_seeds_and_cover_the_phases():
    draws = [draw_kills(SHAPE, count=8, seed=s) for s in range(30)]
    assert len({tuple(k.to_text() for k in d) for d in draws}) == 30
    assert {k.phase for d in draws for k in d} == {"forward", "backward", "step", "capture", "replication"}


def test_without_a_pinned_window_only_phases_of_any_iteration_are_drawn():
    kills = [k for s in range(30) for k in draw_kills(CampaignShape(3, 1, 30), count=6, seed=s)]
    assert {k.phase for k in kills} == {"forward", "backward", "step"}


def test_too_many_kills_for_the_run_is_a_clear_error():
    with pytest.raises(ConfigError, match="no room for 8 kills"):
        draw_kills(CampaignShape(2, 1, 12), count=8, seed=0)


@pytest.mark.slow
def test_three_seeded_campaigns_end_bit_identical(tmp_path):
    """The soak test's fast version (experiments/fault_campaign.py runs the long one)."""
    shape = CampaignShape(stages=4, replicas=1, iterations=16, window=3)
    settings = DemoSettings(iterations=16, window=3, progress=False, lr=1e-2, micro_batch_size=2, micro_batches=2)
    with FaultHarness(Job(demo=settings), work_dir=tmp_path, timeout_s=400) as harness:
        for seed in range(3):
            kills = draw_kills(shape, count=4, seed=seed)
            report = harness.run(kills)  # raises KillNeverFired if a drawn kill did not fire
            assert report.verdict.identical, f"seed {seed}: " + "\n".join(report.lines())
            assert len([t for t in report.timelines if not t.superseded]) >= len(kills)
