"""On CPU the automatic window is sized from CPU time, so time the training thread spends off the
CPU (preempted on a loaded machine; a sleep here) buys the snapshot threads no extra bytes."""
import time

import torch

from moetion.config import SnapshotConfig
from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss
from moetion.module import PipelineModule
from moetion.snapshot.checkpointer import CPU_BUDGET_FRACTION, SparseCheckpointer, StageIdentity

OFF_CPU_S = 0.3


def test_time_off_the_cpu_does_not_shrink_the_automatic_window(tmp_path):
    module = PipelineModule(build_gpt_moe_layers(GPTMoEConfig(n_layers=2, num_experts=3)), 1,
                            loss_fn=gpt_moe_loss, stage_id=0)
    dense = sum(p.numel() * 12 for p in module.parameters())  # fp32 weight + Adam's two moments
    # A rate at which a wall-clock budget (fraction x 0.3 s) would fit two dense snapshots per
    # iteration, i.e. W = 1; the training thread's CPU in that iteration is far below 0.15 s.
    gbps = 2 * dense / (CPU_BUDGET_FRACTION * OFF_CPU_S) / 1e9
    checkpointer = SparseCheckpointer(
        master=module, compute=module, optimizer=torch.optim.Adam(module.parameters()),
        config=SnapshotConfig(enabled=True, shm_dir=str(tmp_path / "shm"), bandwidth_gbps=gbps),
        identity=StageIdentity(run_id="budget", job_nonce="n", stage=0, replica=0, data_parallel=1,
                               threads=1, precision="fp32"))
    try:
        checkpointer.begin_iteration(0)
        time.sleep(OFF_CPU_S)
        proposal = int(checkpointer.dp_payload({})[0])
    finally:
        checkpointer.close()
    assert proposal > 1
