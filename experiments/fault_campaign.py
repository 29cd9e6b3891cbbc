"""The soak test: seeded random fault campaigns on the built-in model, every run against its
fault-free reference.

For each configuration (stages x data-parallel replicas, precision) the fault-free reference runs
once; then each seed draws 6-10 kills over stages, replicas, iterations and phases
(``moetion.harness.campaign``) and runs the job with them under the recovering supervisor. A row
per seed: the kills (as the ``--kill`` flags that reproduce it), how many fired, the generations
the supervisor published, the verdict, and kill -> all resumed per recovery. The last line says
"K/K bit-identical" and how long the campaign took.

    python experiments/fault_campaign.py --seeds 50            # the full soak (an hour or more here)
    python experiments/fault_campaign.py --seeds 3 --quick     # a smoke run

Writes experiments/results/fault_campaign.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from moetion.demo import DemoSettings
from moetion.errors import MoetionError
from moetion.harness.campaign import CampaignShape, draw_kills
from moetion.harness.runner import FaultHarness, Job

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Configuration:
    name: str
    stages: int
    replicas: int
    precision: str


CONFIGURATIONS = (
    Configuration("4 stages fp32", 4, 1, "fp32"),
    Configuration("3 stages bf16", 3, 1, "bf16"),
    Configuration("2 stages x 2 replicas fp32", 2, 2, "fp32"),
)


def campaign(config: Configuration, seeds: list[int], *, iterations: int, window: int, kills: tuple[int, int]) -> list[dict]:
    settings = DemoSettings(iterations=iterations, stages=config.stages, data_parallel=config.replicas,
                            precision=config.precision, window=window, progress=False, lr=1e-2)
    shape = CampaignShape(stages=config.stages, replicas=config.replicas, iterations=iterations, window=window)
    rows = []
    # Every drawn kill is a replacement: allow them all, and a margin (the supervisor's default is 8).
    with FaultHarness(Job(demo=settings), timeout_s=900, max_restarts=kills[1] + 2) as harness:
        harness.reference()
        for seed in seeds:
            drawn = draw_kills(shape, count=random.Random(seed).randint(*kills), seed=seed)
            flags = " ".join(f"--kill {k.to_text()}" for k in drawn)
            started = time.perf_counter()
            try:
                report = harness.run(drawn)
            except MoetionError as error:
                rows.append({"config": config.name, "seed": seed, "kills": flags, "fired": None, "generations": None,
                             "verdict": f"ERROR: {str(error).splitlines()[0][:200]}", "resumed_s": [],
                             "seconds": time.perf_counter() - started})
                print(_line(rows[-1]), flush=True)
                continue
            rows.append({"config": config.name, "seed": seed, "kills": flags, "fired": len(drawn),
                         "generations": len(report.timelines),
                         "verdict": "BIT-IDENTICAL" if report.verdict.identical else "MISMATCH",
                         "resumed_s": [round(t.total_s, 2) for t in report.timelines if t.total_s is not None],
                         "mismatches": report.verdict.mismatches[:5], "seconds": time.perf_counter() - started})
            print(_line(rows[-1]), flush=True)
    return rows


def _line(row: dict) -> str:
    resumed = ", ".join(f"{s:.1f}" for s in row["resumed_s"]) or "-"
    return (f"{row['config']:<28} seed {row['seed']:3d}  fired {row['fired'] if row['fired'] is not None else '-':>2}  "
            f"generations {row['generations'] if row['generations'] is not None else '-':>2}  {row['verdict']:<14}"
            f"  kill->resumed s: {resumed}\n    {row['kills']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per configuration")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--window", type=int, default=3, help="pinned W, so window-end phases can be aimed")
    parser.add_argument("--quick", action="store_true", help="the first configuration only, 24 iterations, 6 kills")
    args = parser.parse_args()
    os.environ.setdefault("MOETION_LOG_LEVEL", "ERROR")
    configs = CONFIGURATIONS[:1] if args.quick else CONFIGURATIONS
    iterations, kills = (24, (6, 6)) if args.quick else (args.iterations, (6, 10))
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    started = time.perf_counter()
    rows = [row for config in configs
            for row in campaign(config, seeds, iterations=iterations, window=args.window, kills=kills)]
    identical = sum(row["verdict"] == "BIT-IDENTICAL" for row in rows)
    elapsed = time.perf_counter() - started
    print(f"\n{identical}/{len(rows)} bit-identical ({len(configs)} configuration(s) x {len(seeds)} seed(s), "
          f"{sum(r['fired'] or 0 for r in rows)} kills fired, {elapsed / 60:.1f} min)")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "fault_campaign.json"
    out.write_text(json.dumps({"rows": rows, "identical": identical, "runs": len(rows), "seconds": elapsed}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
