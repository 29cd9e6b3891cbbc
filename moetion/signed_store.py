"""A ``torch.distributed.Store`` whose values are signed with the job secret.

torch's ``TCPStore`` has no authentication: any client that reaches its port can read, list
(``list_keys``), write and delete every key. Hiding keys under a secret prefix does not help (the
prefix shows in ``list_keys``), so moetion signs values instead: every value is written as
``HMAC-SHA256(key, name || value) || value`` and checked on read. A client without the secret can
still delete or overwrite keys (a denial of service: firewall the port), but it cannot make a value
that a rank or the supervisor accepts. Signed values are kept in the job's own TCPStore, and
the gloo rendezvous of every generation goes through this wrapper too, so a stranger cannot
redirect a rank to its own address.

Counters cannot be signed (``add`` is arithmetic on the server): ``add`` passes through unsigned,
and nothing moetion trusts is a counter (the generation and heartbeats are signed ``set`` values).
"""
from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta

import torch.distributed as dist

from moetion.errors import MoetionError

TAG_BYTES = 32


class ForgedValue(MoetionError):
    """A control-store value was not written by a holder of the job secret (or was torn)."""


class SignedStore(dist.Store):
    """Signs on ``set``, verifies on ``get``; everything else is delegated to ``inner``.

    Keep a Python reference to this object while a C++ wrapper (``PrefixStore``, a process group)
    uses it: torch finds the overridden methods through the live Python object.
    """

    def __init__(self, inner: dist.Store, key: bytes) -> None:
        super().__init__()
        self.inner, self._key = inner, key

    def sign(self, name: str, value: bytes) -> bytes:
        return self._tag(name, value) + value

    def verify(self, name: str, raw: bytes) -> bytes:
        """The value inside ``raw`` (as read from key ``name``); ForgedValue if its tag is wrong."""
        raw = bytes(raw)
        tag, value = raw[:TAG_BYTES], raw[TAG_BYTES:]
        if len(raw) < TAG_BYTES or not hmac.compare_digest(tag, self._tag(name, value)):
            raise ForgedValue(f"control-store key {name!r} holds a value not signed with this job's secret "
                              f"({len(raw)} bytes): someone without the secret wrote it")
        return value

    def set(self, key: str, value: str | bytes) -> None:
        self.inner.set(key, self.sign(key, _as_bytes(value)))

    def get(self, key: str) -> bytes:
        return self.verify(key, self.inner.get(key))

    def multi_set(self, keys: list[str], values: list[str | bytes]) -> None:
        self.inner.multi_set(keys, [self.sign(k, _as_bytes(v)) for k, v in zip(keys, values)])

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return [self.verify(k, raw) for k, raw in zip(keys, self.inner.multi_get(keys))]

    def compare_set(self, key: str, expected: str | bytes, desired: str | bytes) -> bytes:
        raise NotImplementedError("SignedStore.compare_set: signed values carry tags; compare raw values of the inner store")

    def add(self, key: str, value: int) -> int:
        return self.inner.add(key, value)

    def check(self, keys: list[str]) -> bool:
        return self.inner.check(keys)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        if timeout is None:
            self.inner.wait(keys)
        else:
            self.inner.wait(keys, timeout)

    def delete_key(self, key: str) -> bool:
        return self.inner.delete_key(key)

    def num_keys(self) -> int:
        return self.inner.num_keys()

    def set_timeout(self, timeout: timedelta) -> None:
        self.inner.set_timeout(timeout)

    def clone(self) -> "SignedStore":
        return SignedStore(self.inner.clone(), self._key)

    def _tag(self, name: str, value: bytes) -> bytes:
        return hmac.new(self._key, name.encode() + b"\0" + value, hashlib.sha256).digest()


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)
