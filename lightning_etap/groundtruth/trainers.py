"""Group trainers that run one Lightning ``Trainer`` per ``(group, seed)`` job.

* :class:`LightningGroupTrainer`: the default. Trains the reference
  :class:`~lightning_etap.models.MultiTaskMLP` with
  :func:`~lightning_etap.training.train_group` on a dataset named by a
  :class:`DatasetSpec`.
* :class:`FactoryGroupTrainer`: the user's own LightningModule and
  LightningDataModule, built per job by two factories.

Both are small picklable objects: what travels to a worker process is the
dataset's *name and options*, never its tensors. Each process loads a dataset
once, on first use, and keeps it (:func:`load_cached`).
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_etap.groundtruth.base import GroupOutcome
from lightning_etap.groundtruth.store import normalize_json

__all__ = ["DatasetSpec", "FactoryGroupTrainer", "LightningGroupTrainer", "load_cached", "module_test_losses"]

_DATASETS: dict[str, Any] = {}  # per-process cache: spec key -> MultiTaskDataset


@dataclass(frozen=True)
class DatasetSpec:
    """How to load a dataset: ``load_dataset(name, root, **options)``.

    ``root`` is where the files are on *this* machine; it is not part of the
    fingerprint (the loaders record source checksums in the dataset's
    metadata, which is).
    """

    name: str
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        return json.dumps([self.name.lower(), self.root, normalize_json(self.options, "options")], sort_keys=True)

    def load(self):
        """The dataset, loaded once per process (see :func:`load_cached`)."""
        return load_cached(self)


def load_cached(spec: DatasetSpec):
    """Load the dataset ``spec`` names, or return this process's cached copy."""
    key = spec.key()
    if key not in _DATASETS:
        from lightning_etap.data import load_dataset

        _DATASETS[key] = load_dataset(spec.name, spec.root, **spec.options)
    return _DATASETS[key]


def _library_version() -> str:
    from lightning_etap import __version__

    return __version__


class LightningGroupTrainer:
    """The default group trainer: one :func:`~lightning_etap.training.train_group` call per job.

    Args:
        dataset: a dataset name (``"chemical"``, ``"digits"``, ...), a
            :class:`DatasetSpec`, or a loaded
            :class:`~lightning_etap.data.MultiTaskDataset` (sent whole to
            worker processes; a name is reloaded there instead).
        config: a preset name or a :class:`~lightning_etap.training.TrainConfig`.
        root: data directory (with a dataset name).
        dataset_options: loader options (with a dataset name), e.g. ``{"seed": 0}``.
        threads: torch threads while training (1 is fastest for these small
            models on a CPU; see :func:`~lightning_etap.training.train_group`).
        engine: ``"lightning"`` (default, a Trainer per job) or ``"loop"`` (the
            same training in a plain PyTorch loop, 1.6-2.2x less CPU time for
            these small models, the same numbers; no ``trainer_kwargs``). See
            :func:`~lightning_etap.training.train_group`. ``"loop"`` is recorded
            in the fingerprint.
        **trainer_kwargs: passed to :class:`lightning.Trainer` (JSON-serialisable
            values only: they are part of the fingerprint).

    The fingerprint holds the dataset's name, loader options, task names and
    metadata (split seed, source checksums, ...), the ``TrainConfig`` as a
    dict, the trainer keyword arguments and the library version: change any
    of them and an existing store refuses the new results.

    Example:
        >>> from lightning_etap.training import TrainConfig
        >>> trainer = LightningGroupTrainer("digits", TrainConfig(hidden=(8,), max_epochs=2, patience=1))
        >>> trainer.task_names[:2]
        ('digit_0', 'digit_1')
        >>> sorted(trainer.fingerprint())
        ['dataset', 'library_version', 'train_config', 'trainer', 'trainer_kwargs']
    """

    def __init__(
        self,
        dataset: Any,
        config: Any = "chemical",
        *,
        root: str | None = None,
        dataset_options: dict[str, Any] | None = None,
        threads: int | None = 1,
        engine: str = "lightning",
        **trainer_kwargs: Any,
    ) -> None:
        from lightning_etap.data.base import MultiTaskDataset
        from lightning_etap.training import get_preset

        self._dataset = None
        if isinstance(dataset, MultiTaskDataset):
            if root is not None or dataset_options:
                raise ValueError("root and dataset_options apply to a dataset name, not a loaded dataset")
            self.spec = None
            self._dataset = dataset
        elif isinstance(dataset, DatasetSpec):
            if root is not None or dataset_options:
                raise ValueError("give root and dataset_options inside the DatasetSpec, not beside it")
            self.spec = dataset
        elif isinstance(dataset, str):
            self.spec = DatasetSpec(dataset, None if root is None else str(root), dict(dataset_options or {}))
        else:
            raise TypeError(f"dataset must be a dataset name, a DatasetSpec or a MultiTaskDataset, got "
                            f"{type(dataset).__name__}")
        self.config = get_preset(config)
        self.threads = threads
        if engine not in ("lightning", "loop"):
            raise ValueError(f"engine must be 'lightning' or 'loop', got {engine!r}")
        if engine == "loop" and trainer_kwargs:
            raise ValueError(f"engine='loop' takes no Trainer arguments, got {sorted(trainer_kwargs)}")
        self.engine = engine
        self.trainer_kwargs = dict(trainer_kwargs)
        normalize_json(self.trainer_kwargs, "trainer_kwargs")  # fail early on values a fingerprint cannot hold

    @property
    def dataset(self):
        """The dataset (loaded on first use, once per process)."""
        return self._dataset if self.spec is None else self.spec.load()

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.dataset.task_names)

    def fingerprint(self) -> dict[str, Any]:
        ds = self.dataset
        fingerprint = {
            "trainer": "lightning_etap.LightningGroupTrainer",
            "library_version": _library_version(),
            "dataset": {
                "name": ds.name,
                "options": self.spec.options if self.spec is not None else None,
                "task_names": list(ds.task_names),
                "metadata": ds.metadata,
            },
            "train_config": self.config.to_dict(),
            "trainer_kwargs": self.trainer_kwargs,
        }
        if self.engine != "lightning":  # stores made before the option existed keep their fingerprint
            fingerprint["engine"] = self.engine
        return normalize_json(fingerprint)

    def train(self, jobs: Sequence[tuple[tuple[str, ...], int]]) -> list[GroupOutcome]:
        from lightning_etap.training import train_group

        out = []
        for group, seed in jobs:
            r = train_group(self.dataset, list(group), self.config, int(seed), threads=self.threads,
                            engine=self.engine, **self.trainer_kwargs)
            out.append(GroupOutcome(
                group=tuple(group), seed=int(seed), test_losses=dict(r.test_losses), epochs=r.epochs,
                best_epoch=r.best_epoch, seconds=r.seconds, extra={"val_loss": r.val_loss},
            ))
        return out

    def __repr__(self) -> str:
        what = self.spec if self.spec is not None else f"<dataset {self.dataset.name!r}>"
        return f"LightningGroupTrainer({what!r}, {self.config!r})"


