"""The ``moetion`` command line: ``moetion launch``, ``demo``, ``inspect``, ``export`` and ``plan``."""
from __future__ import annotations

import argparse
import sys

from moetion.errors import MoetionError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moetion", description="Fault-tolerant pipeline-parallel MoE training")
    commands = parser.add_subparsers(dest="command", required=True)

    launch = commands.add_parser("launch", help="run a training script as N local ranks (torchrun-style env)")
    launch.add_argument("--nproc", type=int, required=True, help="number of ranks (stages x data-parallel replicas)")
    launch.add_argument("--timeout", type=float, default=None, help="kill the job after this many seconds")
    launch.add_argument("--resume", action="store_true",
                        help="ask the script to restart from its persisted windows (sets MOETION_RESUME=1)")
    launch.add_argument("script")
    launch.add_argument("script_args", nargs=argparse.REMAINDER)

    demo = commands.add_parser("demo", help="train the built-in MoE model across pipeline-stage processes")
    demo.add_argument("--iterations", type=int, default=50)
    demo.add_argument("--stages", type=int, default=4)
    demo.add_argument("--data-parallel", type=int, default=1)
    demo.add_argument("--micro-batches", type=int, default=4)
    demo.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--window", type=int, default=None, help="pin the sparse-checkpoint window W (default: Algorithm 1)")
    demo.add_argument("--persist-dir", default=None, help="also persist complete windows there (see `moetion inspect`)")
    demo.add_argument("--no-snapshots", action="store_true", help="train without sparse checkpointing")

    inspect = commands.add_parser("inspect", help="list persisted snapshot windows per stage and check their integrity")
    inspect.add_argument("dir", help="the directory windows were persisted to")
    inspect.add_argument("--no-verify", action="store_true", help="skip reading blobs and checking checksums")
    inspect.add_argument("--json", action="store_true", help="print one JSON object per window instead of a table")

    export = commands.add_parser("export", help="write a dense torch.save checkpoint from a run's persisted windows")
    export.add_argument("run_dir", help="the run's persist directory (persist_dir/<run_id>, holding config.json)")
    export.add_argument("out", help="the checkpoint file to write (atomically)")
    export.add_argument("--job", required=True, help="package.module:function returning the run's moetion.export.JobSpec")
    export.add_argument("--iteration", type=int, default=None,
                        help="export the window starting at this iteration (default: newest on all stages)")
    export.add_argument("--optimizer", action="store_true", help="also write each stage's optimizer state")
    export.add_argument("--verify", action="store_true", help="re-read the output and check every checksum")
    export.add_argument("--workers", type=int, default=None, help="conversion processes (default: one per core)")
    export.add_argument("--dcp", default=None, metavar="DIR", help="also write a torch.distributed.checkpoint directory")

    plan = commands.add_parser("plan", help="estimate overhead, recovery and ETTR per fault-tolerance approach")
    plan.add_argument("--preset", default=None, help="a paper model: deepseek-moe-16b, qwen-moe-14b, gpt-moe, moe-llava")
    plan.add_argument("--json", default=None, metavar="FILE-or-JSON",
                      help='{"model": {...}, "hardware": {...}}; with --preset, overrides its fields')
    plan.add_argument("--mtbf", required=True, help="mean time between failures of the job, e.g. 10m, 2h, 90s")
    plan.add_argument("--runs", type=int, default=30, help="Monte-Carlo runs for the simulated ETTR (0: skip)")
    plan.add_argument("--seed", type=int, default=0)
    plan.add_argument("--plot", default=None, metavar="OUT.png", help="draw ETTR vs MTBF (needs matplotlib)")

    args = parser.parse_args(argv)
    try:
        if args.command == "launch":
            from moetion.launcher import launch_script

            launch_script(args.script, args.script_args, nproc=args.nproc, timeout_s=args.timeout, resume=args.resume)
        elif args.command == "inspect":
            from pathlib import Path

            from moetion.snapshot.inspect import inspect_command

            return inspect_command(Path(args.dir), verify=not args.no_verify, as_json=args.json)
        elif args.command == "export":
            from moetion.export import export_command

            export_command(args.run_dir, args.out, job=args.job, iteration=args.iteration,
                           with_optimizer=args.optimizer, verify=args.verify, workers=args.workers, dcp_dir=args.dcp)
        elif args.command == "plan":
            from moetion.planner.cli import plan_command

            return plan_command(preset_name=args.preset, spec=args.json, mtbf=args.mtbf, runs=args.runs,
                                seed=args.seed, plot=args.plot)
        else:
            from moetion.demo import DemoSettings, run_demo

            run_demo(DemoSettings(
                iterations=args.iterations, stages=args.stages, data_parallel=args.data_parallel,
                micro_batches=args.micro_batches, precision=args.precision, seed=args.seed,
                snapshots=not args.no_snapshots, window=args.window, persist_dir=args.persist_dir,
            ))
    except MoetionError as error:
        print(f"moetion {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
