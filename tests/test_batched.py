"""BatchedMLPTrainer: many group models at once, checked against one-at-a-time ``train_group``."""

from __future__ import annotations

import pickle
import warnings

import lightning as L
import pytest
import torch

from lightning_etap.data.base import MultiTaskDataset, TaskSplits
from lightning_etap.data.datamodule import MultiTaskDataModule
from lightning_etap.groundtruth import batched
from lightning_etap.groundtruth.base import GroupTrainer
from lightning_etap.groundtruth.batched import (
    BatchedMLPTrainer,
    _c_source,
    _fast_init,
    _job_rows,
    _reference_init,
    _Tables,
    detect_one_hot,
)
from lightning_etap.training import TrainConfig, build_model, get_preset, train_group

#: Small, fast recipe whose early stopping fires within the epoch cap (hidden widths multiples of 8: C kernel).
TOY = TrainConfig(hidden=(16, 8), lr=0.1, momentum=0.9, batch_size=16, max_epochs=30, patience=3,
                  lr_decay_start=2, lr_decay_every=4, lr_decay_factor=0.7)
RTOL = 1e-4  # relative tolerance on test losses (observed: <= ~1e-6 in these tests)


def toy_dataset(sizes=(37, 22, 12), d=6, kinds=None, one_hot=False, seed=0) -> MultiTaskDataset:
    """Per-task data with unequal task sizes; binary (default) or regression tasks; optional one-hot inputs."""
    g = torch.Generator().manual_seed(seed)
    kinds = kinds or ("binary",) * len(sizes)
    names = [f"t{i}" for i in range(len(sizes))]
    splits = {}
    for name, n, kind in zip(names, sizes, kinds):
        parts = []
        for m in (n, 9, 11):
            if one_hot:  # 3 positions x 4 symbols, one 1 per position
                x = torch.zeros(m, 12)
                x[torch.arange(m)[:, None], torch.arange(3) * 4 + torch.randint(0, 4, (m, 3), generator=g)] = 1.0
                signal = x[:, :4].argmax(1, keepdim=True).float() - 1.5
            else:
                x = torch.randn(m, d, generator=g)
                signal = x[:, :1]
            if kind == "binary":
                y = (signal + 0.5 * torch.randn(m, 1, generator=g) > 0).float()
                y[0, 0], y[1, 0] = 0.0, 1.0
            else:
                y = signal + 0.3 * torch.randn(m, 1, generator=g)
            parts.append((x, y))
        splits[name] = TaskSplits(*parts)
    return MultiTaskDataset("toy", tuple(names), tuple(kinds), "per_task", splits, metadata={"seed": seed})


def assert_same_training(outcomes, references, rtol=RTOL):
    for o, r in zip(outcomes, references):
        assert o.group == tuple(r.tasks) and o.seed == r.seed
        assert o.epochs == r.epochs, (o.group, o.seed)
        assert o.best_epoch == r.best_epoch, (o.group, o.seed)
        assert o.extra["val_loss"] == pytest.approx(r.val_loss, rel=rtol)
        for t in r.test_losses:
            assert o.test_losses[t] == pytest.approx(r.test_losses[t], rel=rtol), (o.group, o.seed, t)


def reference(ds, jobs, cfg):
    return [train_group(ds, list(g), cfg, seed=s) for g, s in jobs]


@pytest.fixture(scope="module", autouse=True)
def kernel_dir(tmp_path_factory):
    """Compile the C kernels into a temporary folder, not the user's cache."""
    folder = tmp_path_factory.mktemp("kernels")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIGHTNING_ETAP_KERNELS", str(folder))
        yield folder


@pytest.fixture(scope="module")
def toy():
    return toy_dataset()


TOY_JOBS = [(("t0", "t1", "t2"), 0), (("t0", "t2"), 1), (("t1",), 2), (("t1", "t2"), 0), (("t2",), 3)]


@pytest.fixture(scope="module")
def toy_reference(toy):
    return reference(toy, TOY_JOBS, TOY)


# ------------------------------------------------------------------ same training as train_group
@pytest.mark.parametrize("backend", ["c", "torch"])
def test_matches_train_group_on_toy(toy, toy_reference, backend):
    """Test losses, best epoch, epochs run and best validation loss agree job for job (early stopping fires)."""
    outcomes = BatchedMLPTrainer(toy, TOY, backend=backend).train(TOY_JOBS)
    assert any(r.epochs < TOY.max_epochs for r in toy_reference)  # early stopping happened
    assert_same_training(outcomes, toy_reference)
    assert all(o.extra["trainer"] == "batched-mlp" for o in outcomes)


