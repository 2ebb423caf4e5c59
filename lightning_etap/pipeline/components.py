"""The pieces a config names, built: dataset, group trainer, executor, logger, candidate groups.

Every library error a user can cause here (a missing data root, an import
path that does not import, an optional package that is not installed) comes
out as a :class:`~lightning_etap.pipeline.UserError`.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_etap.pipeline.config import PipelineConfig
from lightning_etap.pipeline.errors import UserError

__all__ = ["ImportedFactory", "Workspace"]


class ImportedFactory:
    """A function named by an import path ``"package.module:function"``, imported on first call.

    Picklable by its path alone, so it travels to worker processes (and Ray
    workers) where the module is imported again.
    """

    def __init__(self, path: str, role: str) -> None:
        if ":" not in path:
            raise UserError(f"{role} {path!r} must be an import path 'package.module:function'")
        self.path = path
        self.role = role
        self._fn = None

    def resolve(self):
        """The function (imported now if needed).

        Raises:
            UserError: the module does not import or has no such attribute.
        """
        if self._fn is None:
            module, _, name = self.path.partition(":")
            try:
                mod = importlib.import_module(module)
            except ImportError as err:
                raise UserError(f"cannot import {self.role} module {module!r} from {self.path!r}: {err} "
                                "(is it on PYTHONPATH, or installed?)") from None
            fn = mod
            for part in name.split("."):
                fn = getattr(fn, part, None)
                if fn is None:
                    raise UserError(f"{self.role} {self.path!r}: module {module!r} has no attribute {name!r}")
            if not callable(fn):
                raise UserError(f"{self.role} {self.path!r} is not callable")
            self._fn = fn
        return self._fn

    def __call__(self, *args: Any) -> Any:
        import inspect

        import lightning as L

        fn = self.resolve()
        expected = {"model": ("(tasks)", L.LightningModule), "datamodule": ("(tasks, seed)", L.LightningDataModule)}
        form, kind = expected.get(self.role, ("", object))
        try:
            inspect.signature(fn).bind(*args)
        except TypeError:
            raise UserError(f"{self.role} {self.path!r} is called as {self.role}{form}, but it takes "
                            f"{inspect.signature(fn)}") from None
        except ValueError:  # no signature to read (a builtin): let the call tell
            pass
        out = fn(*args)
        if not isinstance(out, kind):
            raise UserError(f"{self.role} {self.path!r} returned {type(out).__name__}, not a lightning."
                            f"{kind.__name__}: the pipeline trains what it builds in a Lightning Trainer")
        return out

    def __getstate__(self) -> dict:
        return {"path": self.path, "role": self.role, "_fn": None}

    def __repr__(self) -> str:
        return f"ImportedFactory({self.path!r})"


def _check_data_root(config: PipelineConfig) -> None:
    from lightning_etap.data._download import ENV_DATA

    if config.data_root is not None:
        if not Path(config.data_root).is_dir():
            raise UserError(f"data root {config.data_root} does not exist (--data-root / data_root in the config)")
    elif os.environ.get(ENV_DATA) and not Path(os.environ[ENV_DATA]).is_dir():
        raise UserError(f"data root {os.environ[ENV_DATA]} does not exist (${ENV_DATA}); "
                        "unset it to use the per-user cache, or point it at the data folder")


class Workspace:
    """What the stages share within one command: the config and the objects it names, built once.

    Args:
        config: the resolved config.
        progress: show progress bars.
    """

    def __init__(self, config: PipelineConfig, progress: bool = True) -> None:
        self.config = config
        self.progress = progress
        self._dataset = None
        self._trainer = None

    # ------------------------------------------------------------------ data and tasks
    @property
    def dataset(self):
        """The built-in dataset restricted to the config's tasks (loaded once)."""
        if self.config.custom:
            raise AssertionError("a run with your own module has no built-in dataset")
        if self._dataset is None:
            from lightning_etap.data._download import ChecksumError, DownloadError
            from lightning_etap.data.registry import load_dataset

            _check_data_root(self.config)
            try:
                dataset = load_dataset(self.config.dataset, self.config.data_root, **self.config.dataset_options)
            except (DownloadError, ChecksumError, FileNotFoundError) as err:
                raise UserError(str(err).splitlines()[0]) from None
            except TypeError as err:  # an unknown loader option
                raise UserError(f"dataset_options for {self.config.dataset}: {err}") from None
            except ValueError as err:
                raise UserError(f"{self.config.dataset}: {err}") from None
            if self.config.tasks is not None:
                try:
                    dataset = dataset.subset(self.config.tasks)
                except ValueError as err:
                    raise UserError(str(err)) from None
            self._dataset = dataset
        return self._dataset

    @property
    def task_names(self) -> tuple[str, ...]:
        """The tasks to group, in order."""
        names = tuple(self.config.tasks) if self.config.custom else tuple(self.dataset.task_names)
        if len(names) < 3:
            raise UserError(f"task grouping needs at least 3 tasks, got {list(names)}")
        return names

    def _add_cwd_to_path(self) -> None:
        cwd = os.getcwd()
        if cwd not in sys.path:
            sys.path.insert(0, cwd)
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if cwd not in paths:  # worker processes import the user's module too
            os.environ["PYTHONPATH"] = os.pathsep.join([cwd, *[p for p in paths if p]])

    def factories(self) -> tuple[ImportedFactory, ImportedFactory]:
        """The user's model and datamodule factories (imported now, so a bad path fails early)."""
        self._add_cwd_to_path()
        model = ImportedFactory(self.config.model, "model")
        datamodule = ImportedFactory(self.config.datamodule, "datamodule")
        model.resolve()
        datamodule.resolve()
        return model, datamodule

    # ------------------------------------------------------------------ training
    def train_config(self):
        """The reference model's :class:`~lightning_etap.training.TrainConfig` (preset + recipe)."""
        from lightning_etap.training import get_preset

        cfg = get_preset(self.config.preset)
        recipe = dict(self.config.recipe)
        if "hidden" in recipe:
            recipe["hidden"] = tuple(recipe["hidden"])
        try:
            return cfg.replace(**recipe)
        except TypeError as err:
            raise UserError(f"recipe: {err}") from None

    def group_trainer(self):
        """The :class:`~lightning_etap.groundtruth.GroupTrainer` of the ground-truth jobs."""
        if self._trainer is None:
            if self.config.custom:
                from lightning_etap.groundtruth import FactoryGroupTrainer

                model, datamodule = self.factories()
                fingerprint = {"model": self.config.model, "datamodule": self.config.datamodule,
                               "trainer": self.config.trainer}
                if self.config.code_version is not None:  # stores written before the key existed stay valid
                    fingerprint["code_version"] = self.config.code_version
                try:
                    self._trainer = FactoryGroupTrainer(model, datamodule, self.task_names,
                                                        fingerprint=fingerprint, trainer_kwargs=self.config.trainer)
                except (TypeError, ValueError) as err:
                    raise UserError(f"trainer: {err}") from None
            else:
                from lightning_etap.groundtruth import LightningGroupTrainer

                self._trainer = LightningGroupTrainer(self.dataset, self.train_config(), engine=self.config.engine)
        return self._trainer

    def check_executor(self) -> None:
        """Refuse an executor whose package is missing (before the stages run, not when the gains stage starts).

        Raises:
            UserError: ``ray`` without Ray installed.
        """
        import importlib.util

        if self.config.executor == "ray" and importlib.util.find_spec("ray") is None:
            raise UserError("executor 'ray' needs Ray: pip install 'lightning-etap[ray]'")

    def check_logger(self) -> None:
        """Refuse a logger whose package is missing (before the affinity fit starts or a folder is made).

        Raises:
            UserError: naming the package or extra to install.
        """
        import importlib.util

        kind = self.config.logger
        if kind == "tensorboard" and not (importlib.util.find_spec("tensorboard")
                                          or importlib.util.find_spec("tensorboardX")):
            raise UserError("logger 'tensorboard' needs tensorboard: pip install tensorboard")
        if kind == "wandb" and importlib.util.find_spec("wandb") is None:
            raise UserError("logger 'wandb' needs wandb: pip install 'lightning-etap[wandb]'")

    def executor(self):
        """The executor the config names."""
        from lightning_etap.groundtruth import InProcessExecutor, ProcessPoolExecutor

        kind = self.config.executor
        if kind == "local":
            return InProcessExecutor()
        if kind == "processes":
            return ProcessPoolExecutor(workers=self.config.workers, threads=1)
        try:
            from lightning_etap.groundtruth import RayExecutor

            return RayExecutor(address=self.config.ray_address)  # the CPUs of its cluster (a local one: all)
        except ImportError:
            raise UserError("executor 'ray' needs Ray: pip install 'lightning-etap[ray]'") from None

    # ------------------------------------------------------------------ groups
    def train_groups(self, names: Sequence[str]) -> list[tuple[str, ...]]:
        """The all-task group, then ``n_train_groups`` groups drawn uniformly by size (seeded by the first seed)."""
        from math import comb

        from lightning_etap.groundtruth import sample_groups

        n = len(names)
        available = sum(comb(n, k) for k in range(2, n + 1)) - 1
        wanted = min(self.config.n_train_groups, available)
        return sample_groups(names, n_groups=wanted + 1, include_all_tasks=True, seed=self.config.seeds[0])

    def candidates(self, names: Sequence[str]) -> np.ndarray:
        """``(m, n)`` bool candidate groups (two or more tasks) for prediction and selection.

        Every such group when there are at most ``max_candidates``; otherwise
        the training groups, every pair (if they fit) and a uniform-by-size
        sample of larger groups up to ``max_candidates`` (seeded by the first seed).
        """
        from lightning_etap.groundtruth import sample_groups
        from lightning_etap.groups import all_groups, groups_to_masks, n_groups

        n = len(names)
        limit = self.config.max_candidates
        if n <= 24 and n_groups(n, 2) <= limit:
            return all_groups(n, min_size=2)
        groups = list(dict.fromkeys(self.train_groups(names)))
        if n * (n - 1) // 2 + len(groups) <= limit:
            groups += [g for g in sample_groups(names, method="pairs") if g not in set(groups)]
        rest = max(limit - len(groups), 0)
        if rest and n >= 3:
            seen = set(groups)
            drawn = sample_groups(names, n_groups=rest, min_size=3, seed=self.config.seeds[0] + 1)
            groups += [g for g in drawn if g not in seen]
        return groups_to_masks(groups, names)

    # ------------------------------------------------------------------ logging
    def logger(self, run_dir: Path, *, resume: dict[str, Any] | None = None):
        """The Lightning logger the config names (``None`` for ``none``), writing under ``run_dir/logs``.

        ``resume`` (the stored ``logger`` record of the affinity stage) reopens the same W&B run /
        TensorBoard version, so the report's figures land beside the fit's curves.
        """
        kind = self.config.logger
        if kind == "none":
            return None
        self.check_logger()  # before any folder is made
        logs = run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        if kind == "csv":
            from lightning.pytorch.loggers import CSVLogger

            return CSVLogger(save_dir=str(logs), name="csv", version=(resume or {}).get("version"))
        if kind == "tensorboard":
            try:
                from lightning.pytorch.loggers import TensorBoardLogger

                logger = TensorBoardLogger(save_dir=str(logs), name="tensorboard",
                                           version=(resume or {}).get("version"), default_hp_metric=False)
                logger.experiment  # noqa: B018  (fails here, not mid-fit, without tensorboard)
                return logger
            except ModuleNotFoundError:
                raise UserError("logger 'tensorboard' needs tensorboard: pip install tensorboard") from None
        try:
            import wandb  # noqa: F401
            from lightning.pytorch.loggers import WandbLogger
        except ModuleNotFoundError:
            raise UserError("logger 'wandb' needs wandb: pip install 'lightning-etap[wandb]'") from None
        run_id = (resume or {}).get("id")
        mode = {} if self.config.wandb_mode is None else {"mode": self.config.wandb_mode}  # None: WANDB_MODE
        logger = WandbLogger(project=self.config.wandb_project, save_dir=str(logs), name=f"{self.config.dataset}-etap",
                             id=run_id, resume="allow" if run_id else None,
                             config=json.loads(json.dumps(self.config.to_dict())), **mode)
        try:
            logger.experiment  # noqa: B018  (starts the run here: a login problem fails now, in one line)
        except Exception as err:  # wandb raises its own error types, from several modules
            if type(err).__module__.split(".")[0] != "wandb":
                raise
            raise UserError(f"W&B could not start a run ({str(err).strip().splitlines()[0]}): run `wandb login` "
                            "or set WANDB_API_KEY, or log offline with --wandb-mode offline "
                            "(WANDB_MODE=offline)") from None
        return logger


def logger_record(logger) -> dict[str, Any]:
    """What :meth:`Workspace.logger` needs to reopen ``logger`` later (stored with the affinity stage)."""
    if logger is None:
        return {}
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        return {"kind": "wandb", "id": logger.version}
    return {"kind": type(logger).__name__, "version": logger.version, "log_dir": str(logger.log_dir)}


def group_label(group: Sequence[str]) -> str:
    """``"a + b + c"``."""
    return " + ".join(group)
