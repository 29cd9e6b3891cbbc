"""`moetion faults` on a user's training script: replacements are fresh interpreters started by the
supervisor (as under `moetion launch`), and the verdict is the process's exit status."""
import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import sys, torch, moetion
    from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss
    model = GPTMoEConfig(seq_len=8, d_model=16, n_heads=2, n_layers=3, d_hidden=16, num_experts=2)
    module = moetion.PipelineModule(build_gpt_moe_layers(model), 3, loss_fn=gpt_moe_loss)
    engine = moetion.initialize(module, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2), config={
        "micro_batches": 2, "snapshot": {"enabled": True, "window": 2, "shm_dir": sys.argv[1]},
        "upstream_log": {"enabled": True}})
    data = moetion.ByteCorpus(bytes(range(256)) * 8, seq_len=8, micro_batch_size=2)
    while engine.iteration < 9:  # a replacement starts mid-run: count from the engine
        engine.train_batch(data)
    engine.close()
''')


def faults(tmp_path, *kills):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    command = [sys.executable, "-m", "moetion.cli", "faults", "--script", str(script), "--nproc", "3",
               "--json", str(tmp_path / "report.json")]
    for kill in kills:
        command += ["--kill", kill]
    return subprocess.run(command + ["--", str(tmp_path / "shm")], capture_output=True, text=True, timeout=240)


def test_a_script_killed_mid_backward_recovers_bit_identically(tmp_path):
    result = faults(tmp_path, "stage=1,iter=5,phase=backward")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BIT-IDENTICAL to the fault-free run" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    (timeline,) = report["timelines"]
    assert report["identical"] and timeline["sources"] == {"1": "shm"} and timeline["survivor_lost_iterations"] == 0
    assert timeline["replayed_stage_iterations"] >= 1


def test_a_bad_kill_spec_is_a_clear_error(tmp_path):
    result = faults(tmp_path, "stage=1,iter=5,phase=lunch")
    assert result.returncode == 1 and "phase must be one of" in result.stderr
