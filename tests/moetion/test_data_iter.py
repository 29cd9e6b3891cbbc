"""``train_batch(data_iter=...)`` in one process: the adapter's reading order, its position in the
window, resuming a real torchdata StatefulDataLoader, the end of data, and bad input as one line."""
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

import moetion
from moetion.launcher import run_workers
from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss
from moetion.data_iter import STATE_KEY, DataExhausted, IteratorSource, restore_data_position
from moetion.errors import DataError

M = 2  # micro-batches an iteration


def pairs(n):
    """``n`` (input, label) items; item ``i``'s input is ``[i, i]``."""
    return [(torch.tensor([i, i]), torch.tensor(i)) for i in range(n)]


def loader(n=20, **options):
    return StatefulDataLoader(pairs(n), batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(7), **options)


def read(source, iteration):
    """An iteration as the body reads it: its micro-batches, then the next one ahead."""
    batches = [source.micro_batch(iteration, m) for m in range(M)]
    more = source.read_ahead(iteration + 1, list(range(M)))
    return batches, more


def test_an_iteration_rerun_after_a_lost_peer_gets_the_same_micro_batches():
    source = IteratorSource(loader(), where="stage 0")
    first, _ = read(source, 0)
    again = [source.micro_batch(0, m) for m in range(M)]  # the abandoned iteration, re-run
    assert all(a is b for a, b in zip(first, again))
    ahead = source.micro_batch(1, 0)
    assert source.micro_batch(1, 0) is ahead, "read ahead once, not twice"
    with pytest.raises(DataError, match="read in iteration order"):
        source.micro_batch(3, 0)


@pytest.mark.parametrize("workers", [0, 2])  # 2: reading off the training thread, in worker processes
def test_a_restored_stateful_dataloader_continues_from_exactly_the_next_batch(workers):
    trained = IteratorSource(loader(num_workers=workers), where="stage 0")
    for t in range(3):
        read(trained, t)
    state = trained.window_state()  # as a window's first capture after step 2 takes it
    assert state["iteration"] == 3
    expected = [trained.micro_batch(t, m) for t in (3, 4) for m in range(M)]
    replacement = IteratorSource(loader(num_workers=workers), where="stage 0")  # a fresh process builds it again
    replacement.restore(state, first_iteration=3)
    got = [replacement.micro_batch(t, m) for t in (3, 4) for m in range(M)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, expected))
    fresh = IteratorSource(loader(), where="stage 0")
    assert not torch.equal(fresh.micro_batch(0, 0)[0], expected[0][0]), "the position mattered"


def test_the_end_of_data_is_known_one_iteration_ahead():
    source = IteratorSource(loader(n=10), where="stage 0")  # 5 micro-batches: 2 iterations and one left over
    assert read(source, 0)[1] is True
    assert read(source, 1)[1] is False, "iteration 2 has only one micro-batch"
    with pytest.raises(DataExhausted, match="ran out at micro-batch 1 of iteration 2"):
        source.micro_batch(2, 1)


def window(extra):
    return SimpleNamespace(manifest=SimpleNamespace(start_iteration=4, extra=extra))


def test_a_plain_iterator_trains_but_a_restore_names_the_forms_that_resume():
    source = IteratorSource(iter(pairs(8)), where="stage 0")
    read(source, 0)
    with pytest.raises(DataError) as error:
        restore_data_position(source, window({STATE_KEY: source.window_state()}), where="stage 0")
    message = str(error.value)
    assert "\n" not in message and "state_dict()/load_state_dict()" in message and "StatefulDataLoader" in message


def test_a_loader_that_cannot_load_the_saved_position_is_one_line():
    trained = IteratorSource(loader(), where="stage 0")
    read(trained, 0)
    other = IteratorSource(DataLoaderWithState(), where="stage 0")
    with pytest.raises(DataError, match="cannot load the position the run saved") as error:
        other.restore(trained.window_state(), first_iteration=1)
    assert "\n" not in str(error.value)


class DataLoaderWithState:
    """A loader whose state is of another shape than a StatefulDataLoader's."""

    def __iter__(self):
        return iter(pairs(4))

    def state_dict(self):
        return {"pulled": 0}

    def load_state_dict(self, state):
        state["pulled"]


def test_a_replay_reads_the_form_the_run_trained_on():
    with pytest.raises(DataError, match="trained on a data_iter"):
        restore_data_position(moetion.TensorDataSource(torch.zeros(4, 2), torch.zeros(4), micro_batch_size=1,
                                                       micro_batches_per_iteration=2),
                              window({STATE_KEY: {"iteration": 5, "position": None}}), where="stage 0")
    with pytest.raises(DataError, match="addressable data source"):
        restore_data_position(IteratorSource(loader(), where="stage 0"), window({}), where="stage 0")


@pytest.mark.parametrize("make", [lambda: DataLoader(pairs(8), batch_size=2, shuffle=True),
                                  lambda: StatefulDataLoader(pairs(8), batch_size=2, shuffle=True)])
def test_a_loader_shuffled_without_a_seeded_generator_is_refused(make):
    with pytest.raises(DataError, match="without a seeded generator") as error:
        IteratorSource(make(), where="stage 0")
    assert "\n" not in str(error.value)
    with pytest.raises(DataError, match="without a seeded generator"):
        moetion.DatasetSource.from_loader(make(), micro_batches_per_iteration=M)


def test_items_that_are_not_pairs_and_state_that_is_not_data_are_named():
    with pytest.raises(DataError, match="must yield \\(inputs, labels\\).*micro-batch 0 of iteration 0"):
        IteratorSource(iter([torch.zeros(2)]), where="stage 0").micro_batch(0, 0)

    class OpaqueState:
        def __iter__(self):
            return iter(pairs(4))

        def state_dict(self):
            return {"sampler": object()}

        def load_state_dict(self, state):
            pass

    with pytest.raises(DataError, match="state_dict\\(\\) holds") as error:
        IteratorSource(OpaqueState(), where="stage 0").micro_batch(0, 0)
    assert "\n" not in str(error.value)


def _one_rank_engine():
    """One rank, one stage: a plain iterator trains; mixing forms or swapping the iterator is refused."""
    model = GPTMoEConfig(seq_len=4, d_model=8, n_heads=2, n_layers=1, d_hidden=8, num_experts=2)
    module = moetion.PipelineModule(build_gpt_moe_layers(model), 1, loss_fn=gpt_moe_loss)
    engine = moetion.initialize(module, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
                                config={"micro_batches": M, "threads": 1})
    rows = [(torch.randint(0, 256, (2, 4)), torch.randint(0, 256, (2, 4))) for _ in range(8)]
    plain = iter(rows)
    losses = [engine.train_batch(data_iter=plain) for _ in range(2)]
    errors = []
    for call in (lambda: engine.train_batch(moetion.TensorDataSource(torch.zeros(4, 4), torch.zeros(4, 4),
                                                                     micro_batch_size=1, micro_batches_per_iteration=M),
                                            data_iter=plain),
                 lambda: engine.train_batch(data_iter=iter(rows))):
        try:
            call()
        except moetion.ConfigError as error:
            errors.append(str(error))
    engine.close()
    return losses, errors, engine.iteration


def test_a_plain_iterator_trains_and_the_engine_refuses_two_forms_or_a_new_iterator():
    (outcome,) = run_workers(_one_rank_engine, nproc=1, timeout_s=120)
    losses, errors, iteration = outcome
    assert len(losses) == 2 and iteration == 2
    assert "data or data_iter, not both" in errors[0]
    assert "another data_iter than before" in errors[1]
    assert all("\n" not in e for e in errors)
