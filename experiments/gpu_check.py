"""The GPU check of docs/gpu.md in one run: the demo on CUDA with a kill (bitwise verdict), then
bench_overhead.py's snapshot table on CUDA; one JSON summary.

Run by experiments/gpu_check.sh (which sets the environment first). ``--device cpu`` runs the same
steps on the CPU with small settings, to check this script where there is no GPU.

Every part runs in its own child process with a time limit, so that a hang or a crash in one is
recorded in the summary and the next still runs. This process never starts CUDA: it forks the
demo's ranks, and a CUDA runtime started before a fork is unusable in the children.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

DEMO_KILL = "stage=1,iter=12,phase=backward"


def parts(device: str, *, quick: bool, out: Path) -> dict[str, tuple[list[str], float]]:
    """name -> (command, seconds it may take): together under 8 minutes on a GPU machine, where
    process start-up with CUDA dominates these small models."""
    iterations = "6" if quick else "20"
    demo = [sys.executable, "-m", "moetion.cli", "demo", "--iterations", iterations, "--stages", "2" if quick else "3",
            "--micro-batches", "2", "--window", "2", "--strict", "--kill", "stage=1,iter=3,phase=backward" if quick else DEMO_KILL, "--run-dir", str(out / "demo-run")]
    bench = [sys.executable, str(HERE / "bench_overhead.py"), "--only", "snapshots", "--device", device,
             "--stages", "2" if quick else "4", "--windows", "4", "--dcp-every", "10"]
    bench += ["--quick"] if quick else ["--iterations", "20", "--warmup", "4", "--rounds", "2"]
    return {"demo_with_kill": (demo, 200.0 if quick else 170.0), "bench_overhead": (bench, 400.0 if quick else 250.0)}


def run_part(name: str, command: list[str], *, timeout_s: float, env: dict[str, str], out: Path) -> dict:
    start = time.monotonic()
    log = out / f"{name}.log"
    with log.open("w") as sink:
        try:
            rc = subprocess.run(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = None
    text = log.read_text(errors="replace")
    return {"command": " ".join(command), "rc": rc, "timed_out": rc is None,
            "seconds": round(time.monotonic() - start, 1), "log": str(log), "tail": text[-3000:]}


def demo_verdict(tail: str) -> str | None:
    """The harness's verdict line ("BIT-IDENTICAL" or "MISMATCH"), as the demo printed it."""
    for word in ("BIT-IDENTICAL", "MISMATCH"):
        if word in tail:
            return word
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cuda-shared", "cpu"], default="cuda-shared",
                        help="cuda-shared: every rank on GPU 0 over gloo (a one-GPU machine); cpu: check this script")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results" / "gpu_check"))
    parser.add_argument("--quick", action="store_true", help="the smallest settings (for checking the script)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MOETION_DEVICE": args.device, "PYTHONPATH": f"{ROOT}:{HERE}"}
    summary: dict = {"device": args.device, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "environment": environment(env), "parts": {}}
    for name, (command, timeout_s) in parts(args.device, quick=args.quick, out=out).items():
        print(f"gpu_check: {name} (at most {timeout_s:.0f} s): {' '.join(command)}", flush=True)
        result = run_part(name, command, timeout_s=timeout_s, env=env, out=out)
        summary["parts"][name] = result
        print(f"gpu_check: {name} rc={result['rc']} in {result['seconds']} s", flush=True)
    demo = summary["parts"]["demo_with_kill"]
    demo["verdict"] = demo_verdict(demo["tail"])
    bench_json = HERE / "results" / "bench_overhead_snapshots.json"
    if summary["parts"]["bench_overhead"]["rc"] == 0 and bench_json.exists():
        summary["parts"]["bench_overhead"]["results"] = json.loads(bench_json.read_text())
    summary["passed"] = demo["verdict"] == "BIT-IDENTICAL" and all(p["rc"] == 0 for p in summary["parts"].values())
    path = out / "gpu_check.json"
    path.write_text(json.dumps(summary, indent=2))
    print(f"gpu_check: demo verdict {demo['verdict']}; {'PASSED' if summary['passed'] else 'FAILED'}; wrote {path}",
          flush=True)
    return 0 if summary["passed"] else 1


def environment(env: dict[str, str]) -> dict:
    """torch, CUDA and the GPU, asked in a child process (this one must not start CUDA)."""
    probe = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
             "'cuda': torch.version.cuda, 'available': c, 'gpus': torch.cuda.device_count(), "
             "'name': torch.cuda.get_device_name(0) if c else None}))")
    try:
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=30)
        return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-500:]}
    except (subprocess.TimeoutExpired, ValueError) as error:
        return {"error": str(error)}


if __name__ == "__main__":
    sys.exit(main())
