"""Moving a restoring rank's inputs over the rebuilt job's group: logs, window replicas, state.

Senders are survivors and only send; restoring ranks only receive, each from its sources in the
plan's order, so the transfers cannot deadlock. Every receive is bounded: a sender dying mid-way
becomes a :class:`~moetion.errors.PeerFailure` and the recovery starts over in a new generation.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from moetion import failure_notice, tensor_tree
from moetion.errors import MoetionError, PeerFailure
from moetion.memory_budget import check_wire_size, transfer_limit
from moetion.recovery.stage import StageState
from moetion.snapshot.image import WindowImage
from moetion.snapshot.replica import recv_image, send_image
from moetion.upstream_log import IterationScalars


def send_bytes(data: bytes, dst: int, *, what: str, after_size: Callable[[], None] = lambda: None) -> None:
    """``after_size`` runs between the size and the bytes (a fault point: a sender dying mid-transfer)."""
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    _guard(lambda: dist.send(torch.tensor([payload.numel()], dtype=torch.int64), dst), what=f"sending {what} to rank {dst}")
    after_size()
    if payload.numel():
        _guard(lambda: dist.send(payload, dst), what=f"sending {what} to rank {dst}")


def recv_bytes(src: int, *, timeout_s: float, what: str, limit: int | None = None) -> memoryview:
    """What :func:`send_bytes` sent, as a view of the one buffer it was received into (no copy).

    The announced size is checked against ``limit`` (default: :func:`transfer_limit`) before
    anything is allocated; a negative or larger size is a PeerFailure naming ``src``.
    """
    size = torch.empty(1, dtype=torch.int64)
    _wait(dist.irecv(size, src), timeout_s, what=f"receiving {what} from rank {src}")
    nbytes = check_wire_size(int(size), limit=transfer_limit() if limit is None else limit, peer=src, what=what)
    payload = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        _wait(dist.irecv(payload, src), timeout_s, what=f"receiving {what} from rank {src}")
    return memoryview(payload.numpy())


def send_window(image: WindowImage | None, dst: int) -> None:
    _guard(lambda: send_image(image, dst), what=f"sending a window replica to rank {dst}")


def recv_window(src: int) -> WindowImage | None:
    return _guard(lambda: recv_image(src), what=f"receiving a window replica from rank {src}")


def send_state(state: StageState, dst: int) -> None:
    """A live data-parallel replica's exact state (every bit, Adam's step included) and its history
    (iteration -> logged scalars), as a tensor tree: no pickle crosses the wire."""
    history = {t: scalars.to_tensor() for t, scalars in state.history.items()}
    tree = {"model": state.model, "optimizer": state.optimizer, "history": history,
            "lr_scheduler": json.dumps(state.lr_scheduler)}  # plain data as text
    send_bytes(tensor_tree.encode(tree), dst, what="replica state")


def recv_state(src: int, *, timeout_s: float) -> tuple[StageState, int]:
    """What :func:`send_state` sent, and its size in bytes (what the recovery moved); a stream that is
    not an intact tensor tree is a PeerFailure."""
    data = recv_bytes(src, timeout_s=timeout_s, what="replica state")
    try:
        tree = tensor_tree.decode(data, source=f"replica state from rank {src}")
    except MoetionError as error:
        raise PeerFailure(str(error)) from None
    if not isinstance(tree, dict) or not {"model", "optimizer", "history", "lr_scheduler"} <= set(tree):
        raise PeerFailure(f"replica state from rank {src} lacks model, optimizer, history or lr_scheduler")
    try:
        scheduler = json.loads(tree["lr_scheduler"])
        history = {int(t): IterationScalars.from_tensor(v) for t, v in tree["history"].items()}
    except (TypeError, ValueError) as error:
        raise PeerFailure(f"replica state from rank {src} is malformed: {error}") from None
    return StageState(tree["model"], tree["optimizer"], history, scheduler), data.nbytes


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
        raise PeerFailure(failure_notice.explain(f"{what}: {str(error).splitlines()[0]}")) from None
    if not answered:
        raise PeerFailure(failure_notice.explain(f"{what}: no answer within {timeout_s:g} s"))


def _guard(call, *, what: str):
    try:
        return call()
    except RuntimeError as error:
        raise PeerFailure(failure_notice.explain(f"{what}: {str(error).splitlines()[0]}")) from None
