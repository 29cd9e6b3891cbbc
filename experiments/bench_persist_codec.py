"""Bytes per persisted window, raw vs delta-compressed (``snapshot.persist_codec``), on the demo model.

Trains the built-in model (4 stages, pinned W) with windows persisted raw, then encodes every
persisted window with each codec the way the persisting thread does (compute snapshots as XOR
against the previous capture, shuffled, lz4 or zstd): stored bytes, ratio, and the CPU time to
encode and to decode-and-verify one window (background work: persisting and loading, never the
training thread). fp32 and bf16 (the bf16 run's compute copies are bf16).

    python experiments/bench_persist_codec.py [--iterations 24] [--window 4]

Prints a table and writes experiments/results/bench_persist_codec.json.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

from measure import write_results
from moetion.demo import DemoSettings, run_demo
from moetion.snapshot.delta import DeltaCodec, EncodedWindow, decode_window, encode_window
from moetion.snapshot.persist import iter_window_dirs, load_window

CODECS = {"lz4": DeltaCodec("lz4"), "zstd-3": DeltaCodec("zstd", 3)}


def persisted_windows(precision: str, *, iterations: int, window: int, root: Path) -> list[Path]:
    run_demo(DemoSettings(iterations=iterations, window=window, precision=precision, persist_dir=str(root),
                          progress=False))
    return [path for *_, path in iter_window_dirs(next(root.iterdir()))]


def measure(paths: list[Path], codec: DeltaCodec) -> dict:
    raw, stored, encode_ms, decode_ms = 0, 0, [], []
    for path in paths:
        image = load_window(path)
        started = time.process_time()
        encoded = encode_window(image, codec)
        encode_ms.append((time.process_time() - started) * 1e3)
        started = time.process_time()
        decode_window(EncodedWindow(image.manifest, encoded.frames))
        decode_ms.append((time.process_time() - started) * 1e3)
        raw += image.manifest.blob_bytes
        stored += encoded.stored_bytes
    return {"windows": len(paths), "raw_bytes_per_window": raw / len(paths),
            "stored_bytes_per_window": stored / len(paths), "ratio": raw / stored,
            "encode_cpu_ms": statistics.median(encode_ms), "decode_cpu_ms": statistics.median(decode_ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=24)
    parser.add_argument("--window", type=int, default=4)
    args = parser.parse_args()
    rows = {}
    for precision in ("fp32", "bf16"):
        with tempfile.TemporaryDirectory(prefix="moetion-bench-codec-") as root:
            paths = persisted_windows(precision, iterations=args.iterations, window=args.window, root=Path(root))
            for name, codec in CODECS.items():
                rows[f"{precision} {name}"] = measure(paths, codec)
    print(f"\n{'windows':<12} {'raw KB':>9} {'stored KB':>10} {'ratio':>6} {'encode ms':>10} {'decode ms':>10}")
    for name, r in rows.items():
        print(f"{name:<12} {r['raw_bytes_per_window'] / 1e3:>9.1f} {r['stored_bytes_per_window'] / 1e3:>10.1f} "
              f"{r['ratio']:>6.2f} {r['encode_cpu_ms']:>10.2f} {r['decode_cpu_ms']:>10.2f}")
    write_results("bench_persist_codec", {"machine": platform.platform(), "iterations": args.iterations,
                                          "window": args.window, "rows": rows})


if __name__ == "__main__":
    main()
