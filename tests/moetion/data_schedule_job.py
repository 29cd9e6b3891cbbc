"""One small training job over the user-facing data forms and torch schedulers, shared by the
pipeline-vs-reference, fault-harness and restart tests (importable by forked ranks and scripts).

Item ``i`` of the numbered dataset starts with token ``i``, so the ids a stage read can be checked
from the tensors themselves.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, OneCycleLR, ReduceLROnPlateau, SequentialLR
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

import moetion
from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss

SEQ_LEN, MICRO_BATCHES, MICRO_BATCH_SIZE = 8, 2, 2
MODEL = GPTMoEConfig(seq_len=SEQ_LEN, d_model=16, n_heads=2, n_layers=3, d_hidden=32, num_experts=2, dropout=0.1)


class Numbered(Dataset):
    """``n`` token sequences; sequence ``i`` starts with token ``i`` (so ``n <= 256``)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        rest = torch.randint(0, 256, (SEQ_LEN,), generator=torch.Generator().manual_seed(1000 + i))
        tokens = torch.cat([torch.tensor([i]), rest])
        return tokens[:-1], tokens[1:]


def write_token_file(path: Path) -> Path:
    tokens = torch.randint(0, 256, (1500,), generator=torch.Generator().manual_seed(9)).numpy().astype(np.uint16)
    tokens.tofile(path)
    return path


def data(form: str, token_path: str | None = None, *, items: int = 24):
    """The data of ``form``: an addressable source, or for ``"loader"`` a torchdata
    ``StatefulDataLoader`` (one epoch: it runs out after ``items // 4`` iterations)."""
    per_iteration = MICRO_BATCHES  # one replica
    if form == "loader":
        return StatefulDataLoader(Numbered(items), batch_size=MICRO_BATCH_SIZE, shuffle=True, drop_last=True,
                                  generator=torch.Generator().manual_seed(4))
    if form == "dataset":  # 24 items / (2 x 2) = 6 iterations an epoch
        return moetion.DatasetSource(Numbered(items), micro_batch_size=MICRO_BATCH_SIZE,
                                     micro_batches_per_iteration=per_iteration, shuffle=True, seed=4)
    return moetion.token_file_source(token_path, dtype="uint16", seq_len=SEQ_LEN, stride=5,
                                     micro_batch_size=MICRO_BATCH_SIZE, micro_batches_per_iteration=per_iteration, seed=4)


def train_batch(engine, source) -> float:
    """One iteration over ``source``: a loader goes in as ``data_iter`` (DeepSpeed's name)."""
    if isinstance(source, (StatefulDataLoader, RecordingLoader)):
        return engine.train_batch(data_iter=source)
    return engine.train_batch(source)


class RecordingLoader:
    """A user's own resumable loader around a StatefulDataLoader that records the first token of
    each row by (iteration, micro-batch), counting its pulls (its state: the base's and the count)."""

    def __init__(self, base) -> None:
        self.base, self.pulled, self.read = base, 0, {}

    def state_dict(self) -> dict:
        return {"base": self.base.state_dict(), "pulled": self.pulled}

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state["base"])
        self.pulled = state["pulled"]

    def __iter__(self):
        for inputs, labels in self.base:
            t, m = divmod(self.pulled, MICRO_BATCHES)
            self.pulled += 1
            self.read.setdefault(t, {})[m] = inputs[:, 0].tolist()
            yield inputs, labels


class OneBatchOff:
    """A loader that resumes one micro-batch past where it was told: a replacement continuing
    from the wrong loader position."""

    def __init__(self, base) -> None:
        self.base = base

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)

    def __iter__(self):
        batches = iter(self.base)
        next(batches)
        return batches


def warmup_cosine(opt):
    return SequentialLR(opt, [LambdaLR(opt, lambda t: (t + 1) / 3), CosineAnnealingLR(opt, T_max=10, eta_min=1e-3)],
                        milestones=[3])


def one_cycle(opt):
    return OneCycleLR(opt, max_lr=2e-2, total_steps=20)


def plateau(opt):
    return ReduceLROnPlateau(opt, patience=0, factor=0.5, threshold=0.05)


SCHEDULERS = {"warmup_cosine": warmup_cosine, "one_cycle": one_cycle, "plateau": plateau}


def optimizer(params):
    return torch.optim.AdamW(params, lr=1e-2)


def config(**extra) -> dict:
    return {"seed": 3, "micro_batches": MICRO_BATCHES, "grad_clip": 1.0, "threads": 1, **extra}


def build(stages: int, scheduler: str, **extra):
    module = moetion.PipelineModule(build_gpt_moe_layers(MODEL), stages, loss_fn=gpt_moe_loss, seed=2)
    engine = moetion.initialize(module, optimizer=optimizer, config=config(**extra),
                                lr_scheduler=SCHEDULERS[scheduler])
    return module, engine


def script_main() -> None:
    """``python data_schedule_job.py SHM_DIR FORM SCHEDULER ITERATIONS TOKEN_PATH FLAG_DIR`` under the
    harness. The ``loader`` form trains until its loader runs out (after ITERATIONS); a replacement's
    loader resumes one batch off (``OneBatchOff``) when ``FLAG_DIR/wrong-position`` exists."""
    shm, form, scheduler, iterations, token_path, flags = sys.argv[1:7]
    _, engine = build(3, scheduler, snapshot={"enabled": True, "window": 2, "shm_dir": shm},
                      upstream_log={"enabled": True})
    if form != "loader":
        source = data(form, token_path)
        while engine.iteration < int(iterations):
            engine.train_batch(source)
        engine.close()
        return
    loader = data(form, items=4 * int(iterations))  # exactly ITERATIONS: the run ends when it runs out
    if (Path(flags) / "wrong-position").exists() and moetion.control.start_generation() > 0:
        loader = OneBatchOff(loader)
    while True:  # a DeepSpeed-style loop: every rank, a replacement too, stops at the same boundary
        try:
            engine.train_batch(data_iter=loader)
        except moetion.DataExhausted:
            break
    engine.close()


if __name__ == "__main__":
    script_main()
