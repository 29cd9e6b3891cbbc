"""Point-to-point transfer of activations and gradients between neighbouring stages.

Sends are non-blocking (kept until :meth:`StageLinks.wait_sends`), receives block with a bound:
a dead peer surfaces as a :class:`PeerFailure` naming its rank, never as a hang. An activation's
shape and dtype are exchanged once per link, then reused; a gradient has the shape of the
activation it belongs to, so it needs no exchange at all.
"""
from __future__ import annotations

import math
from datetime import timedelta

import torch
import torch.distributed as dist

from moetion import failure_notice
from moetion.errors import PeerFailure
from moetion.memory_budget import check_wire_size, transfer_limit

_META_LEN = 10  # dtype code, ndim, up to 8 dims
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32]


def _encode_meta(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype not in _DTYPES or tensor.dim() > _META_LEN - 2:
        raise TypeError(
            f"stage boundary tensors must be one of {_DTYPES} with at most {_META_LEN - 2} dims, "
            f"got {tensor.dtype} with shape {tuple(tensor.shape)}"
        )
    meta = torch.zeros(_META_LEN, dtype=torch.int64)
    meta[0], meta[1] = _DTYPES.index(tensor.dtype), tensor.dim()
    meta[2 : 2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    return meta


def _decode_meta(meta: torch.Tensor, *, peer: int, what: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """The dtype and shape a peer announced, checked before anything is allocated for them."""
    code, ndim, *dims = (int(v) for v in meta.tolist())
    if not (0 <= code < len(_DTYPES) and 0 <= ndim <= _META_LEN - 2 and all(d >= 0 for d in dims[:ndim])):
        raise PeerFailure(_lost(peer, f"receiving {what}", f"it announced an impossible dtype/shape {meta.tolist()}"))
    dtype, shape = _DTYPES[code], tuple(dims[:ndim])
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    check_wire_size(nbytes, limit=transfer_limit(), peer=peer, what=f"{what} ({dtype}, shape {list(shape)})")
    return dtype, shape


class StageLinks:
    """This stage's connections to the previous and the next stage of its pipeline.

    Args:
        prev_rank / next_rank: global ranks of the neighbours (None at the pipeline's ends).
        timeout_s: bound on every receive and on waiting for a send to complete.
        device: where received tensors are allocated.

    Over gloo (the CPU, or ``MOETION_DEVICE=cuda-shared``) tensors travel through host memory:
    gloo's point-to-point sends read the host. Over NCCL they travel from the device.
    """

    def __init__(self, *, prev_rank: int | None, next_rank: int | None, timeout_s: float, device: torch.device) -> None:
        self.prev_rank = prev_rank
        self.next_rank = next_rank
        self.timeout = timedelta(seconds=timeout_s)
        self.device = device
        gloo = dist.is_initialized() and dist.get_backend() == "gloo"
        self.wire = torch.device("cpu") if gloo else device
        self._sent_meta: tuple[torch.dtype, tuple[int, ...]] | None = None
        self._recv_meta: tuple[torch.dtype, tuple[int, ...]] | None = None
        self._pending: list[tuple[dist.Work, torch.Tensor, int, str]] = []

    def send_activation(self, tensor: torch.Tensor, *, what: str) -> None:
        """Sends to the next stage; the first send of the link also carries shape and dtype."""
        key = (tensor.dtype, tuple(tensor.shape))
        if self._sent_meta is None:
            self._isend(_encode_meta(tensor).to(self.wire), self.next_rank, what=f"shape of {what}")
            self._sent_meta = key
        elif key != self._sent_meta:
            raise ValueError(
                f"stage outputs must keep one shape and dtype across micro-batches; the first was "
                f"{self._sent_meta}, {what} is {key}"
            )
        self._isend(tensor, self.next_rank, what=what)

    def recv_activation(self, *, what: str) -> torch.Tensor:
        if self._recv_meta is None:
            meta = torch.empty(_META_LEN, dtype=torch.int64, device=self.wire)
            self._recv(meta, self.prev_rank, what=f"shape of {what}")
            self._recv_meta = _decode_meta(meta.cpu(), peer=self.prev_rank, what=what)
        dtype, shape = self._recv_meta
        return self._recv(torch.empty(shape, dtype=dtype, device=self.wire), self.prev_rank, what=what)

    def send_grad(self, tensor: torch.Tensor, *, what: str) -> None:
        self._isend(tensor, self.prev_rank, what=what)

    def recv_grad(self, like: torch.Tensor, *, what: str) -> torch.Tensor:
        buffer = torch.empty_like(like, memory_format=torch.contiguous_format, device=self.wire)
        return self._recv(buffer, self.next_rank, what=what)

    def wait_sends(self) -> None:
        """Blocks until every send has completed (their buffers may then be freed)."""
        pending, self._pending = self._pending, []
        for work, _tensor, peer, what in pending:
            self._wait(work, peer, what=f"sending {what}")

    def _isend(self, tensor: torch.Tensor, peer: int | None, *, what: str) -> None:
        assert peer is not None, f"no peer to send {what} to"
        tensor = tensor.to(self.wire).contiguous()  # no copy where it already is (the CPU, NCCL)
        try:
            work = dist.isend(tensor, dst=peer)
        except RuntimeError as error:
            raise PeerFailure(_lost(peer, f"sending {what}", error)) from None
        self._pending.append((work, tensor, peer, what))

    def _recv(self, buffer: torch.Tensor, peer: int | None, *, what: str) -> torch.Tensor:
        assert peer is not None, f"no peer to receive {what} from"
        try:
            work = dist.irecv(buffer, src=peer)
        except RuntimeError as error:
            raise PeerFailure(_lost(peer, f"receiving {what}", error)) from None
        self._wait(work, peer, what=f"receiving {what}")
        return buffer.to(self.device)

    def _wait(self, work: dist.Work, peer: int, *, what: str) -> None:
        message = None
        try:
            answered = work.wait(self.timeout) is not False
        except RuntimeError as error:  # gloo raises both on a closed connection and on a timeout
            message = str(error).splitlines()[0]
            answered = "Timed out" not in message
        if not answered:
            message = f"no answer within {self.timeout.total_seconds():g} s (is it hung?)"
        if message is not None:
            raise PeerFailure(_lost(peer, what, message))


def _lost(peer: int, what: str, cause: object) -> str:
    return failure_notice.explain(f"lost contact with rank {peer} while {what}: {cause}")
