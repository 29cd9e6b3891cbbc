"""Module boundaries the design relies on, checked on the source's import statements."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "moetion"


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_recovery_never_imports_the_engine():
    for path in sorted((PACKAGE / "recovery").glob("*.py")):
        assert not any(m.startswith("moetion.engine") for m in imported_modules(path)), path.name


def test_the_engine_imports_nothing_from_the_harness():
    for name in ("engine.py", "iteration.py", "replay.py", "boundary.py", "decisions.py"):
        assert not any(m.startswith("moetion.harness") for m in imported_modules(PACKAGE / name)), name


def test_replay_builds_the_same_iteration_body_as_training():
    """One body: neither the engine nor replay runs micro-batches, LR or clipping of its own."""
    for name in ("engine.py", "replay.py"):
        source = (PACKAGE / name).read_text()
        assert "StageIteration(" in source, name
        for arithmetic in ("autograd.backward", "scale_grads", "set_lr_factor", "loss_scale", "fill_missing_grads"):
            assert arithmetic not in source, f"{name} computes {arithmetic} itself"


def test_the_pipelining_adapter_has_no_arithmetic_of_its_own():
    """torch runs the micro-batches; the commit and any replay are StageIteration's, through the engine."""
    source = (PACKAGE / "pipelining.py").read_text()
    assert "PipelineEngine(" in source
    for arithmetic in ("autograd.backward", "set_lr_factor", "fill_missing_grads", "clip_coefficient", "total_norm",
                       ".div_(", "loss_scale"):
        assert arithmetic not in source, f"pipelining.py computes {arithmetic} itself"
