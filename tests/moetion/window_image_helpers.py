"""Builds small, real window images by hand: a few tensors laid out at aligned offsets, real checksums."""
from __future__ import annotations

import torch

from moetion.snapshot.image import Capture, Entry, WindowImage, WindowManifest, aligned, checksum, dtype_name

SLOTS = (("l0.expert0", "l0.expert1"), ("l0.expert2",), ("l0.router", "dense.0"))


def _tensor(gen: torch.Generator, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.int64:
        return torch.randint(0, 1 << 40, shape, generator=gen, dtype=torch.int64)
    return torch.randn(shape, generator=gen).to(dtype)


def make_image(*, stage: int = 0, replica: int = 0, start_iteration: int = 0, seed: int = 0, run_id: str = "run-test",
               job_nonce: str = "job-test",
               slots: tuple[tuple[str, ...], ...] = SLOTS, slack: int = 0) -> tuple[WindowImage, dict]:
    """A complete window: capture i holds slot i's full snapshot (fp32 weight, Adam state, int64 step)
    and a bf16 compute snapshot of every later slot. Returns the image and {(iteration, param, role): tensor}."""
    gen = torch.Generator().manual_seed(seed * 1000 + stage * 10 + replica)
    planned, expected, offset = [], {}, 0
    for i in range(len(slots)):
        iteration = start_iteration + i
        tensors = []
        for op in slots[i]:
            param = f"{op}.weight"
            tensors += [(op, param, "weight", _tensor(gen, torch.float32, (3, 5))),
                        (op, param, "optim.exp_avg", _tensor(gen, torch.float32, (3, 5))),
                        (op, param, "optim.step", _tensor(gen, torch.int64, ()))]
        for later in slots[i + 1 :]:
            tensors += [(op, f"{op}.weight", "compute", _tensor(gen, torch.bfloat16, (3, 5))) for op in later]
        placed = []
        for op, param, role, t in tensors:
            offset = aligned(offset)
            nbytes = t.numel() * t.element_size()
            placed.append((op, param, role, t, offset, nbytes))
            expected[(iteration, param, role)] = t
            offset += nbytes
        planned.append((iteration, placed))
    blob_bytes = offset
    blob = torch.randint(0, 256, (blob_bytes + slack,), generator=gen, dtype=torch.uint8)  # garbage padding
    captures = []
    for iteration, placed in planned:
        entries = []
        for op, param, role, t, off, nbytes in placed:
            blob[off : off + nbytes] = t.contiguous().reshape(-1).view(torch.uint8)
            entries.append(Entry(operator=op, param=param, role=role, dtype=dtype_name(t.dtype), shape=tuple(t.shape),
                                 offset=off, nbytes=nbytes, checksum=checksum(blob[off : off + nbytes])))
        captures.append(Capture(iteration, tuple(entries)))
    manifest = WindowManifest(run_id=run_id, job_nonce=job_nonce, stage=stage, replica=replica, start_iteration=start_iteration, slots=slots,
                              precision="bf16", threads=1, captures=tuple(captures), blob_bytes=blob_bytes,
                              extra={"note": "built by hand"})
    return WindowImage(manifest, blob), expected


def rewrite_manifest(path, **changes) -> None:
    """Edits fields of a persisted manifest and re-seals its checksum, as a deliberate editor
    would: what is left to catch the edit is the check of that field itself."""
    import json
    from pathlib import Path
    from moetion.snapshot.image import CHECKSUM_FIELD, manifest_digest
    raw = json.loads(Path(path).read_bytes())
    raw.pop(CHECKSUM_FIELD)
    raw.update(changes)
    Path(path).write_text(json.dumps({**raw, CHECKSUM_FIELD: manifest_digest(raw)}))
