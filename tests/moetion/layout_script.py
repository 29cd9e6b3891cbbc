"""A training script over the models of ``layout_models.py``, for the fault harness (real processes
under moetion's supervisor): ``layers`` names a function there, ``hook`` one that takes (optimizer,
module) and registers what the user would (an optimizer step pre-hook, ...)."""
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent


def layout_script(*, layers: str, stages: int, iterations: int, window: int, hook: str | None = None,
                  optimizer: str = "torch.optim.AdamW(ps, lr=1e-2)") -> str:
    return textwrap.dedent(f'''
        import sys, torch, moetion
        sys.path.insert(0, {str(HERE)!r})
        import layout_models as models
        module = moetion.PipelineModule(models.{layers}({stages}), {stages}, loss_fn=models.mse, partition_method="uniform")
        engine = moetion.initialize(module, optimizer=lambda ps: {optimizer}, config={{
            "micro_batches": 2, "snapshot": {{"enabled": True, "window": {window}, "shm_dir": sys.argv[1]}},
            "upstream_log": {{"enabled": True}}}})
        {f"models.{hook}(engine.optimizer, module)" if hook else ""}
        data = models.RegressionData()
        while engine.iteration < {iterations}:
            engine.train_batch(data)
        engine.close()
    ''')
