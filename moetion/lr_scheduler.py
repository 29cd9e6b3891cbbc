"""A user's ``torch.optim.lr_scheduler`` object, stepped so that replay reproduces it exactly.

Design: a scheduler is a deterministic function of its state and of the loss it is stepped with
(only ``ReduceLROnPlateau`` reads the loss). So the iteration body steps it once, right after the
optimizer step of each committed iteration, with the iteration's committed loss from its
:class:`~moetion.iteration.DecisionPort`: the all-gathered loss while training, the logged loss in
replay. Nothing new is logged per iteration; instead each window records the scheduler's state (and
the optimizer's param-group hyper-parameters it drives: ``lr``, momentum, betas) as of the window's
first capture, and a replay restores that before re-running the window's iterations through the
same body. An abandoned iteration never reaches the optimizer step, so it never steps the scheduler.

State travels as JSON (no pickle): ``state_dict()`` of torch's schedulers holds numbers, strings,
lists and nested dicts (lambdas appear as ``None`` and are rebuilt by the user's own code).
"""
from __future__ import annotations

import json
from typing import Any, Callable, Union

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from moetion.config import LRScheduleConfig
from moetion.errors import ConfigError, MoetionError
from moetion.snapshot.image import WindowImage

SchedulerSpec = Union[LRScheduler, Callable[[torch.optim.Optimizer], LRScheduler]]
STATE_KEY = "lr_scheduler"  # the key of the scheduler's state in a window manifest's ``extra``


class SchedulerStateError(MoetionError):
    """A scheduler's state cannot be captured or restored."""


def build_lr_scheduler(spec: SchedulerSpec | None, optimizer: torch.optim.Optimizer,
                       lr_schedule: LRScheduleConfig) -> LRScheduler | None:
    """The scheduler for ``optimizer``: ``spec`` itself, or ``spec(optimizer)`` for a factory."""
    if spec is None:
        return None
    if lr_schedule != LRScheduleConfig():
        raise ConfigError("both lr_scheduler and the lr_schedule config set the learning rate: "
                          "drop the lr_schedule config key or the lr_scheduler argument")
    scheduler = spec if isinstance(spec, LRScheduler) else spec(optimizer)
    if not isinstance(scheduler, LRScheduler):
        raise ConfigError(f"lr_scheduler must be a torch.optim.lr_scheduler.LRScheduler or a callable "
                          f"building one from the optimizer; got {type(scheduler).__name__}")
    if scheduler.optimizer is not optimizer:
        raise ConfigError("the lr_scheduler was built for a different optimizer than the engine's: pass a "
                          "factory (lr_scheduler=lambda opt: ...) or build it on the optimizer you pass")
    scheduler_state(scheduler)  # fail now, not at the first capture, if its state is not JSON
    return scheduler


def step_lr_scheduler(scheduler: LRScheduler, loss: float) -> None:
    """One scheduler step after the optimizer step of a committed iteration whose mean loss was ``loss``."""
    if isinstance(scheduler, ReduceLROnPlateau):
        scheduler.step(loss)
    else:
        scheduler.step()


def scheduler_state(scheduler: LRScheduler) -> dict[str, Any]:
    """The scheduler's state and the param-group hyper-parameters, as JSON-safe values."""
    groups = [{k: v for k, v in group.items() if k != "params" and _is_plain(v)}
              for group in scheduler.optimizer.param_groups]
    state = {"scheduler": scheduler.state_dict(), "param_groups": groups}
    try:
        return json.loads(json.dumps(state))
    except (TypeError, ValueError) as error:
        raise SchedulerStateError(f"{type(scheduler).__name__}.state_dict() is not plain data ({error}): "
                                  "moetion snapshots it as JSON; use a torch scheduler or numbers-only state") from None


def restore_scheduler(scheduler: LRScheduler, state: dict[str, Any]) -> None:
    """Puts the scheduler and the param-group hyper-parameters back exactly as captured."""
    groups = scheduler.optimizer.param_groups
    if len(state["param_groups"]) != len(groups):
        raise SchedulerStateError(f"the captured scheduler state has {len(state['param_groups'])} param groups, "
                                  f"the optimizer {len(groups)}: build the optimizer as in the original run")
    scheduler.load_state_dict(state["scheduler"])
    for group, saved in zip(groups, state["param_groups"]):
        for key, value in saved.items():
            group[key] = tuple(value) if isinstance(group.get(key), tuple) else value


def restore_from_window(scheduler: LRScheduler | None, window: WindowImage) -> None:
    """The scheduler as of the window's first capture; a replay must have one exactly when the run did."""
    state = window.manifest.extra.get(STATE_KEY)
    where = f"window {window.manifest.start_iteration} of stage {window.manifest.stage}"
    if state is None and scheduler is not None:
        raise SchedulerStateError(f"{where} holds no lr_scheduler state: the run it comes from had none, so pass none")
    if state is not None and scheduler is None:
        raise SchedulerStateError(f"{where} was trained with an lr_scheduler: pass the same lr_scheduler "
                                  "factory to replay it, or its learning rates would be wrong")
    if state is not None:
        restore_scheduler(scheduler, state)


def _is_plain(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return True
    return isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float)) for v in value)
