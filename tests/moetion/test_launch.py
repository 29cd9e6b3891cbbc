"""`moetion launch` and `torchrun` start the same unmodified script; failures are reported by rank."""
import re
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # real ranks over gloo

SCRIPT = textwrap.dedent('''
    import sys, torch, moetion
    from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss
    model = GPTMoEConfig(seq_len=8, d_model=16, n_heads=2, n_layers=2, d_hidden=16, num_experts=2)
    module = moetion.PipelineModule(build_gpt_moe_layers(model), 2, loss_fn=gpt_moe_loss)
    engine = moetion.initialize(module, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2),
                                config={"micro_batches": 2})
    data = moetion.ByteCorpus(bytes(range(256)) * 8, seq_len=8, micro_batch_size=2)
    if sys.argv[1:] == ["--fail"] and engine.dist.rank == 1:
        raise SystemExit("rank 1 gives up")
    losses = [engine.train_batch(data) for _ in range(3)]
    print(f"rank {engine.dist.rank} losses {losses}", flush=True)
''')


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train.py"
    path.write_text(SCRIPT)
    return path


def losses_by_rank(stdout: str) -> dict[str, str]:
    """Parsed by pattern, not by line: two ranks writing to one pipe may interleave lines."""
    return dict(re.findall(r"rank (\d+) losses (\[[^\]]*\])", stdout))


def test_same_script_same_losses_under_moetion_launch_and_torchrun(script):
    ours = subprocess.run([sys.executable, "-m", "moetion.cli", "launch", "--nproc", "2", str(script)],
                          capture_output=True, text=True, timeout=120)
    assert ours.returncode == 0, ours.stderr
    theirs = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)],
                            capture_output=True, text=True, timeout=120)
    assert theirs.returncode == 0, theirs.stderr
    assert losses_by_rank(ours.stdout) == losses_by_rank(theirs.stdout)
    assert len(losses_by_rank(ours.stdout)) == 2


def test_failing_rank_is_named_and_the_exit_code_is_nonzero(script):
    result = subprocess.run([sys.executable, "-m", "moetion.cli", "launch", "--nproc", "2", str(script), "--fail"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "rank 1: exited with code 1" in result.stderr


def test_missing_script_is_an_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "moetion.cli", "launch", "--nproc", "2", str(tmp_path / "nope.py")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "does not exist" in result.stderr


RESUMABLE = textwrap.dedent('''
    import sys, torch, moetion
    from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss
    model = GPTMoEConfig(seq_len=8, d_model=16, n_heads=2, n_layers=2, d_hidden=16, num_experts=2)
    module = moetion.PipelineModule(build_gpt_moe_layers(model), 2, loss_fn=gpt_moe_loss)
    engine = moetion.initialize(module, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2), config={
        "micro_batches": 2, "snapshot": {"enabled": True, "window": 2, "run_id": "resumable",
        "shm_dir": sys.argv[1] + "/shm", "persist_dir": sys.argv[1] + "/disk"}, "upstream_log": {"enabled": True}})
    data = moetion.ByteCorpus(bytes(range(256)) * 8, seq_len=8, micro_batch_size=2)
    start = engine.load_checkpoint(data) if moetion.resume_requested() else 0
    for _ in range(start, 8):
        engine.train_batch(data)
    engine.close()
    print(f"rank {engine.dist.rank} started at {start}", flush=True)
''')


def test_launch_resume_restarts_from_persisted_windows(tmp_path):
    script = tmp_path / "resumable.py"
    script.write_text(RESUMABLE)
    command = [sys.executable, "-m", "moetion.cli", "launch", "--nproc", "2", str(script), str(tmp_path)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "started at 0" in first.stdout
    again = subprocess.run(command[:4] + ["--resume"] + command[4:], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    starts = set(re.findall(r"started at (\d+)", again.stdout))
    assert len(starts) == 1 and int(starts.pop()) > 0, again.stdout
