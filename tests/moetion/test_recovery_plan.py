"""The recovery plan: which tier restores a lost rank, and the clear errors when none can."""
import dataclasses

import pytest

from moetion.recovery.plan import RankStatus, RecoveryImpossible, plan_recovery
from moetion.topology import PipeTopology

PIPE4 = PipeTopology.from_world(world_size=4, num_stages=4)


def survivor(iteration=20, *, held=None, kept=10, window=(16, 4)):
    return RankStatus(iteration, False, held_start=held, window_start=window[0], window=window[1], log_kept_from=kept)


def lost(*, shm=None, disk=None):
    return RankStatus(None, True, shm_start=shm, disk_start=disk)


def test_status_round_trips_through_a_tensor():
    status = RankStatus(7, True, shm_start=3, held_start=None, window_start=4, window=2, log_kept_from=1, disk_start=0,
                        own_oldest=-1, shm_oldest=1)
    assert RankStatus.from_tensor(status.to_tensor()) == status
    done = RankStatus(9, False, finished=True)
    assert RankStatus.from_tensor(done.to_tensor()) == done


def test_own_shared_memory_first_with_logs_from_both_neighbours():
    plan = plan_recovery([survivor(), lost(shm=12), survivor(held=12), survivor()], topology=PIPE4, tied_stages={})
    assert (plan.resume, plan.window_start, plan.window) == (20, 16, 4)
    (restore,) = plan.restores
    assert (restore.rank, restore.source, restore.start, restore.log_sources) == (1, "shm", 12, (0, 2))
    assert restore.replay_from == 13


def test_peer_replica_when_shared_memory_is_gone():
    # Rank 2 receives rank 1's windows (replication goes to the next stage).
    plan = plan_recovery([survivor(), lost(), survivor(held=12), survivor()], topology=PIPE4, tied_stages={})
    assert (plan.restores[0].source, plan.restores[0].donor, plan.restores[0].start) == ("peer", 2, 12)


def test_disk_when_memory_and_replica_are_gone():
    plan = plan_recovery([survivor(kept=8), lost(disk=8), survivor(kept=8), survivor()], topology=PIPE4, tied_stages={})
    assert plan.restores[0].source == "disk"


def test_initial_state_before_any_window_completed():
    statuses = [survivor(3, kept=0, window=(1, 4)), survivor(3, kept=0, window=(1, 4)), lost(),
                survivor(3, kept=0, window=(1, 4))]
    (restore,) = plan_recovery(statuses, topology=PIPE4, tied_stages={}).restores
    assert (restore.source, restore.replay_from, restore.log_sources) == ("initial", 0, (1, 3))


def test_tied_weights_bring_the_sharing_stage_into_the_log_sources():
    statuses = [survivor(), survivor(), survivor(), lost(shm=12)]
    (restore,) = plan_recovery(statuses, topology=PIPE4, tied_stages={"embed": [0, 3]}).restores
    assert restore.log_sources == (0, 2)


def test_a_live_data_parallel_replica_is_copied_instead_of_replaying():
    topology = PipeTopology.from_world(world_size=4, num_stages=2)  # rank = stage * 2 + replica
    statuses = [survivor(), survivor(), survivor(), lost(shm=12)]
    (restore,) = plan_recovery(statuses, topology=topology, tied_stages={}).restores
    assert (restore.source, restore.donor, restore.log_sources) == ("replica", 2, ())


def test_under_expert_parallelism_only_a_replica_holding_the_same_experts_is_copied():
    topology = PipeTopology(num_stages=1, data_parallel=4, expert_parallel=2)  # experts: ranks 0, 2 | 1, 3
    statuses = [survivor(), lost(shm=12), survivor(), survivor()]
    (restore,) = plan_recovery(statuses, topology=topology, tied_stages={}).restores
    assert (restore.source, restore.donor) == ("replica", 3)


def test_an_expert_parallel_rank_without_a_live_copy_replays_with_every_replica_of_its_stage():
    topology = PipeTopology(num_stages=2, data_parallel=2, expert_parallel=2)  # rank = stage * 2 + replica
    peer = dataclasses.replace(survivor(), own_start=12)
    plan = plan_recovery([peer, lost(shm=12), survivor(), survivor()], topology=topology, tied_stages={})
    assert plan.restoring_ranks == [0, 1] and plan.replaced_ranks == [1] and plan.history_donor == 2
    survived, replaced = plan.restores
    assert (survived.source, survived.start, survived.log_sources, survived.survivor) == ("shm", 12, (2,), True)
    assert (replaced.source, replaced.start, replaced.log_sources, replaced.survivor) == ("shm", 12, (3,), False)
    assert survived.together == replaced.together == (0, 1)
    with pytest.raises(RecoveryImpossible, match=r"must replay together from a window every replica holds .*rank 0: none"):
        plan_recovery([survivor(), lost(shm=12), survivor(), survivor()], topology=topology, tied_stages={})


