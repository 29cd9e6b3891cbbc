"""The ``moetion`` command line: ``launch``, ``demo``, ``faults``, ``inspect``, ``export``, ``plan`` and ``report``."""
from __future__ import annotations

import argparse
import sys

from moetion.errors import ConfigError, MoetionError
from moetion.faults import PHASE_RULES

DEFAULT_KILL = "stage=2,iter=30,phase=backward"  # the demo's one failure (a middle stage, mid-backward)
KILL_HELP = ("kill spec (repeatable): stage=S,iter=T,phase=P[,replica=R][,memory=lost][,signal=stop]; "
             "S, T, R count from 0. Phase P fires: "
             + "; ".join(f"{phase}: {rule}" for phase, rule in PHASE_RULES.items())
             + ". A kill that never fires fails the run, naming it.")
USAGE_ERROR, RUNTIME_ERROR = 2, 1


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block), so every CLI error reads the same."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="moetion", description="Fault-tolerant pipeline-parallel MoE training")
    commands = parser.add_subparsers(dest="command", required=True)

    launch = commands.add_parser("launch", help="run a training script as N local ranks (torchrun-style env)")
    launch.add_argument("--nproc", type=_int_at_least(1), required=True,
                        help="ranks on this host (the job has nproc x nnodes: stages x data-parallel replicas)")
    launch.add_argument("--timeout", type=_positive_seconds, default=None, help="kill the job after this many seconds")
    launch.add_argument("--resume", action="store_true",
                        help="ask the script to restart from its persisted windows (sets MOETION_RESUME=1)")
    launch.add_argument("--no-recover", action="store_true",
                        help="end the job when a rank dies instead of replacing it")
    launch.add_argument("--max-restarts", type=_int_at_least(0), default=8, help="replacements before the job gives up")
    launch.add_argument("--heartbeat-timeout", type=_positive_seconds, default=30.0,
                        help="seconds without a heartbeat before a live rank counts as hung and is replaced")
    launch.add_argument("--spares", type=_int_at_least(0), default=1,
                        help="warm spare interpreters kept ready to replace a rank (0: start replacements fresh)")
    launch.add_argument("--nnodes", type=_int_at_least(1), default=1, help="hosts in the job (run this command on each)")
    launch.add_argument("--node-rank", type=_int_at_least(0), default=0, help="this host's index; node 0 serves the control store")
    launch.add_argument("--master-addr", default="127.0.0.1", help="node 0's address, reachable from every host")
    launch.add_argument("--master-port", type=_int_at_least(0), default=0,
                        help="the control store's port on node 0 (required with --nnodes > 1)")
    launch.add_argument("--standby", action="store_true",
                        help="join a running multi-host job as a standby host: take over the node rank of a host "
                             "(1 or later) that stops answering (give --nnodes, --master-addr, --master-port; "
                             "not --node-rank)")
    launch.add_argument("script")
    launch.add_argument("script_args", nargs=argparse.REMAINDER)

    demo = commands.add_parser("demo", help="train the built-in MoE model across pipeline-stage processes, "
                                             "kill a stage and recover it")
    _model_options(demo)
    demo.add_argument("--kill", action="append", default=None, metavar="SPEC",
                      help=f"default {DEFAULT_KILL!r}; " + KILL_HELP)
    demo.add_argument("--no-fault", action="store_true", help="train without injecting a failure")
    demo.add_argument("--run-dir", default=None, help="where metrics and the report go "
                                                      "(default moetion-runs/demo-<date>-<time>)")

    faults = commands.add_parser("faults", help="run a job fault-free and with SIGKILLs; compare bit for bit")
    _model_options(faults)
    faults.add_argument("--kill", action="append", default=[], metavar="SPEC",
                        help=KILL_HELP + " Without any: two fault-free runs, the first check of a new model.")
    faults.add_argument("--random-kills", type=_int_at_least(1), default=None, metavar="N",
                        help="also draw N kills at random (seeded by --kill-seed), each where its phase can fire; "
                             "the drawn kills are printed as --kill flags first. With --script, --stages, "
                             "--data-parallel, --iterations (and --window for window-end phases) must describe it")
    faults.add_argument("--kill-seed", type=int, default=0, help="seed of --random-kills")
    faults.add_argument("--script", default=None, help="a training script to run instead of the built-in model")
    faults.add_argument("--nproc", type=_int_at_least(1), default=None, help="ranks of --script")
    faults.add_argument("--timeout", type=_positive_seconds, default=600.0, help="seconds each run may take")
    faults.add_argument("--heartbeat-timeout", type=_positive_seconds, default=30.0,
                        help="seconds without a heartbeat before a rank counts as hung")
    faults.add_argument("--spares", type=int, default=1,
                        help="warm spare interpreters for --script replacements (0: start them fresh)")
    faults.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON")
    faults.add_argument("--quiet", action="store_true", help="no progress bar (there is none unless stderr is a terminal)")
    faults.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments of --script (after --)")

    inspect = commands.add_parser("inspect", help="list persisted snapshot windows per stage and check their integrity")
    inspect.add_argument("dir", help="the directory windows were persisted to")
    inspect.add_argument("--no-verify", action="store_true", help="skip reading blobs and checking checksums")
    inspect.add_argument("--json", action="store_true", help="print one JSON object per window instead of a table")
    inspect.add_argument("--quiet", action="store_true", help="no progress bar (there is none unless stderr is a terminal)")

    export = commands.add_parser("export", help="write a dense torch.save checkpoint from a run's persisted windows")
    export.add_argument("run_dir", help="the run's persist directory (persist_dir/<run_id>, holding config.json)")
    export.add_argument("out", help="the checkpoint file to write (atomically)")
    export.add_argument("--job", required=True, help="package.module:function returning the run's moetion.export.JobSpec")
    export.add_argument("--iteration", type=_int_at_least(0), default=None,
                        help="export the window starting at this iteration (default: newest on all stages)")
    export.add_argument("--optimizer", action="store_true", help="also write each stage's optimizer state")
    export.add_argument("--verify", action="store_true", help="re-read the output and check every checksum")
    export.add_argument("--workers", type=_int_at_least(1), default=None, help="conversion processes (default: one per core)")
    export.add_argument("--dcp", default=None, metavar="DIR", help="also write a torch.distributed.checkpoint directory")
    export.add_argument("--quiet", action="store_true", help="no progress (a bar on a terminal, else a line per stage)")

    plan = commands.add_parser("plan", help="estimate overhead, recovery and ETTR per fault-tolerance approach")
    plan.add_argument("--preset", default=None, help="a paper model: deepseek-moe-16b, qwen-moe-14b, gpt-moe, moe-llava")
    plan.add_argument("--json", default=None, metavar="FILE-or-JSON",
                      help='{"model": {...}, "hardware": {...}}; with --preset, overrides its fields')
    plan.add_argument("--mtbf", required=True, help="mean time between failures of the job, e.g. 10m, 2h, 90s")
    plan.add_argument("--runs", type=_int_at_least(0), default=30, help="Monte-Carlo runs for the simulated ETTR (0: skip)")
    plan.add_argument("--seed", type=int, default=0)
    plan.add_argument("--plot", default=None, metavar="OUT.png", help="draw ETTR vs MTBF (needs matplotlib)")
    plan.add_argument("--calibrate", default=None, metavar="FILE",
                      help="measured fixed costs (experiments/bench_recovery.py writes results/calibration.json)")
    plan.add_argument("--quiet", action="store_true", help="no progress bar (there is none unless stderr is a terminal)")

    report = commands.add_parser("report", help="plot a run's metrics (metrics.dir) and summarize it")
    report.add_argument("run_dir", help="the run directory (the config's metrics.dir, holding metrics/rank-<N>.jsonl)")
    report.add_argument("--out", default=None, metavar="DIR", help="where to write the PNGs and summary.txt "
                                                                   "(default RUN_DIR/report)")

    args = parser.parse_args(argv)
    try:
        _draw_random_kills(args)
        _check_before_start(args)
    except ConfigError as error:  # the command line itself is wrong: nothing has started
        print(f"moetion {args.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    try:
        if args.command == "launch":
            from moetion.launcher import Nodes, launch_script

            nodes = Nodes(nnodes=args.nnodes, node_rank=args.node_rank, master_addr=args.master_addr,
                          master_port=args.master_port)
            launch_script(args.script, args.script_args, nproc=args.nproc, timeout_s=args.timeout, resume=args.resume,
                          recover=not args.no_recover, max_restarts=args.max_restarts,
                          heartbeat_timeout_s=args.heartbeat_timeout, nodes=nodes, spares=args.spares,
                          standby=args.standby)
        elif args.command == "inspect":
            from pathlib import Path

            from moetion.snapshot.inspect import inspect_command

            return inspect_command(Path(args.dir), verify=not args.no_verify, as_json=args.json, quiet=args.quiet)
        elif args.command == "export":
            from moetion.export import export_command

            export_command(args.run_dir, args.out, job=args.job, iteration=args.iteration,
                           with_optimizer=args.optimizer, verify=args.verify, workers=args.workers, dcp_dir=args.dcp,
                           quiet=args.quiet)
        elif args.command == "plan":
            from moetion.planner.cli import plan_command

            return plan_command(preset_name=args.preset, spec=args.json, mtbf=args.mtbf, runs=args.runs,
                                seed=args.seed, plot=args.plot, quiet=args.quiet,
                                calibrate=args.calibrate)
        elif args.command == "report":
            from moetion.report import report_command

            return report_command(args.run_dir, args.out)
        elif args.command == "faults":
            from moetion.harness.runner import faults_command

            return faults_command(_demo_settings(args), kills=args.kill, script=args.script, nproc=args.nproc,
                                  script_args=[a for a in args.script_args if a != "--"], timeout_s=args.timeout,
                                  heartbeat_timeout_s=args.heartbeat_timeout, json_out=args.json,
                                  spares=args.spares, quiet=args.quiet)
        else:
            import time

            from moetion.demo import run_demo

            settings = _demo_settings(args)
            settings.run_dir = args.run_dir or time.strftime("moetion-runs/demo-%Y%m%d-%H%M%S")
            summary = run_demo(settings, kills=_demo_kills(args))
            if summary.get("identical") is False:
                return 2  # as `moetion faults`: the faulty run differs from the fault-free one
    except (MoetionError, OSError) as error:
        print(f"moetion {args.command}: error: {error}", file=sys.stderr)
        return RUNTIME_ERROR
    return 0


def _draw_random_kills(args: argparse.Namespace) -> None:
    """``faults --random-kills N``: adds the drawn kills to ``--kill`` and prints them as flags."""
    if args.command != "faults" or args.random_kills is None:
        return
    from moetion.harness.campaign import CampaignShape, draw_kills

    shape = CampaignShape(stages=args.stages, replicas=args.data_parallel, iterations=args.iterations,
                          window=args.window)
    drawn = [k.to_text() for k in draw_kills(shape, count=args.random_kills, seed=args.kill_seed)]
    print(f"moetion faults: {len(drawn)} kill(s) drawn with --kill-seed {args.kill_seed}: "
          + " ".join(f"--kill {k}" for k in drawn), flush=True)
    args.kill = list(args.kill) + drawn


def _check_before_start(args: argparse.Namespace) -> None:
    """Checks what can be checked against the job before any process starts (ConfigError if wrong)."""
    if args.command == "launch" and args.standby:
        if args.node_rank:
            raise ConfigError("--standby takes the node rank of the host it replaces: drop --node-rank")
        if args.nnodes < 2:
            raise ConfigError("--standby joins a multi-host job: give its --nnodes (>= 2), --master-addr and --master-port")
    if args.command not in ("demo", "faults"):
        return
    from moetion.faults import KillSpec
    from moetion.harness.runner import Job

    if args.command == "faults" and args.script:
        job = Job(script=args.script, script_args=args.script_args, nproc=args.nproc)
    else:
        settings = _demo_settings(args)
        settings.check()
        job = Job(demo=settings)
    kills = (_demo_kills(args) or []) if args.command == "demo" else args.kill
    try:
        job.check_kills([KillSpec.parse(k) for k in kills])
    except ConfigError as error:
        raise ConfigError(f"--kill: {error}") from None


def _demo_kills(args: argparse.Namespace) -> list[str] | None:
    return None if args.no_fault else (args.kill or [DEFAULT_KILL])


def _model_options(parser: argparse.ArgumentParser) -> None:
    """The built-in model's settings, shared by ``demo`` and ``faults``."""
    parser.add_argument("--iterations", type=_int_at_least(1), default=50)
    parser.add_argument("--stages", type=_int_at_least(1), default=4)
    parser.add_argument("--data-parallel", type=_int_at_least(1), default=1)
    parser.add_argument("--expert-parallel", type=_int_at_least(1), default=1,
                        help="split each MoE layer's experts over this many of a stage's data-parallel replicas "
                             "(DeepSpeed's ep_size; must divide --data-parallel and the experts)")
    parser.add_argument("--micro-batches", type=_int_at_least(1), default=4)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=_int_at_least(1), default=None, help="pin the sparse-checkpoint window W (default: Algorithm 1)")
    parser.add_argument("--persist-dir", default=None, help="also persist complete windows there (see `moetion inspect`)")
    parser.add_argument("--no-snapshots", action="store_true", help="train without sparse checkpointing")
    parser.add_argument("--strict", action="store_true", help="refuse ops without a deterministic implementation "
                        "(determinism.strict; what bitwise replay on CUDA needs, see docs/gpu.md)")


def _demo_settings(args: argparse.Namespace):
    from moetion.demo import DemoSettings

    return DemoSettings(iterations=args.iterations, stages=args.stages, data_parallel=args.data_parallel,
                        expert_parallel=args.expert_parallel, micro_batches=args.micro_batches, precision=args.precision,
                        seed=args.seed, snapshots=not args.no_snapshots, window=args.window, persist_dir=args.persist_dir,
                        strict=args.strict)


if __name__ == "__main__":
    sys.exit(main())
