"""Benchmark of logging_store's codecs, filters and put path on realistic pipeline tensors.

What it measures (single core unless stated; memcpy of the same bytes is measured in the same
run as the physical ceiling):

1. codecs x filters on boundary activations and input-gradients of a small transformer block
   with GELU (fp32 and bf16) and on consecutive Adam-updated weights (lr 1e-4) for XOR-delta:
   ratio raw/stored, encode and decode GB/s through logging_store.encode/decode; plus how the
   XOR-delta ratio depends on layer width and Adam step;
2. native vs numpy filters (shuffle, un-shuffle, XOR, checksum) as GB/s and % of memcpy;
3. LogStore.put latency vs a plain copy into preallocated host buffers;
4. a pipeline-demo-like logging load (compute on one core, a worker on the other): how much
   ended up compressed, how much stayed raw or spilled, and put latency under load.

Prints tables and writes experiments/results/bench_codec.json. ``--quick`` runs in < 30 s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import logging_store as ls
from logging_store import _fallback, filters

RESULTS = Path(__file__).resolve().parent / "results" / "bench_codec.json"
CODECS = [("none", None), ("lz4", None), ("zstd", 1), ("zstd", 3)]
QUICK_CODECS = CODECS[:3]


# ----------------------------------------------------------------------------------- timing


def best_seconds(function: Callable[[], Any], *, repeats: int) -> float:
    """Fastest of ``repeats`` runs after a warm-up (the machine is shared; the minimum is the least disturbed)."""
    function()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        function()
        times.append(time.perf_counter() - t0)
    return min(times)


def memcpy_gbps(nbytes: int, repeats: int) -> float:
    src = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    return nbytes / best_seconds(lambda: np.copyto(dst, src), repeats=repeats) / 1e9


# ----------------------------------------------------------------------------------- data


class Block(nn.Module):
    """Pre-norm transformer block: attention + GELU MLP, as a pipeline stage would hold."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


def boundary_tensors(*, batch: int, seq: int, dim: int, steps: int) -> dict[str, torch.Tensor]:
    """The activation stage 0 sends and the input-gradient stage 1 sends back, after a few Adam steps.

    Computed in fp32; the bf16 variants are these values rounded to bf16, as a bf16 pipeline would
    send them (running the block itself in bf16 is ~20x slower on these CPUs, and compressibility
    depends on the value distribution, which rounding preserves).
    """
    torch.manual_seed(0)
    vocab = 1000
    stage0 = nn.Sequential(nn.Embedding(vocab, dim), Block(dim, 8))
    stage1 = Block(dim, 8)
    head = nn.Linear(dim, vocab)
    optimizer = torch.optim.Adam([*stage0.parameters(), *stage1.parameters(), *head.parameters()], lr=1e-3)
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (batch, seq))
        activation = stage0(tokens).detach().requires_grad_(True)
        logits = head(stage1(activation))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), torch.roll(tokens, -1, 1).flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"activation": activation.detach().contiguous(), "gradient": activation.grad.contiguous()}


