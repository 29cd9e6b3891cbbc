"""A user's model whose state is more than its trainable weights (BatchNorm running statistics, a
frozen parameter, an expert-bias buffer moved by an optimizer step pre-hook) recovers bit-identically
from SIGKILLs at forward, backward and step: survivors roll back what the abandoned forwards changed,
replacements restore it from the window and replay it, the verdict compares every buffer."""
import pytest

from moetion.harness.runner import FaultHarness, Job

from layout_script import layout_script

pytestmark = pytest.mark.slow  # real ranks over gloo


def test_buffers_and_an_optimizer_pre_hook_recover_bit_identically_survivors_included(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(layout_script(layers="buffered_layers", stages=3, iterations=10, window=3,
                                    hook="balance_before_each_step"))
    harness = FaultHarness(Job(script=str(script), script_args=[str(tmp_path / "shm")], nproc=3),
                           work_dir=tmp_path / "faults", timeout_s=400)
    report = harness.run(["stage=0,iter=3,phase=forward", "stage=1,iter=6,phase=backward",
                          "stage=2,iter=8,phase=step"])
    assert report.verdict.identical and report.verdict.buffers_equal, "\n".join(report.lines())
    assert len([t for t in report.timelines if not t.superseded]) == 3
    reference, _ = harness.reference()
    assert all(any(k.endswith("norm.running_var") for k in state["buffers"]) for state in reference.values())
