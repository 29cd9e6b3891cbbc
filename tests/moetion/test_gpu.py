"""The CUDA path (docs/gpu.md): side-stream capture into pinned memory, staged upstream-log copies,
the MoE layer under torch's deterministic mode, and a killed run on one GPU shared by every rank
(MOETION_DEVICE=cuda-shared) that must end bit-identical. Skipped only where CUDA is not available;
tests/moetion/test_device_copy.py checks the same logic on the CPU."""
import pytest
import torch

from logging_store import LogKey
from moetion.demo import DemoSettings
from moetion.device_copy import BufferPool, capture_copier
from moetion.harness.runner import FaultHarness, Job
from moetion.moe import MoELayer
from moetion.random import StepContext, step_context
from moetion.snapshot.capture import CaptureWorker
from moetion.upstream_log import UpstreamLog

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = torch.device("cuda", 0)


def test_pinned_pool_buffers_are_pinned():
    pool = BufferPool(pinned=True)
    buffer = pool.lease(1 << 16)
    assert buffer.is_pinned() and buffer.numel() >= 1 << 16
    pool.release(buffer)


def test_side_stream_capture_sees_the_step_it_follows_and_not_the_next():
    """Captures the values right after a 'step'; the next step's write, queued on the training stream
    after fence_step(), must not reach the capture however long the host side takes."""
    params = [torch.randn(1 << 20, device=DEVICE), torch.randn(257, 3, device=DEVICE)]
    worker = CaptureWorker(copier=capture_copier(DEVICE))
    for step in range(3):
        for p in params:
            p.add_(1.0)  # the optimizer step, on the training stream
        expected = [p.cpu() for p in params]
        destinations = [torch.empty(p.numel() * p.element_size(), dtype=torch.uint8) for p in params]
        worker.submit(list(zip(params, destinations)))
        worker.fence_step()
        for p in params:
            p.mul_(-3.0)  # the next step's writes: ordered after the copies on the GPU
        worker.fence()
        for e, d in zip(expected, destinations):
            assert torch.equal(d.view(e.dtype).view(e.shape), e), f"step {step}"
    assert worker.copier.pool.allocations == 1  # one pinned buffer, recycled
    worker.close()


def test_upstream_log_stages_device_tensors_and_stores_their_exact_bytes():
    log = UpstreamLog(stage=1)
    sent = [torch.randn(64, 32, device=DEVICE).to(torch.bfloat16) for _ in range(4)]
    for m, t in enumerate(sent):
        log.log_activation(0, m, t)
    for m, t in enumerate(sent):
        assert torch.equal(log.store.get(LogKey(0, m, "activation", 2)), t.cpu())
    log.close()


def test_moe_layer_is_deterministic_on_cuda_under_torch_deterministic_mode():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            torch.manual_seed(0)
            moe = MoELayer(64, 128, 8, top_k=2, capacity_factor=1.0).to(DEVICE)
            x = torch.randn(4, 256, 64, device=DEVICE, requires_grad=True)
            with step_context(StepContext(seed=1, iteration=0, micro_batch=0, loss_scale=0.5, layer=0)):
                moe(x).square().sum().backward()
            grads.append([x.grad] + [p.grad for p in moe.parameters() if p.grad is not None])
        assert all(torch.equal(a, b) for a, b in zip(*grads))
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.slow
def test_killed_run_on_one_shared_gpu_is_bit_identical(tmp_path):
    settings = DemoSettings(iterations=10, stages=3, micro_batches=2, window=2, progress=False, lr=1e-2, strict=True)
    env = {"MOETION_DEVICE": "cuda-shared", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    with FaultHarness(Job(demo=settings), work_dir=tmp_path, timeout_s=400, env=env) as harness:
        report = harness.run(["stage=1,iter=6,phase=backward"])
    assert report.verdict.identical, "\n".join(report.lines())