REG_JOBS = [(("t0", "t1", "t2"), 0), (("t0",), 1), (("t0", "t2"), 2)]


@pytest.fixture(scope="module")
def regression_toy():
    ds = toy_dataset(kinds=("regression", "binary", "regression"), one_hot=True, seed=1)
    return ds, reference(ds, REG_JOBS, TOY)


@pytest.mark.parametrize("backend", ["c", "torch"])
def test_matches_train_group_regression_mixed_kinds_and_one_hot(regression_toy, backend):
    """MSE tasks, a binary + regression group, and generic one-hot detection on a toy."""
    ds, refs = regression_toy
    trainer = BatchedMLPTrainer(ds, TOY, backend=backend)
    assert trainer.tables.ones == 3
    assert_same_training(trainer.train(REG_JOBS), refs)


@pytest.mark.parametrize("backend", ["c", "torch"])
def test_matches_train_group_with_wide_regression_targets(backend):
    """Targets of width 2 (forecasting-style heads): MSE averaged over the width."""
    base = toy_dataset(kinds=("regression", "regression"), sizes=(30, 17), seed=2)
    splits = {t: TaskSplits(*[(x, torch.cat([y, 0.5 * y + 0.1], 1)) for x, y in (base.splits[t][s] for s in
                                                                                 ("train", "val", "test"))])
              for t in base.task_names}
    ds = MultiTaskDataset("wide", base.task_names, base.task_kinds, "per_task", splits)
    jobs = [(("t0", "t1"), 0), (("t1",), 1)]
    assert_same_training(BatchedMLPTrainer(ds, TOY, backend=backend).train(jobs), reference(ds, jobs, TOY))


def test_nesterov_weight_decay_no_oversampling_torch_init(toy):
    cfg = TOY.replace(nesterov=True, weight_decay=1e-3, oversample=False, lr_decay_start=None, init="torch")
    jobs = [(("t0", "t1"), 0), (("t2", "t0"), 1)]  # also: a group not in dataset order
    assert_same_training(BatchedMLPTrainer(toy, cfg).train(jobs), reference(toy, jobs, cfg))


def test_hidden_widths_not_multiple_of_8_use_torch(toy):
    cfg = TOY.replace(hidden=(6,))
    trainer = BatchedMLPTrainer(toy, cfg)
    with pytest.warns(RuntimeWarning, match="torch backend"):
        assert trainer.resolved_backend() == "torch"
    jobs = [(("t0", "t1"), 0)]
    assert_same_training(trainer.train(jobs), reference(toy, jobs, cfg))
    with pytest.raises(ValueError, match="multiples of 8"):
        BatchedMLPTrainer(toy, cfg, backend="c").resolved_backend()


@pytest.mark.data
def test_matches_train_group_on_chemical(shared_data):
    """The paper's recipe, capped at 12 epochs (no early stop yet), one-hot path, groups with and without oversampling."""
    from lightning_etap.data import load_dataset

    ds = load_dataset("chemical", shared_data)
    cfg = get_preset("chemical").replace(max_epochs=12)
    jobs = [(("83", "55"), 0), (("78", "84", "85", "87"), 1), (("55",), 2)]
    trainer = BatchedMLPTrainer(ds, cfg)
    assert trainer.tables.ones == 9
    assert_same_training(trainer.train(jobs), reference(ds, jobs, cfg))


# ------------------------------------------------------------------ ingredients
@pytest.mark.parametrize("oversample", [True, False])
def test_job_rows_match_datamodule(toy, oversample):
    tables = _Tables(toy, "auto")
    for group, seed in [(("t0", "t1", "t2"), 0), (("t2", "t1"), 5), (("t1",), 1)]:
        rows = _job_rows(toy, tables, group, seed, oversample)
        ref = MultiTaskDataModule(toy, group, batch_size=8, seed=seed, oversample=oversample).train_rows()
        for i, t in enumerate(group):
            torch.testing.assert_close(tables.x["train"][rows[i]], ref.x[t], rtol=0, atol=0)
            torch.testing.assert_close(tables.y["train"][rows[i]], ref.y[t], rtol=0, atol=0)


