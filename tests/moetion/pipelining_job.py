"""A torch.distributed.pipelining job with moetion attached, run as a script under the fault harness.

argv: shared-memory dir, schedule ("gpipe" or "1f1b"), iterations, and optionally a log-entry
perturbation flag file (negative control: the replacement replays one logged gradient nudged).
"""
import sys
from pathlib import Path

from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipelining_models as pm  # noqa: E402

from moetion import pipelining  # noqa: E402

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def config(shm_dir: str) -> dict:
    return {"seed": 3, "micro_batches": pm.MICRO_BATCHES, "grad_clip": 0.3, "threads": 1,
            "lr_schedule": {"warmup_iterations": 2, "decay": "cosine", "decay_iterations": 6},
            "snapshot": {"enabled": True, "window": 2, "shm_dir": shm_dir}, "upstream_log": {"enabled": True}}


def main(shm_dir: str, kind: str, iterations: int) -> None:
    job = pipelining.join(config(shm_dir))
    module = pm.stage_module(job.stage, job.num_stages, dropout=0.2)
    stage = pipelining.LoggedStage(module, job.stage, job.num_stages, job.device, input_args=pm.example(job.stage),
                                   output_args=pm.example(job.stage + 1))
    schedule = SCHEDULES[kind](stage, n_microbatches=pm.MICRO_BATCHES, loss_fn=pm.loss_fn)
    engine = pipelining.attach(job, stage, schedule, optimizer=pm.optimizer(module), loss_fn=pm.loss_fn)
    data = pm.data(iterations)
    while engine.iteration < iterations:  # a replacement starts mid-run: count from the engine
        engine.train_batch(data)
    engine.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
