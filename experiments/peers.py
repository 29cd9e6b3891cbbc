"""Peer checkpointing systems driven from a moetion stage process, for side-by-side rows.

  gemini     the GEMINI package (``lm-resiliency``): in-memory checkpoints replicated to a peer,
             every ``interval`` optimizer steps, through its optimizer step hook. On CPU it needs an
             explicit gloo group (without one it builds NCCL peer groups and fails).
  dcp-async  ``torch.distributed.checkpoint.async_save`` of model + optimizer every ``every``
             iterations, each stage into its own directory, waiting for the previous save first.

Each peer reports the training thread's time blocked in it to a :class:`measure.StageProbe` and
its bytes per save; both are optional extras (``pip install .[bench]`` for lm-resiliency).
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from measure import StageProbe

GEMINI_DEFAULT_INTERVAL = 10  # enable_resiliency's default


def state_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the stage's weights and every optimizer tensor: what one full save copies."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


class GeminiPeer:
    """GEMINI checkpointing of one stage; the time its step hook runs is the time training is blocked."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, *, interval: int, probe: StageProbe) -> None:
        from lm_resiliency import enable_resiliency  # optional extra

        self.interval, self.probe = interval, probe
        self._marks = [(0.0, 0.0), (0.0, 0.0)]  # (wall, training-thread CPU) before and after its hook
        # Post hooks run in registration order: ours before and after GEMINI's bracket its work.
        optimizer.register_step_post_hook(lambda *_: self._mark(0))
        self.handle = enable_resiliency(module, optimizer, interval=interval, enable_detection=False,
                                        group=dist.new_group(backend="gloo"))
        optimizer.register_step_post_hook(lambda *_: self._mark(1))
        self.module, self.optimizer = module, optimizer

    def _mark(self, index: int) -> None:
        self._marks[index] = (time.perf_counter(), time.thread_time())
        if index == 1:
            (wall0, cpu0), (wall1, cpu1) = self._marks
            self.probe.add_blocked(wall1 - wall0, cpu1 - cpu0)

    def bytes_per_iteration(self) -> dict[str, float]:
        saved = state_bytes(self.module, self.optimizer) / self.interval
        return {"copied": saved, "replicated": saved, "stored": 2 * saved}  # own copy + the peer's

    def after_iteration(self, iteration: int) -> None:
        pass  # GEMINI saves from its optimizer hook

    def close(self) -> None:
        close = getattr(self.handle, "close", None)
        if close is not None:
            close()


class DcpAsyncPeer:
    """``dcp.async_save`` every ``every`` iterations into ``directory``; blocked = the call plus the
    wait for the previous save."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, *, every: int, directory: str,
                 probe: StageProbe) -> None:
        self.module, self.optimizer, self.every, self.directory, self.probe = module, optimizer, every, directory, probe
        self._pending = None
        self._group = None
        for rank in range(dist.get_world_size()):  # DCP coordinates within a group: one per stage
            group = dist.new_group([rank], backend="gloo")
            self._group = group if rank == dist.get_rank() else self._group
        warnings.filterwarnings("ignore", message="Detected an existing checkpoint")

    def after_iteration(self, iteration: int) -> None:
        if (iteration + 1) % self.every:
            return
        start, cpu = time.perf_counter(), time.thread_time()
        if self._pending is not None:
            self._pending.result()
        state = {"model": self.module.state_dict(), "optim": self.optimizer.state_dict()}
        self._pending = dcp.async_save(state, checkpoint_id=f"{self.directory}/iter-{iteration % 2}",
                                       process_group=self._group)
        self.probe.add_blocked(time.perf_counter() - start, time.thread_time() - cpu)

    def bytes_per_iteration(self) -> dict[str, float]:
        files = [p for p in Path(self.directory).rglob("*") if p.is_file()]
        return {"stored": sum(p.stat().st_size for p in files) / 2 / self.every}

    def close(self) -> None:
        if self._pending is not None:
            self._pending.result()