@pytest.mark.parametrize("init", ["torch", "glorot"])
def test_fast_init_is_build_model(toy, init):
    cfg = TOY.replace(init=init)
    for group, seed in [(("t0", "t1", "t2"), 0), (("t1",), 7)]:
        fast, ref = _fast_init(toy, group, cfg, seed), _reference_init(toy, group, cfg, seed)
        L.seed_everything(seed, verbose=False)  # what train_group does before build_model
        model = build_model(toy, list(group), cfg)
        literal = [(m.weight.detach().t(), m.bias.detach()) for m in [*model.encoder, *model.heads]
                   if isinstance(m, torch.nn.Linear)]
        assert len(fast) == len(ref) == len(literal) == 2 + len(group)
        for (a, b), (c, e), (f, h) in zip(fast, ref, literal):
            assert torch.equal(a, c) and torch.equal(b, e) and torch.equal(a, f) and torch.equal(b, h)


def test_initialisation_does_not_touch_global_rng(toy):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    BatchedMLPTrainer(toy, TOY.replace(max_epochs=1)).train([(("t0", "t1"), 4)])
    assert torch.equal(torch.rand(3), expected)


def test_detect_one_hot():
    assert detect_one_hot([torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]), torch.tensor([[1.0, 1.0, 0.0]])]) == 2
    assert detect_one_hot([torch.tensor([[1.0, 0.0], [1.0, 1.0]])]) is None  # unequal counts
    assert detect_one_hot([torch.tensor([[0.5, 1.0]])]) is None  # not 0/1
    assert detect_one_hot([torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])]) is None  # differ across tensors


# ------------------------------------------------------------------ independence and batching
@pytest.mark.parametrize("backend", ["c", "torch"])
def test_job_alone_equals_job_in_a_batch(toy, backend):
    """The protocol: a job's result does not depend on the other jobs of the call."""
    batch = BatchedMLPTrainer(toy, TOY, backend=backend).train(TOY_JOBS)
    for i in (0, 2, 3):
        alone = BatchedMLPTrainer(toy, TOY, backend=backend).train([TOY_JOBS[i]])[0]
        assert alone.epochs == batch[i].epochs and alone.best_epoch == batch[i].best_epoch
        if backend == "c":  # one model at a time in the kernel: bitwise the same
            assert alone.test_losses == batch[i].test_losses
        else:
            for t, v in alone.test_losses.items():
                assert v == pytest.approx(batch[i].test_losses[t], rel=1e-6)


def test_stacking_options_do_not_change_results(toy):
    base = BatchedMLPTrainer(toy, TOY).train(TOY_JOBS)
    for kwargs in ({"max_models": 2, "threads": 2}, {"compact_every": 1}, {"compact_every": 1000}):
        other = BatchedMLPTrainer(toy, TOY, **kwargs).train(TOY_JOBS)
        assert [o.test_losses for o in other] == [o.test_losses for o in base], kwargs
        assert [(o.epochs, o.best_epoch) for o in other] == [(o.epochs, o.best_epoch) for o in base]


def test_progress_bar_counts_every_model_epoch(toy, capsys):
    trainer = BatchedMLPTrainer(toy, TOY, progress=True)
    base = BatchedMLPTrainer(toy, TOY).train(TOY_JOBS)
    seen = []
    import tqdm.auto

    real = tqdm.auto.tqdm

    class Spy(real):
        def close(self):
            seen.append((self.n, self.total))
            super().close()

    tqdm.auto.tqdm = Spy
    try:
        got = trainer.train(TOY_JOBS)
    finally:
        tqdm.auto.tqdm = real
    assert [o.test_losses for o in got] == [o.test_losses for o in base]  # the bar changes nothing
    assert seen[0] == (len(TOY_JOBS) * TOY.max_epochs,) * 2  # early stops count their skipped epochs
    assert "models at once" in capsys.readouterr().err


def test_plan_groups_equal_epoch_lengths(toy):
    trainer = BatchedMLPTrainer(toy, TOY, max_models=2)
    jobs = [(("t0", "t1"), 0), (("t1",), 0), (("t0",), 1), (("t0", "t2"), 2), (("t1", "t2"), 0)]
    plan = trainer.plan(jobs)
    assert sorted(i for stack in plan for i in stack) == list(range(len(jobs)))
    assert all(len(stack) <= 2 for stack in plan)
    assert plan == [[0, 2], [3], [1, 4]]  # 37 rows (t0 largest), then 22 (t1 largest)


def test_seconds_and_outcome_fields(toy):
    outcomes = BatchedMLPTrainer(toy, TOY).train(TOY_JOBS[:2])
    for o, (group, seed) in zip(outcomes, TOY_JOBS[:2]):
        assert o.group == group and o.seed == seed and set(o.test_losses) == set(group)
        assert o.seconds > 0 and o.extra["stop_reason"] in ("patience", "max_epochs", "non_finite")
    assert BatchedMLPTrainer(toy, TOY).train([]) == []


