"""Moving a restoring rank's inputs over the rebuilt job's group: logs, window replicas, state.

Senders are survivors and only send; restoring ranks only receive, each from its sources in the
plan's order, so the transfers cannot deadlock. Every receive is bounded: a sender dying mid-way
becomes a :class:`~moetion.errors.PeerFailure` and the recovery starts over in a new generation.
"""
from __future__ import annotations

import io
from datetime import timedelta

import torch
import torch.distributed as dist

from moetion import failure_notice
from moetion.errors import PeerFailure
from moetion.snapshot.image import WindowImage
from moetion.snapshot.replica import recv_image, send_image


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


def send_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, history: dict[int, torch.Tensor],
               dst: int) -> None:
    """A live data-parallel replica's exact state (torch.save keeps every bit, Adam's step included)
    and its history (iteration -> logged scalars)."""
    buffer = io.BytesIO()
    torch.save({"model": module.state_dict(), "optimizer": optimizer.state_dict(), "history": history}, buffer)
    send_bytes(buffer.getvalue(), dst, what="replica state")


def recv_state(src: int, *, timeout_s: float) -> dict:
    data = recv_bytes(src, timeout_s=timeout_s, what="replica state")
    return torch.load(io.BytesIO(data), weights_only=True)


def _wait(work: dist.Work, timeout_s: float, *, what: str) -> None:
    try:
        answered = work.wait(timedelta(seconds=timeout_s)) is not False
    except RuntimeError as error:
        raise PeerFailure(failure_notice.explain(f"{what}: {str(error).splitlines()[0]}")) from None
    if not answered:
        raise PeerFailure(failure_notice.explain(f"{what}: no answer within {timeout_s:g} s"))


def _guard(call, *, what: str):
    try:
        return call()
    except RuntimeError as error:
        raise PeerFailure(failure_notice.explain(f"{what}: {str(error).splitlines()[0]}")) from None
