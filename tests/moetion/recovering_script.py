"""A small training script for tests that launch real processes under moetion's supervisor."""
import textwrap


def recovering_script(*, stages: int, iterations: int, tail: str = "") -> str:
    """A ``stages``-stage GPT-MoE script with snapshots (W=2, shm dir from argv[1]) and upstream
    logging, training until ``engine.iteration`` reaches ``iterations``, then running ``tail``."""
    return textwrap.dedent(f'''
        import hashlib, json, sys, torch, moetion
        from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss
        model = GPTMoEConfig(seq_len=8, d_model=16, n_heads=2, n_layers={stages}, d_hidden=16, num_experts=2)
        module = moetion.PipelineModule(build_gpt_moe_layers(model), {stages}, loss_fn=gpt_moe_loss)
        engine = moetion.initialize(module, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2), config={{
            "micro_batches": 2, "snapshot": {{"enabled": True, "window": 2, "shm_dir": sys.argv[1]}},
            "upstream_log": {{"enabled": True}}}})
        data = moetion.ByteCorpus(bytes(range(256)) * 8, seq_len=8, micro_batch_size=2)
        while engine.iteration < {iterations}:  # a replacement starts mid-run: count from the engine
            engine.train_batch(data)
        engine.close()
    ''') + textwrap.dedent(tail)
