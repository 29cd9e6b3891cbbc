"""Overhead of checkpointing and of upstream logging every iteration, side by side in one run; replay speed.

Every timed table runs one model on the same processes for all its rows (4 stage processes; the
experts part 2 stages x 2 replicas), in rounds that interleave its rows so machine noise hits all
alike; a row's figure is the median over its rounds, and its ratio is against a baseline row
measured in the same run. ``--only`` picks a part (default: all).

Part "snapshots" -- the cost of a snapshot every iteration:
  none         no checkpointing (the baseline every ratio is against; "none (A/A)" runs it again)
  sparse-auto  moetion sparse snapshots, W chosen by Algorithm 1 from measured time and bandwidth
  sparse-W     moetion sparse snapshots with W pinned (one row per --windows value)
  dense (W=1)  moetion's own full snapshot of every operator every iteration (the same capture
               machinery with W=1)
  dcp-async/k  torch.distributed.checkpoint.async_save of model + optimizer every k iterations
               (k = 1 and --dcp-every)
  gemini/k     the GEMINI package (lm-resiliency, optional extra "bench") every k optimizer steps
               (k = 1 and its default 10); "not runnable here" with the reason if it does not import
Snapshot rows keep windows in /dev/shm and replicate each to a peer stage, as in production.
--no-peers leaves out the DCP and GEMINI rows.

Part "logging" -- upstream logging of boundary tensors (DESIGN.md §2.3), three tables:
  1. Logging overhead. Every row takes sparse snapshots with W pinned to --log-window, so the
     ratios isolate logging:
       log-off     snapshots, no upstream logging (the baseline of this table)
       log-none    logging, entries kept uncompressed
       log-lz4     logging with lz4 + byte-shuffle, the default (the <= 1.03x target applies here)
       log-zstd1   logging with zstd level 1 + byte-shuffle
  2. Log bytes per iteration, raw and stored, per stage and summed over stages, for each codec of
     table 1, in fp32 and bf16: --precision's figures come from table 1's last round, the other
     precision's from one short run per codec.
  3. Replay speed. One run with W pinned and lz4 logging keeps every iteration's log; then a fresh
     process rebuilds each stage from the latest complete window and its neighbours' logs with
     ``replay_stage``, times it against that stage's normal iteration time, and checks with
     torch.equal that weights and full optimizer state equal the live stage's.

Part "experts" -- expert parallelism: EP 1 vs EP 2 on the same model and ranks (2 stages x 2
data-parallel replicas, GPT-MoE with 8 experts per layer; with EP 2 each replica of a stage holds 4):
  ep1 none     no checkpointing, every replica holds every expert (the baseline; "ep1 none (A/A)"
               runs it again)
  ep1 sparse   sparse snapshots, W pinned to --ep-window
  ep2 none     experts split over the 2 replicas of each stage (tokens cross an all-to-all)
  ep2 sparse   both
plus a per-rank table: parameters one rank holds and the snapshot bytes per iteration one rank
captures (its last complete window / W), each stage's largest over its replicas.

Every table also shows the measures of experiments/measure.py: training-thread time blocked in
moetion, background CPU, bytes per iteration, and the A/A noise band ("none (A/A)" / "log-off (A/A)").
The snapshot part also encodes each stage's last window delta-compressed (moetion/snapshot/delta.py)
and prints bytes per window before/after, checked bit-exact on decode.

Prints the tables and writes experiments/results/bench_overhead.json (bench_overhead_<part>.json
with --only) with the keys of the parts that ran: "rows" and "delta" (snapshots), "logging", "log_bytes" and
"replay", "experts"; PNGs with matplotlib.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

import moetion
from logging_store import LogStore
from moetion.data import stdlib_corpus
from moetion.demo import demo_model_config
from moetion.launcher import run_workers
from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss
from moetion.replay import replay_stage
from moetion.snapshot.delta import DeltaCodec, decode_window, encode_window
from moetion.snapshot.image import WindowImage, WindowManifest
from moetion.upstream_log import LogReader

from peers import GEMINI_DEFAULT_INTERVAL, DcpAsyncPeer, GeminiPeer
from measure import RESULTS, StageProbe, compare, interleave, plot_rows, print_rows, summarize, with_aa, write_results

LOG_TARGET = 1.03
# Logging rows: label -> upstream_log config (None: logging off). The target applies to the default.
LOG_ROWS = {
    "log-off": None,
    "log-none": {"codec": "none"},
    "log-lz4": {"codec": "lz4", "shuffle": True},
    "log-zstd1": {"codec": "zstd", "level": 1, "shuffle": True},
}
DEFAULT_LOG_ROW = "log-lz4"
COMPRESS_TIMEOUT_S = 120
DELTA_CODECS = (DeltaCodec("lz4"), DeltaCodec("zstd", 1))
# The experts part: a model whose layers have enough experts to split (the demo's 4 would leave 2).
EP_MODEL = GPTMoEConfig(seq_len=64, d_model=64, n_heads=4, n_layers=4, d_hidden=128, num_experts=8, top_k=2)
EP_STAGES, EP_REPLICAS = 2, 2
# Label -> (ep_size, snapshots on); "ep1 none" is the baseline.
EP_ROWS = {"ep1 none": (1, False), "ep1 sparse": (1, True), "ep2 none": (2, False), "ep2 sparse": (2, True)}


# -- shared ----------------------------------------------------------------------------------------
def build_module(args: argparse.Namespace, stage_id: int | None = None) -> moetion.PipelineModule:
    return moetion.PipelineModule(build_gpt_moe_layers(demo_model_config()), args.stages, loss_fn=gpt_moe_loss,
                                  stage_id=stage_id)


def adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


def corpus() -> moetion.ByteCorpus:
    return moetion.ByteCorpus(stdlib_corpus(), seq_len=demo_model_config().seq_len, micro_batch_size=8)


@contextmanager
def scratch_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="moetion-bench-", dir="/dev/shm")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_stages(fn: Callable[..., dict], args: argparse.Namespace, *fn_args: object, nproc: int | None = None) -> list[dict]:
    """``fn(*fn_args, scratch)`` on ``nproc`` (default ``args.stages``) forked processes; their
    results in rank order."""
    with scratch_dir() as scratch:
        return run_workers(fn, nproc=nproc or args.stages, args=(*fn_args, scratch), timeout_s=600)


def interleaved(rows: dict[str, tuple], fn: Callable[..., dict], args: argparse.Namespace,
                baseline: str, nproc: int | None = None) -> dict[str, list[list[dict]]]:
    """Every row (``fn``'s arguments) once per round, rows in turn, plus the baseline's A/A row."""
    return interleave(with_aa(rows, baseline), lambda *fn_args: run_stages(fn, args, *fn_args, nproc=nproc),
                      rounds=args.rounds)


def timed_iterations(engine: moetion.PipelineEngine, data: moetion.ByteCorpus, probe: StageProbe,
                     args: argparse.Namespace, after: Callable[[int], None] | None = None) -> list[float]:
    """``args.warmup`` untimed iterations, then ``args.iterations`` timed ones (``after(t)`` inside
    the timing); restarts ``probe`` between them. Returns each timed iteration's wall seconds."""
    seconds = []
    for t in range(args.warmup + args.iterations):
        if t == args.warmup:
            probe.restart()
        start = time.perf_counter()
        engine.train_batch(data)
        if after is not None:
            after(t)
        if t >= args.warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


# -- part "snapshots" ------------------------------------------------------------------------------
def run_mode(mode: str, window: int | None, args: argparse.Namespace, scratch: str) -> dict:
    """One stage process of a row: ``mode`` none/sparse/dense (``window``: W, None for auto) or a peer
    (gemini/dcp-async; ``window``: its save interval)."""
    module = build_module(args)
    snapshot = {"enabled": mode in ("sparse", "dense"), "window": window, "shm_dir": f"{scratch}/shm",
                "run_id": f"bench-{mode}-{window}"}
    engine = moetion.initialize(module, optimizer=adamw, config={
        "micro_batches": args.micro_batches, "precision": args.precision, "snapshot": snapshot})
    probe = StageProbe()
    peer = None
    if mode == "gemini":
        peer = GeminiPeer(module, engine.optimizer, interval=window, probe=probe)
    elif mode == "dcp-async":
        peer = DcpAsyncPeer(module, engine.optimizer, every=window, directory=f"{scratch}/dcp-{engine.dist.rank}",
                            probe=probe)
    seconds = timed_iterations(engine, corpus(), probe, args, after=peer.after_iteration if peer else None)
    result = probe.stop(seconds)
    ckpt = engine.checkpointer
    result.update(window=None, host_bytes=0)
    if ckpt is not None and ckpt.last_complete is not None:
        ckpt.worker.fence()
        result.update(window=ckpt.last_complete.window, host_bytes=sum(ckpt.tier_bytes().values()),
                      delta=delta_sizes(ckpt.shm.load_complete()))
    if peer is not None:
        peer.close()
        result["bytes"].update(peer.bytes_per_iteration())
    engine.close()
    return result


def refresh_calibration(blocked_share: float) -> None:
    """Sets overhead_fraction in the calibration file bench_recovery.py wrote, if there is one: the
    training thread's CPU time blocked at W auto over the iteration time (the wall figure on a shared
    CPU machine is mostly preemption by other jobs, which no cluster would inherit)."""
    path = RESULTS / "calibration.json"
    if path.exists():
        calibration = json.loads(path.read_text())
        calibration["overhead_fraction"] = blocked_share
        path.write_text(json.dumps(calibration, indent=2))
        print(f"{path}: overhead_fraction = {blocked_share:.5f} (sparse-auto's blocked CPU share)")


def gemini_runnable() -> bool:
    """Whether the GEMINI package imports here; says why not when it does not."""
    try:
        importlib.import_module("lm_resiliency")  # the optional extra `bench`
    except ImportError as error:
        print(f"gemini/1, gemini/{GEMINI_DEFAULT_INTERVAL}: not runnable here: {error} "
              "(install the optional extra: pip install .[bench])")
        return False
    return True


def delta_sizes(image: WindowImage) -> dict:
    """One real window's bytes raw and delta-compressed per codec, the encode CPU time, and whether
    the decoded window is bit-exact."""
    sizes = {"raw": image.manifest.blob_bytes, "window": image.manifest.window}
    for codec in DELTA_CODECS:
        start = time.thread_time()
        encoded = encode_window(image, codec)
        sizes[f"{codec.codec}_s"] = time.thread_time() - start
        sizes[codec.codec] = encoded.stored_bytes
        decoded = decode_window(encoded)
        sizes[f"{codec.codec}_exact"] = all(torch.equal(decoded.tensor(e), image.tensor(e))
                                            for c in image.manifest.captures for e in c.entries)
    return sizes


def print_delta(per_row: dict[str, list[list[dict]]]) -> list[dict]:
    """Bytes per window before/after delta compression, summed over stages, from each row's last round."""
    table = []
    for label, rounds in per_row.items():
        stages = [s["delta"] for s in rounds[-1] if s.get("delta")]
        if not stages:
            continue
        row = {"mode": label, "window": stages[0]["window"], "raw": sum(s["raw"] for s in stages)}
        for codec in DELTA_CODECS:
            name = codec.codec
            row.update({name: sum(s[name] for s in stages), f"{name}_s": sum(s[f"{name}_s"] for s in stages),
                        f"{name}_exact": all(s[f"{name}_exact"] for s in stages)})
        table.append(row)
    print("\ndelta-compressed windows (compute copies XOR the previous capture's; shuffle + codec), summed over stages")
    print(f"{'row':14s} {'W':>3s} {'raw KiB':>9s} " + " ".join(f"{c.codec + ' KiB':>10s} {'x':>5s} {'enc ms':>7s} {'exact':>5s}"
                                                      for c in DELTA_CODECS))
    for row in table:
        cells = " ".join(f"{row[c.codec] / 1024:10.1f} {row['raw'] / row[c.codec]:5.2f} {row[c.codec + '_s'] * 1000:7.1f} "
                         f"{'yes' if row[c.codec + '_exact'] else 'NO':>5s}" for c in DELTA_CODECS)
        print(f"{row['mode']:14s} {row['window']:>3d} {row['raw'] / 1024:9.1f} {cells}")
    print("(one window per stage; enc ms: CPU time to encode it on one thread, off the training thread in production)")
    return table


def snapshot_part(args: argparse.Namespace) -> list[dict]:
    rows = {"none": ("none", None), "sparse-auto": ("sparse", None),
            **{f"sparse-W{w}": ("sparse", w) for w in args.windows}, "dense (W=1)": ("dense", 1)}
    if args.peers:
        rows.update({f"dcp-async/{k}": ("dcp-async", k) for k in (1, args.dcp_every)})
        if gemini_runnable():
            rows.update({f"gemini/{k}": ("gemini", k) for k in (1, GEMINI_DEFAULT_INTERVAL)})
    per_row = interleaved({label: (*mode, args) for label, mode in rows.items()}, run_mode, args, "none")
    table = summarize(per_row, baseline="none")
    print_rows(table, title=f"snapshot every iteration: {args.stages} stages, {args.precision}, "
                            f"{args.rounds} interleaved rounds of {args.iterations} iterations")
    windows = {label: rounds[-1][0]["window"] for label, rounds in per_row.items()}
    print("W used: " + ", ".join(f"{label} {w}" for label, w in windows.items() if w))
    auto = next(r for r in table if r.label == "sparse-auto")
    pinned = [r for r in table if r.label.startswith("sparse-W")]
    if pinned:
        print(compare(auto, min(pinned, key=lambda r: r.ratio)))
    print(f"blocking at W auto: {auto.blocked_share * 100:.3f}% of the iteration (goal <= 0.1%); "
          f"background CPU {auto.background_cpu_share * 100:.2f}% of training CPU (goal <= 5%)")
    plot_rows(table, name="bench_overhead_snapshots", title="snapshot every iteration")
    refresh_calibration(auto.blocked_cpu_ms / auto.median_ms)
    delta = print_delta(per_row)
    return {"rows": [{**row.to_dict(), "window": windows[row.label]} for row in table], "delta": delta}


# -- part "logging" --------------------------------------------------------------------------------
def log_config(args: argparse.Namespace, precision: str, scratch: str, upstream_log: dict | None) -> moetion.Config:
    """Snapshots with W pinned to --log-window in every logging run, plus the given logging (None: off)."""
    snapshot = {"enabled": True, "window": args.log_window, "shm_dir": f"{scratch}/shm", "run_id": "bench-log"}
    return moetion.Config.from_dict({
        "micro_batches": args.micro_batches, "precision": precision, "snapshot": snapshot,
        "upstream_log": {"enabled": upstream_log is not None, **(upstream_log or {})},
    })


def run_logging(upstream_log: dict | None, precision: str, iterations: int, args: argparse.Namespace,
                scratch: str) -> dict:
    """One stage process: its iteration times and, with logging on, its log's bytes per iteration."""
    engine = moetion.initialize(build_module(args), optimizer=adamw,
                                config=log_config(args, precision, scratch, upstream_log))
    data, seconds, probe = corpus(), [], StageProbe()
    for t in range(args.warmup + iterations):
        if t == args.warmup:
            probe.restart()
        engine.train_batch(data)
        if t >= args.warmup:
            seconds.append(engine.last_stats.seconds)
    result = {"stage": engine.stage, **probe.stop(seconds)}
    if engine.upstream is not None:
        result["log"] = log_bytes(engine)
    engine.close()
    return result


def log_bytes(engine: moetion.PipelineEngine) -> dict:
    """This stage's log per held iteration (retention keeps the latest complete window on), once the
    background compression has caught up."""
    engine.checkpointer.worker.fence()  # the last window's publish drops older logs on the capture thread
    store = engine.upstream.store
    if not store.wait_idle(timeout=COMPRESS_TIMEOUT_S):
        raise RuntimeError(f"stage {engine.stage}: log compression did not catch up in {COMPRESS_TIMEOUT_S} s")
    stats = store.stats()
    held = len({key.iteration for key in store.keys()})
    return {"iterations_held": held, "entries": stats.entries / held,
            "raw_bytes": stats.raw_bytes / held, "stored_bytes": stats.stored_bytes / held}


def logging_overhead(args: argparse.Namespace) -> tuple[list[dict], dict[str, list[dict]]]:
    """Table 1; also returns each logging row's last-round rank results (for table 2)."""
    rows = {label: (upstream_log, args.precision, args.iterations, args) for label, upstream_log in LOG_ROWS.items()}
    per_row = interleaved(rows, run_logging, args, "log-off")
    table = summarize(per_row, baseline="log-off")
    print_rows(table, title=f"logging overhead ({args.precision}, sparse snapshots W={args.log_window} in every row)",
               byte_keys=("logged", "copied"))
    row = next(r for r in table if r.label == DEFAULT_LOG_ROW)
    outcome = ("met" if row.ratio <= LOG_TARGET else
               "cannot tell: inside the noise band" if row.verdict == "within noise" else "NOT met")
    print(f"target <= {LOG_TARGET:.2f}x for {DEFAULT_LOG_ROW} (the default): {row.ratio:.3f}x, {row.verdict}: {outcome}; "
          f"log puts block {row.blocked_by.get('log_put', 0.0):.3f} ms/iter (wall)\n")
    plot_rows(table, name="bench_overhead_logging", title="upstream logging")
    return [r.to_dict() for r in table], {label: rounds[-1] for label, rounds in per_row.items()
                                          if LOG_ROWS.get(label) is not None}


def log_bytes_table(args: argparse.Namespace, timed: dict[str, list[dict]]) -> list[dict]:
    """Table 2, from the timed runs in --precision and one short run per codec in the other precision."""
    table = []
    for precision in ("fp32", "bf16"):
        for label, ranks in timed.items():
            if precision != args.precision:
                ranks = run_stages(run_logging, args, LOG_ROWS[label], precision, args.log_window, args)
                print(f"{precision} {label}: measured", flush=True)
            logs = [r["log"] for r in sorted(ranks, key=lambda r: r["stage"])]
            per_stage = {key: [log[key] for log in logs]
                         for key in ("raw_bytes", "stored_bytes", "entries", "iterations_held")}
            table.append({"precision": precision, "mode": label, **LOG_ROWS[label], **per_stage})
    columns = " ".join(f"{f's{stage}':>7s}" for stage in range(args.stages)) + f" {'sum':>8s}"
    print("\nlog bytes per iteration, KiB, per stage and summed over stages (stage 0 sends only activations, the last"
          " stage only gradients; both ends also log the tied embedding's gradient)")
    print(f"{'':20s} {'raw':<{len(columns)}s} | {'stored':<{len(columns)}s} |")
    print(f"{'precision':9s} {'mode':10s} {columns} | {columns} | raw/stored")
    for row in table:
        raw, stored = row["raw_bytes"], row["stored_bytes"]
        print(f"{row['precision']:9s} {row['mode']:10s} {kib_columns(raw)} | {kib_columns(stored)} | "
              f"{sum(raw) / sum(stored):10.3f}")
    print()
    return table


def kib_columns(per_stage: list[float]) -> str:
    return " ".join(f"{b / 1024:7.1f}" for b in per_stage) + f" {sum(per_stage) / 1024:8.1f}"


def train_for_replay(iterations: int, args: argparse.Namespace, scratch: str) -> dict:
    """One stage process: trains with lz4 logging, keeps each iteration's log before retention drops
    it, and returns them with the latest complete window and the live state at the end."""
    module = build_module(args)
    engine = moetion.initialize(module, optimizer=adamw,
                                config=log_config(args, args.precision, scratch, LOG_ROWS[DEFAULT_LOG_ROW]))
    data, seconds, logs = corpus(), [], []
    for t in range(iterations):
        engine.train_batch(data)
        seconds.append(engine.last_stats.seconds)
        logs.append(engine.upstream.export(t, t + 1))
    engine.checkpointer.worker.fence()
    image = engine.checkpointer.shm.load_complete()
    engine.close()
    return {"stage": engine.stage, "seconds": seconds[args.warmup:], "logs": b"".join(logs),
            "manifest": image.manifest.to_json(), "blob": image.blob[: image.manifest.blob_bytes].clone(),
            "model": module.state_dict(), "optim": engine.optimizer.state_dict()["state"]}


def neighbour_logs(ranks: list[dict], module: moetion.PipelineModule) -> dict[int, LogStore]:
    """The logs of the stages ``module``'s stage talks to (its neighbours and the stages sharing a tied
    weight with it), imported into fresh stores and compressed as a live store would hold them."""
    stage = module.stage_id
    tied = {s for shared in module.tied_stages().values() if stage in shared for s in shared}
    talks_to = ({stage - 1, stage + 1} | tied) - {stage}
    stores = {}
    for other in ranks:
        if other["stage"] in talks_to:
            stores[other["stage"]] = store = LogStore()
            store.import_(other["logs"])
            store.wait_idle(timeout=COMPRESS_TIMEOUT_S)
    return stores


def mismatches(live: dict, model: dict[str, torch.Tensor], optim: dict[int, dict]) -> list[str]:
    """Every weight and optimizer-state tensor of the live stage that the rebuilt one does not equal."""
    bad = [name for name, value in live["model"].items() if not torch.equal(model[name], value)]
    for index, state in live["optim"].items():
        for key, value in state.items():
            mine = optim.get(index, {}).get(key)
            if mine is None or not torch.equal(mine, value):
                bad.append(f"optimizer[{index}].{key}")
    return bad


def replay_every_stage(ranks: list[dict], until: int, args: argparse.Namespace, scratch: str) -> list[dict]:
    """In a fresh process: rebuilds each stage to ``until`` from its window and neighbours' logs."""
    results = []
    for live in sorted(ranks, key=lambda r: r["stage"]):
        stage = live["stage"]
        module = build_module(args, stage_id=stage)
        optimizer = adamw(module.parameters())
        stores = neighbour_logs(ranks, module)
        config = log_config(args, args.precision, scratch, LOG_ROWS[DEFAULT_LOG_ROW])
        report = replay_stage(module=module, optimizer=optimizer, config=config,
                              window=WindowImage(WindowManifest.from_json(live["manifest"]), live["blob"]),
                              logs=LogReader(stores, stage=stage), data=corpus(), until=until)
        for store in stores.values():
            store.close()
        results.append({"stage": stage, "start_iteration": report.start_iteration, "until": report.until,
                        "iterations_replayed": report.iterations_replayed, "seconds": report.seconds,
                        "mismatches": mismatches(live, module.state_dict(), optimizer.state_dict()["state"])})
    return results


def replay_speed(args: argparse.Namespace) -> dict:
    """Table 3. The run is a multiple of W iterations long, so it ends one iteration short of completing
    a window: the replay covers the 2W-2 iterations after the latest complete window's first."""
    iterations = args.log_window * max(2, (args.warmup + args.iterations) // (2 * args.log_window))
    with scratch_dir() as scratch:
        ranks = run_workers(train_for_replay, nproc=args.stages, args=(iterations, args, scratch), timeout_s=600)
        until = iterations - 1
        rebuilt = run_workers(replay_every_stage, nproc=1, args=(ranks, until, args, scratch), timeout_s=600)[0]
    normal = {r["stage"]: statistics.median(r["seconds"]) for r in ranks}
    stages = [{**r, "replay_it_per_s": r["iterations_replayed"] / r["seconds"],
               "normal_it_per_s": 1 / normal[r["stage"]]} for r in rebuilt]
    first = stages[0]
    print(f"\nreplay ({args.precision}, lz4 logs): each stage rebuilt in a fresh process from its window "
          f"{first['start_iteration']}..{first['start_iteration'] + args.log_window - 1} (W={args.log_window}) "
          f"and its neighbours' logs, up to iteration {first['until']}")
    print(f"{'stage':>5s} {'replayed':>8s} {'replay s':>8s} {'replay it/s':>11s} {'normal it/s':>11s} {'x normal':>8s}"
          "  torch.equal")
    for row in stages:
        verdict = f"NO ({len(row['mismatches'])} tensors differ)" if row["mismatches"] else "yes"
        print(f"{row['stage']:5d} {row['iterations_replayed']:8d} {row['seconds']:8.3f} {row['replay_it_per_s']:11.2f} "
              f"{row['normal_it_per_s']:11.2f} {row['replay_it_per_s'] / row['normal_it_per_s']:8.2f}  {verdict}")
    print(f"(normal it/s = 1 / median of the stage's own iteration time in the training run; that is the whole "
          f"pipelined iteration with its bubbles, with {args.stages} stage processes sharing the cores, of which the "
          f"stage's own compute is only a share; replay runs alone in one process)")
    exact = all(not row["mismatches"] for row in stages)
    print(f"replay exact (weights and full optimizer state, every stage): {'yes' if exact else 'NO'}")
    for row in stages:
        if row["mismatches"]:
            print(f"  stage {row['stage']} differs in: {', '.join(row['mismatches'][:8])}")
    print()
    return {"precision": args.precision, "window": args.log_window, "iterations_trained": iterations,
            "exact": exact, "stages": stages}


def logging_part(args: argparse.Namespace) -> dict:
    overhead, timed = logging_overhead(args)
    return {"logging": overhead, "log_bytes": log_bytes_table(args, timed), "replay": replay_speed(args)}


# -- part "experts" ---------------------------------------------------------------------------------
def run_expert_rank(ep_size: int, snapshots: bool, args: argparse.Namespace, scratch: str) -> dict:
    """One rank of an experts row: its timed figures, the parameters it holds and, with snapshots,
    the bytes per iteration of its last complete window."""
    module = moetion.PipelineModule(build_gpt_moe_layers(EP_MODEL), EP_STAGES, loss_fn=gpt_moe_loss, ep_size=ep_size)
    snapshot = {"enabled": snapshots, "window": args.ep_window, "shm_dir": f"{scratch}/shm", "run_id": f"bench-ep{ep_size}"}
    engine = moetion.initialize(module, optimizer=adamw, config={
        "micro_batches": args.micro_batches, "precision": args.precision, "snapshot": snapshot})
    probe = StageProbe()
    result = probe.stop(timed_iterations(engine, corpus(), probe, args))
    result.update(stage=engine.stage, replica=engine.dist.replica, params=sum(p.numel() for p in module.parameters()),
                  snapshot_bytes_per_iteration=None)
    ckpt = engine.checkpointer
    if ckpt is not None:
        ckpt.worker.fence()
        last = ckpt.last_complete
        if last is None:
            raise RuntimeError(f"rank {engine.dist.rank}: no complete window in {args.warmup + args.iterations} "
                               f"iterations at W={args.ep_window}")
        result["snapshot_bytes_per_iteration"] = last.blob_bytes / last.window
    engine.close()
    return result


def per_rank(ranks: list[dict], key: str) -> list[float | None]:
    """``key`` per stage: the largest over the stage's replicas (the rank that carries the most)."""
    values = [[r[key] for r in ranks if r["stage"] == stage] for stage in range(EP_STAGES)]
    return [None if None in v else max(v) for v in values]


def experts_part(args: argparse.Namespace) -> dict:
    rows = {label: (ep_size, snapshots, args) for label, (ep_size, snapshots) in EP_ROWS.items()}
    per_row = interleaved(rows, run_expert_rank, args, "ep1 none", nproc=EP_STAGES * EP_REPLICAS)
    table = summarize(per_row, baseline="ep1 none")
    print_rows(table, title=f"expert parallelism: {EP_STAGES} stages x {EP_REPLICAS} replicas, {EP_MODEL.num_experts} "
                            f"experts per layer, {args.precision}, sparse rows W={args.ep_window}, "
                            f"{args.rounds} interleaved rounds of {args.iterations} iterations")
    by_label = {r.label: r for r in table}
    print(compare(by_label["ep2 sparse"], by_label["ep1 sparse"]))
    print(compare(by_label["ep2 none"], by_label["ep1 none"]))
    ranks = {label: rounds[-1] for label, rounds in per_row.items()}
    params = {label: per_rank(r, "params") for label, r in ranks.items()}
    snapshot = {label: per_rank(r, "snapshot_bytes_per_iteration") for label, r in ranks.items()}
    print(f"\n{'per rank':20s} {'params (s0 / s1)':>20s} {'snapshot KiB/iter (s0 / s1)':>28s}")
    for label in ranks:
        kib = "-" if None in snapshot[label] else " / ".join(f"{b / 1024:.1f}" for b in snapshot[label])
        print(f"{label:20s} {' / '.join(f'{p:,}' for p in params[label]):>20s} {kib:>28s}")
    print(f"(each stage's largest replica; snapshot bytes per iteration: the rank's last complete window / W. "
          f"The table above: ms/iter of rank 0 (stage 0), blocked of the worst rank, CPU and bytes summed over the "
          f"{EP_STAGES * EP_REPLICAS} ranks)")
    plot_rows(table, name="bench_overhead_experts", title="expert parallelism: EP 1 vs EP 2")
    return {"experts": [{**row.to_dict(), "params_per_rank": params[row.label],
                         "snapshot_bytes_per_iteration_per_rank": snapshot[row.label]} for row in table]}


def stage_device(choice: str, *, stages: int) -> str:
    """The MOETION_DEVICE of the stage processes. Asks NVML, not the CUDA runtime, how many GPUs
    there are: this process forks the stages, and a CUDA runtime started here would break them."""
    if choice != "cuda":
        return choice
    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise SystemExit("--device cuda: no GPU visible (torch.cuda.device_count() is 0)")
    if gpus < stages:
        print(f"--device cuda: {gpus} GPU(s) for {stages} stages: every stage computes on GPU 0 and they talk "
              "over gloo (MOETION_DEVICE=cuda-shared)", flush=True)
        return "cuda-shared"
    return "cuda"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["snapshots", "logging", "experts", "all"], default="all")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--windows", type=int, nargs="*", default=[4, 8])
    parser.add_argument("--dcp-every", type=int, default=10, help="the second DCP row saves every k iterations")
    parser.add_argument("--no-peers", dest="peers", action="store_false",
                        help="leave out the GEMINI and DCP rows")
    parser.add_argument("--log-window", type=int, default=4, help="W pinned in every logging and replay run")
    parser.add_argument("--ep-window", type=int, default=4, help="W pinned in the experts part's sparse rows")
    parser.add_argument("--quick", action="store_true", help="few iterations, one round")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "cuda-shared"], default="auto",
                        help="where stages compute (MOETION_DEVICE); cuda: NCCL with a GPU per stage when the "
                             "machine has enough, else every stage on GPU 0 over gloo (cuda-shared)")
    args = parser.parse_args()
    os.environ.setdefault("MOETION_LOG_LEVEL", "WARNING")
    args.device = stage_device(args.device, stages=args.stages)
    if args.device.startswith("cuda") and args.only != "snapshots":
        raise SystemExit("on CUDA this benchmark measures the snapshot part only (add --only snapshots): the "
                         "logging part's replay table rebuilds stages in this process, on the CPU, and the experts part "
                         "is measured on CPU only")
    os.environ["MOETION_DEVICE"] = args.device  # read by every forked stage process
    if args.quick:
        args.iterations, args.warmup, args.rounds = 8, 2, 1
    report: dict = {"settings": vars(args)}
    if args.only in ("snapshots", "all"):
        report.update(snapshot_part(args))
    if args.only in ("logging", "all"):
        report.update(logging_part(args))
    if args.only in ("experts", "all"):
        report.update(experts_part(args))
    write_results("bench_overhead" if args.only == "all" else f"bench_overhead_{args.only}", report)


if __name__ == "__main__":
    main()
