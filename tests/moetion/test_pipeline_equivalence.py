"""A pipeline run (real processes, gloo) equals single-process training bit for bit.

Dropout and router noise on, capacity dropping and clipping active, warm-up then cosine LR, and
an LR of 1e-2 so that one step visibly moves every weight.
"""
import pytest
import torch

import moetion
from moetion.launcher import run_workers
from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss
from moetion.reference import train_reference

pytestmark = pytest.mark.slow  # real ranks over gloo

ITERATIONS = 6
MODEL = GPTMoEConfig(seq_len=16, d_model=32, n_heads=2, n_layers=4, d_hidden=64, num_experts=4,
                     top_k=2, capacity_factor=1.0, router_noise=0.1, dropout=0.1)


def engine_config(precision: str) -> moetion.Config:
    return moetion.Config.from_dict({
        "seed": 3, "micro_batches": 4, "precision": precision, "grad_clip": 0.5, "threads": 1,
        "lr_schedule": {"warmup_iterations": 2, "decay": "cosine", "decay_iterations": 4, "min_ratio": 0.1},
    })


def optimizer(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def data():
    return moetion.ByteCorpus(moetion.data.stdlib_corpus(max_bytes=1 << 18), seq_len=MODEL.seq_len,
                              micro_batch_size=4, seed=5)


def pipeline_rank(num_stages: int, precision: str) -> dict:
    module = moetion.PipelineModule(build_gpt_moe_layers(MODEL), num_stages, loss_fn=gpt_moe_loss, seed=11)
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    engine = moetion.initialize(module, optimizer=optimizer, config=engine_config(precision))
    source = data()
    losses, clip, dropped = [], [], 0
    for _ in range(ITERATIONS):
        losses.append(engine.train_batch(source))
        clip.append(engine.last_stats.clip_coef)
        for name, counts in engine.expert_token_counts().items():
            routed = 4 * 4 * MODEL.seq_len * MODEL.top_k  # micro-batches x rows x tokens x choices
            assert counts.sum() == routed, f"{name} counted {counts.tolist()}"
        dropped += sum(int(m.last_dropped) for m in engine.precision.compute.modules()
                       if isinstance(m, moetion.moe.MoELayer))
    return {"stage": engine.stage, "replica": engine.dist.replica, "losses": losses, "clip": clip,
            "dropped": dropped, "initial": initial, "model": module.state_dict(),
            "optim": engine.optimizer.state_dict()}


def reference(num_stages: int, data_parallel: int, precision: str) -> dict:
    run = train_reference(layers=build_gpt_moe_layers(MODEL), num_stages=num_stages, loss_fn=gpt_moe_loss,
                          optimizer=optimizer, config=engine_config(precision), data=data(),
                          iterations=ITERATIONS, data_parallel=data_parallel, module_seed=11)
    return {"losses": run.losses, "models": [s.state_dict() for s in run.stages],
            "optims": [o.state_dict() for o in run.optimizers]}


def assert_equal_states(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key in actual:
        a, e = actual[key], expected[key]
        if isinstance(a, dict):
            assert_equal_states(a, e, f"{what}.{key}")
        elif isinstance(a, torch.Tensor):
            assert a.dtype == e.dtype and torch.equal(a, e), (
                f"{what}.{key} differs: max |diff| {(a.double() - e.double()).abs().max():.3e}")
        elif not isinstance(a, list):
            assert a == e, f"{what}.{key}: {a} != {e}"


def check_against_reference(num_stages: int, data_parallel: int, precision: str) -> None:
    ranks = run_workers(pipeline_rank, nproc=num_stages * data_parallel, args=(num_stages, precision), timeout_s=120)
    expected = run_workers(reference, nproc=1, args=(num_stages, data_parallel, precision), timeout_s=120)[0]
    for rank in ranks:
        where = f"stage {rank['stage']} replica {rank['replica']}"
        assert rank["losses"] == expected["losses"], where
        assert_equal_states(rank["model"], expected["models"][rank["stage"]], f"{where} weights")
        assert_equal_states(rank["optim"]["state"], expected["optims"][rank["stage"]]["state"], f"{where} optimizer")
        moved = [not torch.allclose(rank["initial"][k], v, atol=1e-3) for k, v in rank["model"].items()]
        assert all(moved), f"{where}: some weights did not visibly move; the test could not see a step"
    assert min(min(r["clip"]) for r in ranks) < 1.0, "clipping never engaged"
    assert sum(r["dropped"] for r in ranks) > 0, "capacity dropping never engaged"
    assert expected["losses"][-1] < expected["losses"][0]


def test_four_stage_pipeline_equals_single_process_training():
    check_against_reference(num_stages=4, data_parallel=1, precision="fp32")


def test_two_stages_times_two_replicas_equal_single_process_training():
    check_against_reference(num_stages=2, data_parallel=2, precision="fp32")


def test_bf16_compute_with_fp32_masters_equals_single_process_training():
    check_against_reference(num_stages=4, data_parallel=1, precision="bf16")