def adam_weights(*, dim: int, steps: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(previous, current) weight snapshots one Adam step apart (lr 1e-4), fp32 master and bf16 copy."""
    torch.manual_seed(1)
    layer = nn.Linear(dim, dim)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-4)
    snapshots = []
    for _ in range(steps):
        x = torch.randn(64, dim)
        loss = (layer(x) - torch.tanh(x)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        snapshots.append(layer.weight.detach().clone())
    previous, current = snapshots[-2], snapshots[-1]
    return {"weights_fp32": (previous, current), "weights_bf16": (previous.bfloat16(), current.bfloat16())}


# ----------------------------------------------------------------------------------- 1. codecs


def codec_table(datasets: dict[str, tuple[torch.Tensor, torch.Tensor | None]], repeats: int,
                codecs: list[tuple[str, int | None]]) -> list[dict]:
    rows = []
    for name, (tensor, reference) in datasets.items():
        raw = tensor.nbytes
        copy_speed = memcpy_gbps(raw, repeats)
        variants = [("plain", False, None), ("shuffle", True, None)]
        if reference is not None:
            variants += [("delta", False, reference), ("delta+shuffle", True, reference)]
        for codec, level in codecs:
            for filter_name, shuffle, ref in variants:
                frame = ls.encode(tensor, codec=codec, level=level, shuffle=shuffle, reference=ref)
                assert torch.equal(ls.decode(frame, reference=ref).view(torch.uint8), tensor.view(torch.uint8))
                encode_s = best_seconds(lambda: ls.encode(tensor, codec=codec, level=level, shuffle=shuffle,
                                                          reference=ref), repeats=repeats)
                decode_s = best_seconds(lambda: ls.decode(frame, reference=ref), repeats=repeats)
                rows.append({
                    "data": name, "dtype": str(tensor.dtype).removeprefix("torch."), "raw_bytes": raw,
                    "codec": codec if level is None else f"{codec}-{level}", "filter": filter_name,
                    "ratio": raw / len(frame), "encode_gbps": raw / encode_s / 1e9,
                    "decode_gbps": raw / decode_s / 1e9, "memcpy_gbps": copy_speed,
                })
    return rows


def delta_sensitivity(dims: list[int], steps: list[int]) -> list[dict]:
    """XOR-delta ratios of bf16 snapshots vs layer width and Adam step: smaller weights (wider
    layers) and early steps (|update| ~ lr for every weight) flip more low mantissa bits."""
    rows = []
    for dim in dims:
        for step in steps:
            previous, current = adam_weights(dim=dim, steps=step)["weights_bf16"]
            changed = (previous.view(torch.int16) != current.view(torch.int16)).float().mean().item()
            row = {"dim": dim, "step": step, "changed_fraction": changed}
            for codec, level in (("lz4", None), ("zstd", 1)):
                frame = ls.encode(current, codec=codec, level=level, shuffle=True, reference=previous)
                row[f"{codec}_shuffle_delta_ratio"] = current.nbytes / len(frame)
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------- 2. filters


def filter_table(sizes: list[int], repeats: int) -> list[dict]:
    backends = {"native": filters, "numpy": _fallback}
    if filters.BACKEND != "native":
        backends = {"numpy": _fallback}
    rows = []
    for size in sizes:
        rng = np.random.default_rng(size)
        a = rng.integers(0, 256, size, dtype=np.uint8)
        b = rng.integers(0, 256, size, dtype=np.uint8)
        out = np.empty_like(a)
        copy_speed = memcpy_gbps(size, repeats * 4)
        operations: list[tuple[str, Callable[[Any], Callable[[], Any]]]] = [
            ("shuffle/2", lambda m: lambda: m.shuffle(a, out, 2)),
            ("unshuffle/2", lambda m: lambda: m.unshuffle(a, out, 2)),
            ("shuffle/4", lambda m: lambda: m.shuffle(a, out, 4)),
            ("unshuffle/4", lambda m: lambda: m.unshuffle(a, out, 4)),
            ("xor", lambda m: lambda: m.xor(a, b, out)),
            ("checksum", lambda m: lambda: m.checksum(a)),
        ]
        for operation, make in operations:
            row = {"bytes": size, "operation": operation, "memcpy_gbps": copy_speed}
            for backend_name, module in backends.items():
                speed = size / best_seconds(make(module), repeats=repeats * (4 if backend_name == "native" else 1)) / 1e9
                row[f"{backend_name}_gbps"] = speed
                row[f"{backend_name}_pct_memcpy"] = 100 * speed / copy_speed
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------- 3. put


def put_table(sizes: list[int], count: int) -> list[dict]:
    """Median per-call latency: LogStore.put vs torch copy_ into preallocated buffers.

    Two baselines: one buffer reused (cache-hot, the strictest) and a ring of distinct buffers
    (what a log needs, since every entry is kept).
    """
    rows = []
    for size in sizes:
        n = max(8, min(count, (192 << 20) // size))
        source = torch.randn(size // 2).bfloat16()
        ring = [torch.empty_like(source) for _ in range(n)]
        for buffer in ring:
            buffer.fill_(0)

        def timed(function: Callable[[int], Any]) -> float:
            times = []
            for i in range(n):
                t0 = time.perf_counter()
                function(i)
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        same_buffer = min(timed(lambda i: ring[0].copy_(source)) for _ in range(3))
        ring_copy = min(timed(lambda i: ring[i].copy_(source)) for _ in range(3))
        put_times = []
        for attempt in range(3):
            with ls.LogStore(workers=0, reserve_bytes=n * size + (4 << 20)) as store:
                put_times.append(timed(lambda i: store.put(ls.LogKey(i, attempt, "activation", 0), source)))
        put = min(put_times)
        rows.append({"bytes": size, "puts": n, "copy_same_buffer_us": same_buffer * 1e6, "copy_ring_us": ring_copy * 1e6,
                     "put_us": put * 1e6, "put_vs_ring": put / ring_copy, "put_vs_same_buffer": put / same_buffer})
    return rows


# ----------------------------------------------------------------------------------- 4. demo load


def pipeline_load(*, name: str, config: ls.LogStoreConfig, iterations: int, micro_batches: int,
                  activation: torch.Tensor, gradient: torch.Tensor, iteration_seconds: float, window: int) -> dict:
    """Logs an activation and a gradient per micro-batch while one core computes, like a 1F1B stage.

    Every put is paired with a plain copy of the same tensor into preallocated buffers at the same
    point of the schedule (alternating which goes first, so both see the same caches). The buffers
    form a ring as large as the log's live window, like an uncompressed log would need.
    """
    a = torch.randn(256, 256)
    slots = (window + 1) * micro_batches
    ring = {kind: [torch.zeros_like(t) for _ in range(slots)]
            for kind, t in (("activation", activation), ("gradient", gradient))}
    put_latencies, copy_latencies = [], []
    dropped_raw = dropped_encoded = 0
    with ls.LogStore(config) as store:
        started = time.perf_counter()
        for iteration in range(iterations):
            for micro_batch in range(micro_batches):
                deadline = time.perf_counter() + iteration_seconds / micro_batches
                while time.perf_counter() < deadline:  # the training thread's compute
                    a = torch.tanh(a @ a) * 0.5
                for kind, payload in (("activation", activation), ("gradient", gradient)):
                    target = ring[kind][(iteration * micro_batches + micro_batch) % slots]
                    steps = [lambda: store.put(ls.LogKey(iteration, micro_batch, kind, 1), payload),
                             lambda: target.copy_(payload)]
                    for index in ((0, 1) if len(put_latencies) % 2 else (1, 0)):
                        t0 = time.perf_counter()
                        steps[index]()
                        (put_latencies, copy_latencies)[index].append(time.perf_counter() - t0)
            if iteration >= window:  # the sparse window completed: older logs are no longer needed
                for key in store.keys(stop=iteration - window + 1):
                    state = store.describe(key).state
                    dropped_raw += state is ls.EntryState.RAW
                    dropped_encoded += state is ls.EntryState.ENCODED
                store.drop_before(iteration - window + 1)
        elapsed = time.perf_counter() - started
        at_end = store.stats()
        store.wait_idle(timeout=120)
        settled = store.stats()
    per_iteration = micro_batches * (activation.nbytes + gradient.nbytes)
    puts = len(put_latencies)
    return {
        "scenario": name, "codec": config.codec, "level": config.level, "budget_bytes": config.budget_bytes,
        "iterations": iterations, "entry_bytes": activation.nbytes, "mb_per_iteration": per_iteration / 1e6,
        "logged_mb_per_s": per_iteration * iterations / elapsed / 1e6, "puts": puts,
        "compressed_total": at_end.compressed_total, "spilled_total": at_end.spilled_total,
        "compressed_fraction_of_puts": at_end.compressed_total / puts,
        "dropped_before_compression": dropped_raw, "dropped_after_compression": dropped_encoded,
        "live_at_end": {"raw": at_end.raw_entries, "encoded": at_end.encoded_entries, "spilled": at_end.spilled_entries},
        "live_ratio_at_end": at_end.ratio, "live_ratio_settled": settled.ratio,
        "put_p50_us": statistics.median(put_latencies) * 1e6,
        "put_p99_us": float(np.percentile(put_latencies, 99)) * 1e6,
        "copy_p50_us": statistics.median(copy_latencies) * 1e6,
        "put_vs_copy_p50": statistics.median(put_latencies) / statistics.median(copy_latencies),
    }


# ----------------------------------------------------------------------------------- output


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(header for header, _, _ in columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(format(row[key], fmt) if isinstance(row[key], (int, float)) else str(row[key])
                               for _, key, fmt in columns) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller tensors and fewer repeats (< 30 s)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    args = parser.parse_args()
    torch.set_num_threads(1)
    quick = args.quick
    repeats = 2 if quick else 4
    started = time.perf_counter()

    # Rows of the boundary tensor: 1024 (quick) or 2048, i.e. at least one 1 MiB chunk of bf16, so
    # the repeated tensors of the overload scenario never repeat inside a chunk.
    shape = {"batch": 4, "seq": 256, "dim": 512} if quick else {"batch": 4, "seq": 512, "dim": 512}
    datasets: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    fp32 = boundary_tensors(**shape, steps=2 if quick else 4)
    bf16 = {kind: tensor.bfloat16() for kind, tensor in fp32.items()}
    for suffix, tensors in (("fp32", fp32), ("bf16", bf16)):
        for kind, tensor in tensors.items():
            datasets[f"{kind}_{suffix}"] = (tensor, None)
    for name, (previous, current) in adam_weights(dim=512, steps=4).items():
        datasets[name] = (current, previous)

    codecs = codec_table(datasets, repeats, QUICK_CODECS if quick else CODECS)
    print_table("Codecs x filters (1 MiB chunks, single core; memcpy = same bytes, same run)", codecs, [
        ("data", "data", ""), ("codec", "codec", ""), ("filter", "filter", ""), ("ratio", "ratio", ".3f"),
        ("encode GB/s", "encode_gbps", ".2f"), ("decode GB/s", "decode_gbps", ".2f"),
        ("memcpy GB/s", "memcpy_gbps", ".1f")])

    sensitivity = delta_sensitivity([512, 1024], [4, 30] if quick else [2, 4, 10, 30])
    print_table("XOR-delta + shuffle of consecutive bf16 weight snapshots (Linear dim x dim, Adam lr 1e-4)",
                sensitivity, [("dim", "dim", "d"), ("Adam step", "step", "d"), ("bf16 values changed", "changed_fraction", ".2f"),
                              ("lz4 ratio", "lz4_shuffle_delta_ratio", ".2f"), ("zstd-1 ratio", "zstd_shuffle_delta_ratio", ".2f")])

    filter_rows = filter_table([1 << 20, 4 << 20] if quick else [1 << 20, 16 << 20], repeats)
    columns = [("bytes", "bytes", "d"), ("operation", "operation", ""), ("memcpy GB/s", "memcpy_gbps", ".1f")]
    for backend in ("native", "numpy"):
        if f"{backend}_gbps" in filter_rows[0]:
            columns += [(f"{backend} GB/s", f"{backend}_gbps", ".2f"), (f"{backend} % memcpy", f"{backend}_pct_memcpy", ".0f")]
    print_table(f"Filters (backend in use: {filters.BACKEND})", filter_rows, columns)

    puts = put_table([64 << 10, 256 << 10, 1 << 20, 4 << 20] + ([] if quick else [16 << 20]), 64 if quick else 200)
    print_table("put latency (median per call, workers=0) vs torch copy_ into preallocated buffers", puts, [
        ("bytes", "bytes", "d"), ("copy, same buffer us", "copy_same_buffer_us", ".1f"),
        ("copy, ring of buffers us", "copy_ring_us", ".1f"), ("put us", "put_us", ".1f"),
        ("put / ring copy", "put_vs_ring", ".2f"), ("put / same-buffer copy", "put_vs_same_buffer", ".2f")])

    entry = (256 << 10) if quick else (512 << 10)  # elements: 0.5 / 1 MiB of bf16 per micro-batch and kind
    activation, gradient = bf16["activation"].reshape(-1)[:entry], bf16["gradient"].reshape(-1)[:entry]
    common = {"micro_batches": 4, "iteration_seconds": 0.3, "window": 4}
    demo_iterations = 6 if quick else 16
    scenarios = [
        pipeline_load(name="demo volume, lz4", config=ls.LogStoreConfig(codec="lz4", workers=1),
                      iterations=demo_iterations, activation=activation, gradient=gradient, **common),
        pipeline_load(name="demo volume, zstd-1", config=ls.LogStoreConfig(codec="zstd", level=1, workers=1),
                      iterations=demo_iterations, activation=activation, gradient=gradient, **common),
    ]
    # Overload: more bytes than one zstd-3 worker can encode in time, and a budget of ~1.5
    # iterations of raw logs, so entries stay raw, spill, and are dropped before being compressed.
    repeat = 8 if quick else 4  # 8 MiB entries, ~67 MB per iteration either way
    heavy_activation = bf16["activation"].reshape(-1).repeat(repeat)
    heavy_gradient = bf16["gradient"].reshape(-1).repeat(repeat)
    budget = int(1.5 * common["micro_batches"] * (heavy_activation.nbytes + heavy_gradient.nbytes))
    with tempfile.TemporaryDirectory(prefix="bench-codec-") as spill_dir:
        scenarios.append(pipeline_load(
            name=f"overload, zstd-3, budget {budget / 1e6:.0f} MB",
            iterations=5 if quick else 10, activation=heavy_activation, gradient=heavy_gradient, **common,
            config=ls.LogStoreConfig(codec="zstd", level=3, workers=1, spill_dir=spill_dir, budget_bytes=budget,
                                     reserve_bytes=64 << 20)))
    print_table("Pipeline-like load: 0.3 s/iteration of compute on one core, one worker, window of 4 iterations",
                scenarios, [
                    ("scenario", "scenario", ""), ("MB/iteration", "mb_per_iteration", ".1f"), ("puts", "puts", "d"),
                    ("compressed", "compressed_total", "d"), ("spilled", "spilled_total", "d"),
                    ("dropped raw", "dropped_before_compression", "d"), ("ratio live (end)", "live_ratio_at_end", ".2f"),
                    ("ratio settled", "live_ratio_settled", ".2f"), ("put p50 us", "put_p50_us", ".0f"),
                    ("copy p50 us", "copy_p50_us", ".0f"), ("put/copy", "put_vs_copy_p50", ".2f"),
                    ("put p99 us", "put_p99_us", ".0f")])

    result = {
        "quick": quick, "seconds": time.perf_counter() - started, "backend": filters.BACKEND,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "codecs": codecs, "delta_sensitivity": sensitivity, "filters": filter_rows, "put": puts, "pipeline_load": scenarios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out} in {result['seconds']:.1f} s")


if __name__ == "__main__":
    main()