def test_an_expert_parallel_group_replays_from_the_oldest_window_its_members_kept_or_the_initial_state():
    topology = PipeTopology(num_stages=2, data_parallel=2, expert_parallel=2)  # rank = stage * 2 + replica
    # The survivor kept window 1 besides its newest, 4, because the lost rank (its newest: window 1,
    # still its oldest kept) had not published 4: they replay together from 1.
    peer = dataclasses.replace(survivor(kept=2), own_start=4, own_oldest=1)
    plan = plan_recovery([peer, dataclasses.replace(lost(shm=1), shm_oldest=1), survivor(kept=2), survivor(kept=2)],
                         topology=topology, tied_stages={})
    assert [(r.source, r.start) for r in plan.restores] == [("shm", 1), ("shm", 1)]
    # A replacement that replayed with its group has no window of its own yet; the lost member kept
    # the window the replacement restored from besides its newest.
    replacement = dataclasses.replace(survivor(kept=2), own_start=1, own_oldest=-1)
    plan = plan_recovery([replacement, dataclasses.replace(lost(shm=4), shm_oldest=1), survivor(kept=2),
                          survivor(kept=2)], topology=topology, tied_stages={})
    assert [(r.source, r.start) for r in plan.restores] == [("shm", 1), ("shm", 1)]
    # Before a window is common, the survivor goes back to the initial state it kept.
    early = dataclasses.replace(survivor(2, kept=0, window=(1, 3)), own_start=1, own_oldest=-1)
    plan = plan_recovery([early, lost(), survivor(2, kept=0, window=(1, 3)), survivor(2, kept=0, window=(1, 3))],
                         topology=topology, tied_stages={})
    assert [(r.source, r.start, r.survivor) for r in plan.restores] == [("initial", -1, True), ("initial", -1, False)]


def test_logs_dropped_past_the_window_rule_it_out_and_the_error_names_what_is_missing():
    statuses = [survivor(kept=16), lost(shm=12), survivor(kept=16), survivor()]
    with pytest.raises(RecoveryImpossible, match=r"rank 1 holds window 12 \(shm\), the initial state; window 12 needs "
                                                 r"logs of iterations 13\.\.19.*no window of it was persisted"):
        plan_recovery(statuses, topology=PIPE4, tied_stages={})


def test_nothing_anywhere_names_the_newest_persisted_window():
    statuses = [survivor(kept=16), lost(disk=4), survivor(kept=16), survivor()]
    with pytest.raises(RecoveryImpossible, match="starts at iteration 4"):
        plan_recovery(statuses, topology=PIPE4, tied_stages={})


def test_adjacent_stages_lost_together_replay_as_a_chain_from_a_common_window():
    statuses = [survivor(kept=4), lost(shm=12, disk=4), lost(shm=8, disk=4), survivor(kept=4)]
    first, second = plan_recovery(statuses, topology=PIPE4, tied_stages={}).restores
    # Rank 1's replica lived in rank 2, lost too; the newest start both hold is on disk.
    assert (first.source, first.start, first.chain_prev, first.chain_next) == ("disk", 4, None, 2)
    assert (second.source, second.start, second.chain_prev, second.chain_next) == ("disk", 4, 1, None)
    assert first.log_sources == second.log_sources == (0, 3)


def test_a_chain_prefers_the_fastest_tier_of_each_member_for_the_common_start():
    statuses = [survivor(kept=4), lost(shm=12), lost(), survivor(held=12, kept=4)]
    first, second = plan_recovery(statuses, topology=PIPE4, tied_stages={}).restores
    assert (first.source, second.source, second.donor, first.start) == ("shm", "peer", 3, 12)


def test_a_chain_without_a_common_window_or_logs_is_refused_naming_what_each_holds():
    statuses = [survivor(kept=10), lost(shm=12), lost(shm=8), survivor(kept=10)]
    with pytest.raises(RecoveryImpossible, match=r"rank 1 holds window 12 \(shm\), the initial state; "
                                                 r"rank 2 holds window 8 \(shm\), the initial state"):
        plan_recovery(statuses, topology=PIPE4, tied_stages={})


def test_survivors_at_different_iterations_are_refused():
    with pytest.raises(RecoveryImpossible, match="disagree on the committed iteration"):
        plan_recovery([survivor(20), lost(shm=12), survivor(21), survivor(20)], topology=PIPE4, tied_stages={})


def test_no_logging_means_no_window_replay():
    statuses = [survivor(kept=None), lost(shm=12), survivor(kept=None), survivor()]
    with pytest.raises(RecoveryImpossible, match=r"log from \{0: 'nothing \(upstream_log is off\)'"):
        plan_recovery(statuses, topology=PIPE4, tied_stages={})


def test_everyone_lost():
    with pytest.raises(RecoveryImpossible, match="every rank was lost"):
        plan_recovery([lost()] * 4, topology=PIPE4, tied_stages={})
