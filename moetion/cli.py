"""The ``moetion`` command line: ``launch``, ``demo``, ``faults``, ``inspect``, ``export`` and ``plan``."""
from __future__ import annotations

import argparse
import sys

from moetion.errors import MoetionError
from moetion.faults import PHASES

DEFAULT_KILL = "stage=2,iter=30,phase=backward"  # the demo's one failure (a middle stage, mid-backward)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moetion", description="Fault-tolerant pipeline-parallel MoE training")
    commands = parser.add_subparsers(dest="command", required=True)

    launch = commands.add_parser("launch", help="run a training script as N local ranks (torchrun-style env)")
    launch.add_argument("--nproc", type=int, required=True,
                        help="ranks on this host (the job has nproc x nnodes: stages x data-parallel replicas)")
    launch.add_argument("--timeout", type=float, default=None, help="kill the job after this many seconds")
    launch.add_argument("--resume", action="store_true",
                        help="ask the script to restart from its persisted windows (sets MOETION_RESUME=1)")
    launch.add_argument("--no-recover", action="store_true",
                        help="end the job when a rank dies instead of replacing it")
    launch.add_argument("--max-restarts", type=int, default=8, help="replacements before the job gives up")
    launch.add_argument("--heartbeat-timeout", type=float, default=30.0,
                        help="seconds without a heartbeat before a live rank counts as hung and is replaced")
    launch.add_argument("--nnodes", type=int, default=1, help="hosts in the job (run this command on each)")
    launch.add_argument("--node-rank", type=int, default=0, help="this host's index; node 0 serves the control store")
    launch.add_argument("--master-addr", default="127.0.0.1", help="node 0's address, reachable from every host")
    launch.add_argument("--master-port", type=int, default=0,
                        help="the control store's port on node 0 (required with --nnodes > 1)")
    launch.add_argument("script")
    launch.add_argument("script_args", nargs=argparse.REMAINDER)

    demo = commands.add_parser("demo", help="train the built-in MoE model across pipeline-stage processes, "
                                             "kill a stage and recover it")
    _model_options(demo)
    demo.add_argument("--kill", action="append", default=None, metavar="SPEC",
                      help=f"kill spec (repeatable), default {DEFAULT_KILL!r}: stage=,iter=,phase= "
                           "[,replica=][,memory=lost]; phases: " + ", ".join(PHASES))
    demo.add_argument("--no-fault", action="store_true", help="train without injecting a failure")

    faults = commands.add_parser("faults", help="run a job fault-free and with SIGKILLs; compare bit for bit")
    _model_options(faults)
    faults.add_argument("--kill", action="append", required=True, metavar="SPEC",
                        help="kill spec (repeatable): stage=,iter=,phase=[,replica=][,memory=lost]; phases: "
                             + ", ".join(PHASES))
    faults.add_argument("--script", default=None, help="a training script to run instead of the built-in model")
    faults.add_argument("--nproc", type=int, default=None, help="ranks of --script")
    faults.add_argument("--timeout", type=float, default=600.0, help="seconds each run may take")
    faults.add_argument("--heartbeat-timeout", type=float, default=30.0,
                        help="seconds without a heartbeat before a rank counts as hung")
    faults.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON")
    faults.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments of --script (after --)")

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
    plan.add_argument("--calibrate", default=None, metavar="FILE",
                      help="measured fixed costs (experiments/bench_recovery.py writes results/calibration.json)")

    args = parser.parse_args(argv)
    try:
        if args.command == "launch":
            from moetion.launcher import Nodes, launch_script

            nodes = Nodes(nnodes=args.nnodes, node_rank=args.node_rank, master_addr=args.master_addr,
                          master_port=args.master_port)
            launch_script(args.script, args.script_args, nproc=args.nproc, timeout_s=args.timeout, resume=args.resume,
                          recover=not args.no_recover, max_restarts=args.max_restarts,
                          heartbeat_timeout_s=args.heartbeat_timeout, nodes=nodes)
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
                                seed=args.seed, plot=args.plot, calibrate=args.calibrate)
        elif args.command == "faults":
            from moetion.harness.runner import faults_command

            return faults_command(_demo_settings(args), kills=args.kill, script=args.script, nproc=args.nproc,
                                  script_args=[a for a in args.script_args if a != "--"], timeout_s=args.timeout,
                                  heartbeat_timeout_s=args.heartbeat_timeout, json_out=args.json)
        else:
            from moetion.demo import run_demo

            run_demo(_demo_settings(args), kills=None if args.no_fault else (args.kill or [DEFAULT_KILL]))
    except MoetionError as error:
        print(f"moetion {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


def _model_options(parser: argparse.ArgumentParser) -> None:
    """The built-in model's settings, shared by ``demo`` and ``faults``."""
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--data-parallel", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=None, help="pin the sparse-checkpoint window W (default: Algorithm 1)")
    parser.add_argument("--persist-dir", default=None, help="also persist complete windows there (see `moetion inspect`)")
    parser.add_argument("--no-snapshots", action="store_true", help="train without sparse checkpointing")


def _demo_settings(args: argparse.Namespace):
    from moetion.demo import DemoSettings

    return DemoSettings(iterations=args.iterations, stages=args.stages, data_parallel=args.data_parallel,
                        micro_batches=args.micro_batches, precision=args.precision, seed=args.seed,
                        snapshots=not args.no_snapshots, window=args.window, persist_dir=args.persist_dir)


if __name__ == "__main__":
    sys.exit(main())
