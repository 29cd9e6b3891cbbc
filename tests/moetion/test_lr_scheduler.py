"""torch LR schedulers: built and refused clearly, their state captured as JSON and restored exactly."""
import math

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, OneCycleLR, ReduceLROnPlateau, SequentialLR

from moetion import ConfigError, LRScheduleConfig
from moetion.lr_scheduler import build_lr_scheduler, restore_scheduler, scheduler_state, step_lr_scheduler


def warmup_cosine(opt):
    return SequentialLR(opt, [LambdaLR(opt, lambda t: (t + 1) / 3), CosineAnnealingLR(opt, T_max=8, eta_min=1e-4)],
                        milestones=[3])


def one_cycle(opt):
    return OneCycleLR(opt, max_lr=0.05, total_steps=12)


def plateau(opt):
    return ReduceLROnPlateau(opt, patience=1, factor=0.5)


def optimizer(kind="adamw"):
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    if kind == "sgd":
        return torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr": 0.02}], lr=0.01, momentum=0.9)
    return torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "lr": 0.02}], lr=0.01)


def hyper(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


LOSSES = [3.0, 2.0, 2.5, 2.6, 2.7, 1.0, 1.1, 1.2, 1.3, 0.9, 0.8, 0.85]


@pytest.mark.parametrize("factory", [warmup_cosine, one_cycle, plateau])
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_a_restored_scheduler_continues_bit_for_bit(factory, kind):
    straight_opt = optimizer(kind)
    straight = build_lr_scheduler(factory, straight_opt, LRScheduleConfig())
    for loss in LOSSES[:5]:
        straight_opt.step()
        step_lr_scheduler(straight, loss)
    captured = scheduler_state(straight)
    restored_opt = optimizer(kind)
    restored = build_lr_scheduler(factory, restored_opt, LRScheduleConfig())
    restore_scheduler(restored, captured)
    assert hyper(restored_opt) == hyper(straight_opt)
    for loss in LOSSES[5:]:
        straight_opt.step()
        restored_opt.step()
        step_lr_scheduler(straight, loss)
        step_lr_scheduler(restored, loss)
        assert hyper(restored_opt) == hyper(straight_opt)
    assert scheduler_state(restored) == scheduler_state(straight)


def test_plateau_reads_the_loss():
    opt = optimizer()
    scheduler = build_lr_scheduler(plateau, opt, LRScheduleConfig())
    for loss in [1.0, 2.0, 2.0, 2.0]:
        step_lr_scheduler(scheduler, loss)
    assert math.isclose(opt.param_groups[0]["lr"], 0.005)
    assert scheduler_state(scheduler)["scheduler"]["mode_worse"] == math.inf


def test_a_scheduler_of_another_optimizer_is_refused():
    with pytest.raises(ConfigError, match="built for a different optimizer"):
        build_lr_scheduler(one_cycle(optimizer()), optimizer(), LRScheduleConfig())


def test_scheduler_and_lr_schedule_config_together_are_refused():
    with pytest.raises(ConfigError, match="both lr_scheduler and the lr_schedule config"):
        build_lr_scheduler(one_cycle, optimizer(), LRScheduleConfig(warmup_iterations=2))
    with pytest.raises(ConfigError, match="must be a torch.optim.lr_scheduler.LRScheduler"):
        build_lr_scheduler(lambda opt: "cosine", optimizer(), LRScheduleConfig())


def test_replay_needs_a_scheduler_exactly_when_the_run_had_one():
    from types import SimpleNamespace

    from moetion.lr_scheduler import SchedulerStateError, restore_from_window

    opt = optimizer()
    scheduler = build_lr_scheduler(one_cycle, opt, LRScheduleConfig())
    with_state = SimpleNamespace(manifest=SimpleNamespace(start_iteration=4, stage=1,
                                                          extra={"lr_scheduler": scheduler_state(scheduler)}))
    without = SimpleNamespace(manifest=SimpleNamespace(start_iteration=4, stage=1, extra={}))
    with pytest.raises(SchedulerStateError, match="window 4 of stage 1 was trained with an lr_scheduler"):
        restore_from_window(None, with_state)
    with pytest.raises(SchedulerStateError, match="holds no lr_scheduler state"):
        restore_from_window(scheduler, without)
    restore_from_window(None, without)
