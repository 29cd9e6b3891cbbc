"""The papers' evaluation models on their testbed: 96 A100s, a 12-stage pipeline, 8-way data parallel.

Architecture numbers come from the public model cards; everything the papers do not publish
(iteration times, bandwidths, restart costs, micro-batching) is our choice and is stated in each
docstring. Change them with a JSON spec (``moetion plan --json``) rather than trusting them.

Testbed assumptions (all presets, per GPU):

* device->host 25 GB/s (PCIe 4.0 x16, as the issue states);
* network 3 GB/s left for checkpoint traffic (a 400 Gb/s-per-node fabric shared by 8 GPUs is
  ~6 GB/s each; we assume half of it is free of training traffic);
* disk 0.5 GB/s (a ~4 GB/s node-local NVMe array shared by 8 GPUs);
* respawn of one failed worker 30 s (localized recovery), whole-job restart 120 s (scheduler,
  process-group init, data loader warm-up) — neither is published; both are guesses.
"""
from __future__ import annotations

from typing import Callable

from moetion.errors import ConfigError
from moetion.planner.cost import HardwareSpec, ModelSpec

_TESTBED = dict(device_to_host_gbps=25.0, network_gbps=3.0, disk_gbps=0.5, respawn_s=30.0, restart_s=120.0, gpus=96)


def deepseek_moe_16b() -> tuple[ModelSpec, HardwareSpec]:
    """DeepSeek-MoE 16.4B: 28 layers (27 MoE), hidden 2048, 64 routed experts of 3 x 2048 x 1408 = 8.65M params.

    12 stages: the busiest holds 3 MoE layers = 3 x (64 x 8.65M routed + 17M shared + 17M attention)
    ~ 1.77B params. Micro-batching (8 x 4096 tokens per replica) and the 0.6 s iteration are our
    estimate: 6 x 2.8B active x 262K tokens at ~30% MFU on 96 A100s plus the pipeline bubble.
    """
    return (ModelSpec(name="deepseek-moe-16b", total_params=16.4e9, pipeline_stages=12, experts_per_layer=64,
                      expert_params=8.65e6, moe_layers_per_stage=3, params_per_stage=1.77e9, data_parallel=8,
                      precision="bf16", micro_batches=8, micro_batch_tokens=4096, hidden_size=2048),
            HardwareSpec(iteration_s=0.6, **_TESTBED))


def qwen_moe_14b() -> tuple[ModelSpec, HardwareSpec]:
    """QWen1.5-MoE 14.3B: 24 layers, hidden 2048, 60 routed + 4 shared experts of 8.65M (64 in all, as the paper counts).

    12 stages of 2 MoE layers; the busiest also holds the 151,936 x 2048 embedding: ~1.45B params.
    Iteration 0.5 s (our estimate, same batch as DeepSeek-MoE, fewer layers per stage).
    """
    return (ModelSpec(name="qwen-moe-14b", total_params=14.3e9, pipeline_stages=12, experts_per_layer=64,
                      expert_params=8.65e6, moe_layers_per_stage=2, params_per_stage=1.45e9, data_parallel=8,
                      precision="bf16", micro_batches=8, micro_batch_tokens=4096, hidden_size=2048),
            HardwareSpec(iteration_s=0.5, **_TESTBED))


def gpt_moe() -> tuple[ModelSpec, HardwareSpec]:
    """GPT-MoE with 32 experts: a GPT-3 Medium base (24 layers, hidden 1024) with an MoE FFN every other layer.

    Size is not published in the issue; we assume the DeepSpeed-MoE recipe: experts of
    2 x 1024 x 4096 = 8.4M params, 12 MoE layers -> ~3.6B total; a stage = 1 MoE + 1 dense layer,
    ~0.31B params. Iteration 0.4 s (our guess).
    """
    return (ModelSpec(name="gpt-moe", total_params=3.6e9, pipeline_stages=12, experts_per_layer=32,
                      expert_params=8.4e6, moe_layers_per_stage=1, dense_layers_per_stage=1, params_per_stage=0.31e9,
                      data_parallel=8, precision="bf16", micro_batches=8, micro_batch_tokens=4096, hidden_size=1024),
            HardwareSpec(iteration_s=0.4, **_TESTBED))


def moe_llava() -> tuple[ModelSpec, HardwareSpec]:
    """MoE-LLaVA (Phi-2 2.7B x 4, top-2): 32 layers, hidden 2560, MoE every other layer, 4 experts of 2 x 2560 x 10240 = 52.4M.

    ~5.3B total with the vision tower; the busiest of 12 stages holds 2 MoE + 1 dense layer, ~0.55B
    params. Iteration 0.5 s (our guess; image tokens make micro-batches 8 x 4096 tokens).
    """
    return (ModelSpec(name="moe-llava", total_params=5.3e9, pipeline_stages=12, experts_per_layer=4,
                      expert_params=52.4e6, moe_layers_per_stage=2, dense_layers_per_stage=1, params_per_stage=0.55e9,
                      data_parallel=8, precision="bf16", micro_batches=8, micro_batch_tokens=4096, hidden_size=2560),
            HardwareSpec(iteration_s=0.5, **_TESTBED))


PRESETS: dict[str, Callable[[], tuple[ModelSpec, HardwareSpec]]] = {
    "deepseek-moe-16b": deepseek_moe_16b,
    "qwen-moe-14b": qwen_moe_14b,
    "gpt-moe": gpt_moe,
    "moe-llava": moe_llava,
}


def preset(name: str) -> tuple[ModelSpec, HardwareSpec]:
    """The (model, hardware) pair of a named preset."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