def test_non_finite_validation_loss_stops_like_train_group(toy):
    cfg = TOY.replace(lr=1e4, momentum=0.0, lr_decay_start=None)
    jobs = [(("t0", "t1"), 0)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = reference(toy, jobs, cfg)[0]
        out = BatchedMLPTrainer(toy, cfg).train(jobs)[0]
    assert out.epochs == ref.epochs and out.best_epoch == ref.best_epoch
    assert out.extra["stop_reason"] == "non_finite"


# ------------------------------------------------------------------ protocol, fingerprint, rejections
def test_protocol_fingerprint_and_pickle(toy):
    trainer = BatchedMLPTrainer(toy, TOY)
    assert isinstance(trainer, GroupTrainer)
    fp = trainer.fingerprint()
    assert fp["trainer"] == "batched-mlp"
    assert fp["dataset"]["name"] == "toy" and fp["dataset"]["metadata"] == {"seed": 0}
    assert fp["train_config"] == TOY.to_dict()
    assert BatchedMLPTrainer(toy, TOY.replace(lr=0.3)).fingerprint() != fp
    clone = pickle.loads(pickle.dumps(trainer))
    assert clone.fingerprint() == fp


@pytest.mark.data
def test_fingerprint_differs_from_lightning_trainer(shared_data):
    from lightning_etap.groundtruth import LightningGroupTrainer

    lightning = LightningGroupTrainer("chemical", "chemical", root=str(shared_data))
    batched = BatchedMLPTrainer("chemical", "chemical", root=str(shared_data))
    assert batched.fingerprint()["dataset"] == lightning.fingerprint()["dataset"]
    assert batched.fingerprint() != lightning.fingerprint()
    state = pickle.dumps(batched)
    assert len(state) < 10_000  # a named dataset travels by name, not as tensors


def test_rejections(toy):
    from lightning_etap.data.digits import load_digits

    with pytest.raises(NotImplementedError, match="per-task"):
        BatchedMLPTrainer(load_digits(), TOY).train([(("digit_0",), 0)])
    with pytest.raises(NotImplementedError, match="dropout"):
        BatchedMLPTrainer(toy, TOY.replace(dropout=0.1))
    with pytest.raises(NotImplementedError, match="SGD"):
        BatchedMLPTrainer(toy, TOY.replace(optimizer="adam"))
    with pytest.raises(ValueError, match="backend"):
        BatchedMLPTrainer(toy, TOY, backend="cuda")
    with pytest.raises(ValueError, match="unknown task"):
        BatchedMLPTrainer(toy, TOY).train([(("nope",), 0)])


def test_kernel_is_compiled_once_and_cached_on_disk(kernel_dir):
    source = _c_source((8,), 1, 0, 3)
    lib = batched._load_kernel(source)
    assert batched._load_kernel(source) is lib
    assert len(list(kernel_dir.glob("etap_batched_*.so"))) >= 1


def test_auto_backend_falls_back_to_torch_without_compiler(toy, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    monkeypatch.setenv("LIGHTNING_ETAP_KERNELS", str(tmp_path))
    monkeypatch.setattr(batched, "_KERNELS", {})
    with pytest.warns(RuntimeWarning, match="C kernel unavailable"):
        assert BatchedMLPTrainer(toy, TOY).resolved_backend() == "torch"
    with pytest.raises(RuntimeError, match="no C compiler"):
        BatchedMLPTrainer(toy, TOY, backend="c").resolved_backend()


@pytest.mark.slow
@pytest.mark.data
def test_matches_train_group_on_chemical_more_groups(shared_data):
    """Eight random groups and seeds, the paper's recipe capped at 40 epochs."""
    import random

    from lightning_etap.data import load_dataset

    ds = load_dataset("chemical", shared_data)
    cfg = get_preset("chemical").replace(max_epochs=40)
    rng = random.Random(3)
    jobs = []
    for _ in range(8):
        chosen = set(rng.sample(ds.task_names, rng.randint(1, 10)))
        jobs.append((tuple(t for t in ds.task_names if t in chosen), rng.randint(0, 9)))
    assert_same_training(BatchedMLPTrainer(ds, cfg).train(jobs), reference(ds, jobs, cfg))


def test_kernel_source_is_specialised():
    src = _c_source((32, 16), 1, 10, 180)
    assert "void grads(" in src and "void forward(" in src and "W[0] + m * 5792" in src  # 181 x 32
    with pytest.raises(ValueError):
        _c_source((12,), 1, 0, 5)
