"""The 1F1B schedule, read as data: all stages simulated together never deadlock and run every
forward and backward exactly once, in micro-batch order."""
from collections import defaultdict, deque

import pytest

from moetion import schedule as s


def simulate(num_stages: int, micro_batches: int,
             stage_schedule: s.StageSchedule = s.StageSchedule()) -> dict[int, list[s.Instruction]]:
    """Runs every stage's stream with non-blocking sends and blocking receives; returns the
    executed streams. Fails on deadlock or on a message that arrives for the wrong micro-batch."""
    streams = {st: deque(stage_schedule.instructions(stage=st, num_stages=num_stages, micro_batches=micro_batches))
               for st in range(num_stages)}
    channels: dict[tuple[int, int, str], deque[int]] = defaultdict(deque)
    executed = {st: [] for st in range(num_stages)}
    while any(streams.values()):
        progressed = False
        for st, stream in streams.items():
            while stream:
                ins = stream[0]
                if isinstance(ins, s.RecvActivation):
                    channel = channels[(st - 1, st, "act")]
                elif isinstance(ins, s.RecvGrad):
                    channel = channels[(st + 1, st, "grad")]
                else:
                    channel = None
                if channel is not None:
                    if not channel:
                        break  # blocked on a receive
                    assert channel.popleft() == ins.micro_batch, f"stage {st} got a message out of order"
                if isinstance(ins, s.SendActivation):
                    channels[(st, st + 1, "act")].append(ins.micro_batch)
                if isinstance(ins, s.SendGrad):
                    channels[(st, st - 1, "grad")].append(ins.micro_batch)
                executed[st].append(stream.popleft())
                progressed = True
        assert progressed, f"deadlock with {num_stages} stages, {micro_batches} micro-batches"
    assert not any(channels.values()), "messages left unconsumed"
    return executed


TORCH_GPIPE = s.StageSchedule(s.Order.FILL_DRAIN, s.LossScaling.GRADS)
TORCH_1F1B = s.StageSchedule(s.Order.ONE_F_ONE_B, s.LossScaling.GRADS)


@pytest.mark.parametrize("stage_schedule", [s.StageSchedule(), TORCH_GPIPE, TORCH_1F1B], ids=["moetion", "gpipe", "1f1b"])
@pytest.mark.parametrize("num_stages", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("micro_batches", [1, 2, 3, 4, 7, 16])
def test_all_stages_finish_and_run_each_pass_once_in_order(num_stages, micro_batches, stage_schedule):
    executed = simulate(num_stages, micro_batches, stage_schedule)
    for stage, stream in executed.items():
        forwards = [i.micro_batch for i in stream if isinstance(i, s.ForwardPass)]
        backwards = [i.micro_batch for i in stream if isinstance(i, s.BackwardPass)]
        assert forwards == list(range(micro_batches))
        assert backwards == list(range(micro_batches)), "gradients must accumulate in micro-batch order"
        for m in range(micro_batches):
            assert stream.index(s.ForwardPass(m)) < stream.index(s.BackwardPass(m))
        assert [type(i) for i in stream[-4:]] == [s.WaitSends, s.ReduceTiedGrads, s.ReduceGrads, s.OptimizerStep]
        assert not any(isinstance(i, (s.SendActivation, s.SendGrad)) for i in stream[stream.index(s.WaitSends()):])


def test_1f1b_bounds_in_flight_micro_batches():
    """Stage s holds at most (num_stages - s) micro-batches between forward and backward."""
    num_stages, micro_batches = 4, 8
    for stage, stream in simulate(num_stages, micro_batches).items():
        in_flight = peak = 0
        for ins in stream:
            in_flight += isinstance(ins, s.ForwardPass) - isinstance(ins, s.BackwardPass)
            peak = max(peak, in_flight)
        assert peak == min(num_stages - stage, micro_batches)


def test_first_and_last_stage_load_data_and_middle_stages_do_not():
    streams = {st: list(s.train_schedule(stage=st, num_stages=3, micro_batches=2)) for st in range(3)}
    loads = {st: [i for i in stream if isinstance(i, s.LoadMicroBatch)] for st, stream in streams.items()}
    assert len(loads[0]) == 2 and len(loads[2]) == 2 and loads[1] == []
    assert not any(isinstance(i, (s.RecvActivation, s.SendGrad)) for i in streams[0])
    assert not any(isinstance(i, (s.SendActivation, s.RecvGrad)) for i in streams[2])


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="micro_batches"):
        list(s.train_schedule(stage=0, num_stages=2, micro_batches=0))
    with pytest.raises(ValueError, match="stage 2"):
        list(s.train_schedule(stage=2, num_stages=2, micro_batches=1))


def test_fill_drain_runs_every_forward_before_any_backward():
    for stream in simulate(3, 4, TORCH_GPIPE).values():
        passes = [type(i) for i in stream if isinstance(i, (s.ForwardPass, s.BackwardPass))]
        assert passes == [s.ForwardPass] * 4 + [s.BackwardPass] * 4


def test_torch_pipelining_divides_gradients_once_after_the_last_backward():
    """torch's scale_grads: the loss is not scaled; the summed gradients are divided once, before the commit."""
    for stage_schedule in (TORCH_GPIPE, TORCH_1F1B):
        for stream in simulate(3, 4, stage_schedule).values():
            divides = [n for n, i in enumerate(stream) if isinstance(i, s.DivideGrads)]
            last_backward = max(n for n, i in enumerate(stream) if isinstance(i, s.BackwardPass))
            assert len(divides) == 1 and last_backward < divides[0] < stream.index(s.WaitSends())
    no_scaling = s.StageSchedule(s.Order.ONE_F_ONE_B, s.LossScaling.NONE)
    assert not any(isinstance(i, s.DivideGrads) for i in no_scaling.instructions(stage=0, num_stages=2, micro_batches=2))