def module_test_losses(module, trainer, tasks: Sequence[str]) -> dict[str, float]:
    """The default test-loss contract of :class:`FactoryGroupTrainer`.

    After ``trainer.test(module, datamodule)``, the module exposes
    ``module.test_losses``: a dict ``task -> mean test loss`` with an entry
    for every task of the group (floats or scalar tensors). The reference
    :class:`~lightning_etap.models.MultiTaskMLP` does exactly this in
    ``on_test_epoch_end``.

    Raises:
        ValueError: no ``test_losses`` attribute, or tasks missing from it.
    """
    losses = getattr(module, "test_losses", None)
    if not isinstance(losses, dict):
        raise ValueError(
            f"{type(module).__name__} has no `test_losses` dict after trainer.test(); set "
            "`self.test_losses = {task: loss}` in on_test_epoch_end, or pass test_losses=<callable> "
            "to FactoryGroupTrainer"
        )
    missing = [t for t in tasks if t not in losses]
    if missing:
        raise ValueError(f"{type(module).__name__}.test_losses has no entry for task(s) {missing}")
    return {t: float(losses[t]) for t in tasks}


_QUIET_TRAINER = dict(
    accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
    enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
)


class FactoryGroupTrainer:
    """A group trainer for your own LightningModule and LightningDataModule.

    For every job ``(tasks, seed)`` it seeds everything with ``seed``, builds
    ``model_factory(tasks)`` and ``datamodule_factory(tasks, seed)``, runs
    ``trainer.fit`` then ``trainer.test``, and reads the per-task test losses
    with ``test_losses(module, trainer, tasks)`` (default
    :func:`module_test_losses`: the module's ``test_losses`` dict).

    Args:
        model_factory: ``tasks -> LightningModule`` for a group (a tuple of
            task names; one task means single-task learning).
        datamodule_factory: ``(tasks, seed) -> LightningDataModule``.
        task_names: every task, in the dataset's order.
        fingerprint: JSON data that identifies your data and recipe (dataset
            version, split seed, model widths, optimizer, ...). The library
            cannot look inside your factories: put here everything that
            changes the numbers.
        trainer_kwargs: :class:`lightning.Trainer` arguments over quiet CPU
            defaults (no logger, checkpoints, progress bar). ``callbacks`` are
            deep-copied for every job, so stateful ones (early stopping)
            start fresh. They are part of the fingerprint: JSON values as
            they are, other objects (a profiler, a strategy) by class and
            ``repr`` (without memory addresses).
        test_losses: the test-loss extractor, ``(module, trainer, tasks) -> {task: loss}``.
        threads: torch threads while training (``None``: unchanged).

    To run in worker processes (``ProcessPoolExecutor``, ``RayExecutor``) the
    factories must be picklable: module-level functions or
    ``functools.partial`` of them, not lambdas.

    Example:
        >>> from lightning_etap.data import MultiTaskDataModule, load_dataset
        >>> from lightning_etap.models import MultiTaskMLP
        >>> def make_model(tasks):
        ...     return MultiTaskMLP(16, tasks, hidden=(8,), lr=0.05)
        >>> def make_data(tasks, seed):
        ...     return MultiTaskDataModule(load_dataset("digits"), tasks, batch_size=64, seed=seed)
        >>> trainer = FactoryGroupTrainer(make_model, make_data, [f"digit_{d}" for d in range(10)],
        ...                               {"data": "digits-v1", "model": "mlp-8"},
        ...                               trainer_kwargs={"max_epochs": 1})
        >>> [o.test_losses.keys() for o in trainer.train([(("digit_0", "digit_1"), 0)])]
        [dict_keys(['digit_0', 'digit_1'])]
    """

    def __init__(
        self,
        model_factory: Callable[[tuple[str, ...]], Any],
        datamodule_factory: Callable[[tuple[str, ...], int], Any],
        task_names: Sequence[str],
        fingerprint: dict[str, Any],
        *,
        trainer_kwargs: dict[str, Any] | None = None,
        test_losses: Callable[[Any, Any, Sequence[str]], dict[str, float]] = module_test_losses,
        threads: int | None = 1,
    ) -> None:
        if not callable(model_factory) or not callable(datamodule_factory):
            raise TypeError("model_factory and datamodule_factory must be callables")
        if not isinstance(fingerprint, dict) or not fingerprint:
            raise ValueError(
                "fingerprint must be a non-empty dict describing your data and recipe (e.g. dataset version, "
                "split seed, model and optimizer settings): the store uses it to refuse mixing experiments"
            )
        self.model_factory = model_factory
        self.datamodule_factory = datamodule_factory
        self.task_names = tuple(str(t) for t in task_names)
        self.user_fingerprint = normalize_json(fingerprint)
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.test_losses = test_losses
        self.threads = threads

    def fingerprint(self) -> dict[str, Any]:
        kwargs = {k: v for k, v in self.trainer_kwargs.items() if k != "callbacks"}
        return normalize_json({
            "trainer": "lightning_etap.FactoryGroupTrainer",
            "library_version": _library_version(),
            "user": self.user_fingerprint,
            "task_names": list(self.task_names),
            "model_factory": _qualname(self.model_factory),
            "datamodule_factory": _qualname(self.datamodule_factory),
            "test_losses": _qualname(self.test_losses),
            "trainer_kwargs": _describe(kwargs, "trainer_kwargs"),
            "callbacks": [type(c).__name__ for c in self.trainer_kwargs.get("callbacks", [])],
        })

    def train(self, jobs: Sequence[tuple[tuple[str, ...], int]]) -> list[GroupOutcome]:
        import lightning as L

        from lightning_etap.training import quiet_lightning, torch_threads

        out = []
        for group, seed in jobs:
            tasks = tuple(group)
            start = time.perf_counter()
            with torch_threads(self.threads):
                with quiet_lightning():
                    L.seed_everything(int(seed), workers=True, verbose=False)
                    model = self.model_factory(tasks)
                    datamodule = self.datamodule_factory(tasks, int(seed))
                    kwargs = {**_QUIET_TRAINER, **copy.deepcopy(self.trainer_kwargs)}
                    trainer = L.Trainer(**kwargs)
                    trainer.fit(model, datamodule=datamodule)
                    trainer.test(model, datamodule=datamodule, verbose=False)
                losses = self.test_losses(model, trainer, tasks)
            out.append(GroupOutcome(group=tasks, seed=int(seed), test_losses=dict(losses),
                                    epochs=int(trainer.current_epoch), seconds=time.perf_counter() - start))
        return out


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _describe(value: Any, where: str) -> Any:
    """``value`` as JSON data that is the same in every process.

    JSON data stays as it is; any other object (a profiler, a strategy, a
    plugin) becomes its qualified class name and its ``repr`` without memory
    addresses, so that the fingerprint does not change from one process to
    the next (settings the ``repr`` does not show are not in it: put those in
    ``fingerprint``).
    """
    if isinstance(value, dict):
        return {str(k): _describe(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_describe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    try:
        return normalize_json(value, where)
    except TypeError:
        cls = type(value)
        return {"class": f"{cls.__module__}.{cls.__qualname__}", "repr": _ADDRESS.sub("", repr(value))}


def _qualname(fn: Any) -> str:
    import functools

    if isinstance(fn, functools.partial):
        return f"partial({_qualname(fn.func)}, {fn.args!r}, {sorted(fn.keywords.items())!r})"
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
