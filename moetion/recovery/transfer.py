"""Moving a restoring rank's inputs over the rebuilt job's group: logs, window replicas, state.

Senders are survivors and only send; restoring ranks only receive, each from its sources in the
plan's order, so the transfers cannot deadlock. Every receive is bounded: a sender dying mid-way
becomes a :class:`~moetion.errors.PeerFailure` and the recovery starts over in a new generation.
"""
from __future__ import annotations

import io
import json
from datetime import timedelta

import torch
import torch.distributed as dist

from moetion.errors import PeerFailure
from moetion.recovery.stage import StageState
from moetion.snapshot.image import WindowImage
from moetion.snapshot.replica import recv_image, send_image
from moetion.upstream_log import IterationScalars


def send_bytes(data: bytes, dst: int, *, what: str) -> None:
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    _guard(lambda: dist.send(torch.tensor([payload.numel()], dtype=torch.int64), dst), what=f"sending {what} to rank {dst}")
    if payload.numel():
        _guard(lambda: dist.send(payload, dst), what=f"sending {what} to rank {dst}")


def recv_bytes(src: int, *, timeout_s: float, what: str) -> bytes:
    size = torch.empty(1, dtype=torch.int64)
    _wait(dist.irecv(size, src), timeout_s, what=f"receiving {what} from rank {src}")
    payload = torch.empty(int(size), dtype=torch.uint8)
    if payload.numel():
        _wait(dist.irecv(payload, src), timeout_s, what=f"receiving {what} from rank {src}")
    return payload.numpy().tobytes()


def send_window(image: WindowImage | None, dst: int) -> None:
    _guard(lambda: send_image(image, dst), what=f"sending a window replica to rank {dst}")


def recv_window(src: int) -> WindowImage | None:
    return _guard(lambda: recv_image(src), what=f"receiving a window replica from rank {src}")


def send_state(state: StageState, dst: int) -> None:
    """A live data-parallel replica's exact state (torch.save keeps every bit, Adam's step included)
    and its history (iteration -> logged scalars)."""
    buffer = io.BytesIO()
    history = {t: scalars.to_tensor() for t, scalars in state.history.items()}
    scheduler = json.dumps(state.lr_scheduler)  # plain data as text: nothing for torch.load to unpickle
    torch.save({"model": state.model, "optimizer": state.optimizer, "history": history, "lr_scheduler": scheduler},
               buffer)
    send_bytes(buffer.getvalue(), dst, what="replica state")


def recv_state(src: int, *, timeout_s: float) -> StageState:
    data = recv_bytes(src, timeout_s=timeout_s, what="replica state")
    raw = torch.load(io.BytesIO(data), weights_only=True)
    history = {t: IterationScalars.from_tensor(v) for t, v in raw["history"].items()}
    return StageState(raw["model"], raw["optimizer"], history, json.loads(raw["lr_scheduler"]))


def send_losses(losses: dict[int, float], dst: int) -> None:
    """The job's loss per committed iteration, so that the record survives any number of replacements."""
    pairs = torch.tensor(sorted(losses.items()), dtype=torch.float64).reshape(-1, 2)
    send_bytes(pairs.numpy().tobytes(), dst, what="loss history")


def recv_losses(src: int, *, timeout_s: float) -> dict[int, float]:
    data = recv_bytes(src, timeout_s=timeout_s, what="loss history")
    if len(data) % 16:
        raise PeerFailure(f"receiving the loss history from rank {src}: {len(data)} bytes is not a whole number of pairs")
    pairs = torch.frombuffer(bytearray(data), dtype=torch.float64).reshape(-1, 2) if data else torch.empty(0, 2)
    return {int(t): float(loss) for t, loss in pairs.tolist()}


def _wait(work: dist.Work, timeout_s: float, *, what: str) -> None:
    try:
        answered = work.wait(timedelta(seconds=timeout_s)) is not False
    except RuntimeError as error:
        raise PeerFailure(f"{what}: {str(error).splitlines()[0]}") from None
    if not answered:
        raise PeerFailure(f"{what}: no answer within {timeout_s:g} s")


def _guard(call, *, what: str):
    try:
        return call()
    except RuntimeError as error:
        raise PeerFailure(f"{what}: {str(error).splitlines()[0]}") from None
