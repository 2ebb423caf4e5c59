"""The pipeline's settings: one flat mapping, from defaults, a YAML file and the command line.

Every setting has a default (:data:`DEFAULTS`); a YAML file (``--config``)
overrides some, the command line's options override the file, and a run
directory's saved ``config.yaml`` is the base when a run is resumed. Unknown
keys and wrong types are refused with a :class:`~lightning_etap.pipeline.UserError`
that names the key and the allowed values.

Only :mod:`yaml` and the standard library are imported here, so reading a
config costs nothing.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_etap.pipeline.errors import UserError

__all__ = [
    "DEFAULTS",
    "ENGINES",
    "EXECUTORS",
    "IDENTITY_KEYS",
    "LOGGERS",
    "PipelineConfig",
    "read_yaml",
    "resolve_config",
]

#: Where the ground-truth jobs run.
EXECUTORS = ("local", "processes", "ray")
#: Which Lightning logger records the all-task fit (and, for W&B / TensorBoard, the report's figures).
LOGGERS = ("none", "csv", "tensorboard", "wandb")
WANDB_MODES = ("online", "offline")
#: Arguments of :class:`~lightning_etap.affinity.AffinityCallback` the pipeline sets itself (not in ``affinity:``).
_AFFINITY_FIXED = ("self", "shared", "tasks", "keep_step_scores")
#: Arguments of :class:`~lightning_etap.predictors.ETAPPredictor` the pipeline sets itself (not in ``predictor:``).
_PREDICTOR_FIXED = ("self", "affinity", "task_names")

#: Settings that define the experiment: a run directory keeps them for life (resuming with other values is
#: refused). Everything else (groups sampled, budgets, executor, logger, ...) may change between runs; the
#: stages that depend on a changed setting are redone.
IDENTITY_KEYS = ("dataset", "dataset_options", "preset", "recipe", "engine", "tasks", "model", "datamodule",
                 "code_version", "shared", "trainer", "affinity")
#: How the gains stage chooses its training groups besides the all-task group.
SAMPLINGS = ("random", "active")
#: How the reference model's ground-truth groups train (see :func:`~lightning_etap.training.train_group`).
ENGINES = ("loop", "lightning")


@dataclass(frozen=True)
class PipelineConfig:
    """Everything ``lightning-etap run`` needs, as written to ``config.yaml`` in the run directory.

    Attributes:
        dataset: a built-in dataset (``ettm1``, ``digits``, ``chemical``, ``school``,
            ``parkinsons``, ``landmine``); with ``model`` set, only a label (default ``custom``).
        data_root: data directory (default ``$LIGHTNING_ETAP_DATA`` or the per-user cache).
        dataset_options: keyword arguments of the dataset's loader.
        preset: training recipe of the reference model (default: the dataset's own).
        recipe: :class:`~lightning_etap.training.TrainConfig` fields overriding the preset,
            e.g. ``{max_epochs: 5, hidden: [32]}``.
        engine: how the reference model's ground-truth groups train: ``loop`` (default: a plain
            PyTorch loop, 1.6-2.2x less CPU time, the same numbers) or ``lightning`` (a Trainer per group).
            The all-task affinity fit always runs in a Lightning Trainer.
        tasks: the tasks to group (default: all of the dataset's).
        model: your own LightningModule: ``"package.module:function"``, called as
            ``function(tasks) -> LightningModule`` (tasks: a tuple of names).
        datamodule: your own data: ``"package.module:function"``, called as
            ``function(tasks, seed) -> LightningDataModule``.
        code_version: a label of your own model's and data's code (a git commit, ``"v2"``): the
            library cannot see inside your factories, so change it when their code changes; a run
            directory then refuses to mix the two, and the ground-truth store never reuses trainings
            of another version.
        shared: the shared submodule the affinity is measured on (``AffinityCallback(shared=...)``).
        trainer: :class:`lightning.Trainer` arguments for your own module (e.g. ``{max_epochs: 20}``);
            checked against the Trainer's signature (names and simple types).
        affinity: :class:`~lightning_etap.affinity.AffinityCallback` options (``method``, ``update``,
            ``every_n_steps``, ...: any argument but ``shared``, ``tasks`` and ``keep_step_scores``).
            The pipeline measures every step (``every_n_steps: 1``, repeatable to the bit) unless
            this says otherwise; ``every_n_steps: auto`` bounds the cost for a large model.
        affinity_from: a saved :class:`~lightning_etap.affinity.AffinityResult` directory
            (``callback.result.save(path)``) to use instead of the pipeline's own all-task fit:
            the affinity measured in your own training (multi-GPU DDP, a long run, another
            machine). It must hold every task of ``tasks``; other tasks are left out. The
            affinity stage is redone when the saved result changes.
        n_train_groups: ``|G_train|``: sampled multi-task groups trained for ground truth,
            besides the all-task group (always trained, as in the released code).
        sampling: how those groups are chosen: ``random`` (default, the paper's protocol:
            uniformly by size) or ``active`` (:func:`~lightning_etap.search.active_etap_search`
            after the all-task group: one group at a time, the one whose measurement is expected
            to improve the best measured grouping of at most ``max(budgets)`` groups most,
            under a Bayesian ETAP model of the measured gains; it needs the affinity stage).
        seeds: training seeds; gains are averaged over them. The first seed also seeds the
            all-task affinity fit and the group sampling.
        measure_all: also train every candidate group once, to score ETAP's choice against
            the true optimum: ``true``, ``false`` or ``auto`` (when there are at most 127 groups,
            i.e. at most 7 tasks).
        max_candidates: the candidate groups are every group when there are at most this many,
            else all pairs plus a uniform-by-size sample up to this many.
        predictor: :class:`~lightning_etap.predictors.ETAPPredictor` options (``stage1``, ``stage2``,
            ``cv``, ...: any argument but ``affinity`` and ``task_names``).
        budgets: the numbers of groups (networks) to select.
        singleton_gain: gain of a task trained alone in the selection (0: its own baseline).
        selection_time_limit: seconds per selection before the best one found is returned.
        executor: where ground-truth jobs train: ``local`` (this process), ``processes``
            (a local pool of ``workers``) or ``ray`` (a Ray cluster at ``ray_address``).
        workers: processes of the ``processes`` executor (Ray uses its cluster's CPUs).
        ray_address: Ray cluster address (``auto``, ``ray://host:10001``); ``null`` starts a local Ray.
        logger: ``none``, ``csv``, ``tensorboard`` or ``wandb``; it records the all-task fit, and
            W&B / TensorBoard also receive the report's figures.
        wandb_project: the W&B project.
        wandb_mode: ``online`` or ``offline`` (sync later with ``wandb sync``); ``null`` (default):
            W&B's own setting (``WANDB_MODE``, else online).
        output: the run directory (default ``runs/<dataset>``).
    """

    dataset: str | None = None
    data_root: str | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    engine: str = "loop"
    tasks: list[str] | None = None
    model: str | None = None
    datamodule: str | None = None
    code_version: str | None = None
    shared: str = "encoder"
    trainer: dict[str, Any] = field(default_factory=dict)
    affinity: dict[str, Any] = field(default_factory=dict)
    affinity_from: str | None = None
    n_train_groups: int = 10
    sampling: str = "random"
    seeds: list[int] = field(default_factory=lambda: [0])
    measure_all: bool | str = "auto"
    max_candidates: int = 20000
    predictor: dict[str, Any] = field(default_factory=dict)
    budgets: list[int] = field(default_factory=lambda: [2, 3, 4])
    singleton_gain: float = 0.0
    selection_time_limit: float = 60.0
    executor: str = "processes"
    workers: int = 2
    ray_address: str | None = None
    logger: str = "none"
    wandb_project: str = "lightning-etap"
    wandb_mode: str | None = None
    output: str | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """Every allowed key, in documentation order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "the config") -> PipelineConfig:
        """Validate ``values`` (any subset of :meth:`keys`) and fill in the rest from the defaults.

        Raises:
            UserError: an unknown key (named, with the allowed ones) or a value of the wrong type.
        """
        if not isinstance(values, Mapping):
            raise UserError(f"{source} must be a mapping of settings (key: value), got {type(values).__name__}")
        allowed = cls.keys()
        for key in values:
            if key not in allowed:
                raise UserError(f"unknown config key {key!r} in {source}; allowed keys: {', '.join(allowed)}")
        checked = {key: _CHECKS[key](key, value, source) for key, value in values.items()}
        return cls(**checked)

    def resolved(self) -> PipelineConfig:
        """The config with the defaults that depend on other keys filled in (dataset, preset, output)."""
        from lightning_etap.data.registry import DATASETS

        changes: dict[str, Any] = {}
        custom = self.model is not None or self.datamodule is not None
        if custom:
            if self.model is None or self.datamodule is None:
                raise UserError("your own module needs both 'model' and 'datamodule' import paths in the config")
            if not self.tasks:
                raise UserError("with your own 'model', list the task names under 'tasks' in the config")
            dataset = self.dataset or "custom"
            if self.preset is not None or self.recipe:
                raise UserError("'preset' and 'recipe' configure the reference model; with your own 'model' "
                                "put Lightning Trainer arguments under 'trainer' instead")
            if self.engine != DEFAULTS["engine"]:
                raise UserError(f"'engine' ({self.engine!r}) chooses how the reference model trains; your own "
                                "'model' always trains in a Lightning Trainer: leave 'engine' out")
        else:
            if self.code_version is not None:
                raise UserError("'code_version' labels your own 'model' and 'datamodule' code; the reference "
                                "model's version is the library's own")
            dataset = (self.dataset or "ettm1").lower()
            if dataset not in DATASETS:
                raise UserError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(sorted(DATASETS))} "
                                "(or give your own 'model' and 'datamodule')")
            if self.trainer:
                raise UserError("'trainer' applies to your own 'model'; for the reference model use 'recipe'")
            from lightning_etap.training import PRESETS, TrainConfig

            preset = (self.preset or (dataset if dataset in PRESETS else "chemical")).lower()
            if preset not in PRESETS:
                raise UserError(f"unknown preset {self.preset!r}; choose one of {', '.join(sorted(PRESETS))}")
            changes["preset"] = preset
            fields = [f.name for f in dataclasses.fields(TrainConfig)]
            for key in self.recipe:
                if key not in fields:
                    raise UserError(f"unknown recipe key {key!r}; allowed keys: {', '.join(fields)}")
            if "max_epochs" in self.recipe and not (isinstance(self.recipe["max_epochs"], int)
                                                    and self.recipe["max_epochs"] >= 1):
                raise UserError(f"--max-epochs (recipe.max_epochs) must be an integer >= 1, "
                                f"got {self.recipe['max_epochs']!r}")
        _check_options("affinity", self.affinity, "lightning_etap.affinity:AffinityCallback", _AFFINITY_FIXED)
        if self.affinity_from is not None:
            if self.affinity:
                raise UserError(f"'affinity' options ({', '.join(self.affinity)}) configure the all-task fit the "
                                "pipeline runs, and 'affinity_from' replaces that fit with a saved result: give one "
                                "of the two (a run directory keeps the 'affinity' options it was created with: "
                                "import into another --output)")
            # absolute: the saved config.yaml is read again by later commands, from any directory
            changes["affinity_from"] = str(Path(self.affinity_from).expanduser().resolve())
        _check_options("predictor", self.predictor, "lightning_etap.predictors:ETAPPredictor", _PREDICTOR_FIXED)
        changes["dataset"] = dataset
        if self.output is None:
            changes["output"] = str(Path("runs") / dataset)
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ views
    @property
    def custom(self) -> bool:
        """Whether the groups are your own module (``model`` / ``datamodule``) rather than the reference model."""
        return self.model is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists and dicts copied), in :meth:`keys` order."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        """The config as YAML, keys in documentation order."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def identity(self) -> dict[str, Any]:
        """The settings in :data:`IDENTITY_KEYS` (what a run directory is created for)."""
        full = self.to_dict()
        return {k: full[k] for k in IDENTITY_KEYS}

    def measures_all(self, n_tasks: int) -> bool:
        """Whether every candidate group is measured for ``n_tasks`` tasks (``measure_all`` resolved)."""
        if self.measure_all == "auto":
            return 2**n_tasks - 1 <= 127
        return bool(self.measure_all)


def _check_options(key: str, options: Mapping[str, Any], target: str, fixed: Sequence[str]) -> None:
    """Refuse option names that ``target`` (``"module:Class"``) does not take."""
    if not options:
        return
    import importlib
    import inspect

    module, _, name = target.partition(":")
    params = inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters
    allowed = [p for p in params if p not in fixed and params[p].kind is not inspect.Parameter.VAR_KEYWORD]
    for option in options:
        if option not in allowed:
            raise UserError(f"unknown {key} option {option!r}; allowed: {', '.join(allowed)}")


#: Trainer arguments the pipeline sets itself, with what to do instead
_TRAINER_OWN = {
    "logger": "choose the logger with 'logger' (--logger)",
    "callbacks": "return your callbacks from your LightningModule's configure_callbacks()",
}


def check_trainer(options: Mapping[str, Any], source: str = "the config") -> None:
    """Refuse ``trainer`` options :class:`lightning.Trainer` does not take, or of a type it does not take.

    Names are checked against the Trainer's signature (with the closest
    names as a hint), values against its type annotations where those are
    plain (numbers, strings, booleans, literals, ``None``); anything richer
    is left to the Trainer. :func:`resolve_config` checks the ``trainer`` a
    command gives (not one saved in a run directory, which already ran).
    """
    if not options or not isinstance(options, Mapping):
        return
    import difflib
    import inspect
    import typing

    import lightning as L

    _check_one_process(options, source)
    params = inspect.signature(L.Trainer.__init__).parameters
    try:
        hints = typing.get_type_hints(L.Trainer.__init__)
    except Exception:  # an annotation this Python cannot resolve: names only
        hints = {}
    for key, value in options.items():
        if key in _TRAINER_OWN and value not in (None, False, [], {}):  # (what the pipeline sets is harmless)
            raise UserError(f"config key 'trainer' in {source}: {key!r} is set by the pipeline; {_TRAINER_OWN[key]}")
        if key not in params or key == "self":
            close = difflib.get_close_matches(key, [p for p in params if p != "self"], n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise UserError(f"config key 'trainer' in {source}: lightning.Trainer has no argument {key!r}{hint}")
        if key in hints and _accepts(hints[key], value) is False:
            raise UserError(f"config key 'trainer' in {source}: {key} must be {_describe_hint(hints[key])} "
                            f"(lightning.Trainer's annotation), got {value!r}")


def _check_one_process(options: Mapping[str, Any], source: str) -> None:
    """Refuse a ``trainer`` that would start processes: Lightning's ``ddp`` launcher re-runs the whole command
    in each new process, and under ``ddp_spawn`` the measurement stays in the spawned workers."""
    strategy = options.get("strategy")
    devices = options.get("devices")
    many = (isinstance(devices, int) and not isinstance(devices, bool) and (devices > 1 or devices == -1)) or \
        (isinstance(devices, (list, tuple)) and len(devices) > 1) or \
        (isinstance(devices, str) and (devices.strip() == "-1" or "," in devices.strip(", ")))
    if many or (isinstance(strategy, str) and any(k in strategy.lower() for k in ("ddp", "fsdp", "deepspeed"))) \
            or (options.get("num_nodes") not in (None, 1)):
        raise UserError(
            f"config key 'trainer' in {source}: the pipeline trains one process per fit (strategy "
            f"{strategy!r}, devices {devices!r}, num_nodes {options.get('num_nodes')!r}): Lightning's "
            "multi-process launchers would re-run the whole "
            "command in every process. Scale the ground truth with --executor processes or ray instead; to "
            "measure the affinity of one multi-GPU fit, add AffinityCallback to your own Trainer (docs/callback.md)")


def _accepts(hint: Any, value: Any) -> bool | None:
    """Whether ``value`` fits the annotation ``hint``; ``None`` when the annotation is too rich to tell."""
    import types
    import typing

    origin = typing.get_origin(hint)
    if hint is type(None):
        return value is None
    if hint is typing.Any:
        return True
    if origin is typing.Union or origin is types.UnionType:
        verdicts = [_accepts(h, value) for h in typing.get_args(hint)]
        return True if True in verdicts else (None if None in verdicts else False)
    if origin is typing.Literal:
        return any(value == v and type(value) is type(v) for v in typing.get_args(hint))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) or None
    if origin is dict:
        return isinstance(value, dict) or None
    return None


def _describe_hint(hint: Any) -> str:
    import typing

    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal:
        return " or ".join(repr(a) for a in args)
    if args:
        return " or ".join(_describe_hint(a) for a in args)
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


#: Every setting's default.
DEFAULTS: dict[str, Any] = PipelineConfig().to_dict()


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping in a YAML config file (an empty file is an empty mapping).

    Raises:
        UserError: the file is missing or unreadable, is not valid YAML, or does not hold a mapping.
    """
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise UserError(f"config file {p} does not exist") from None
    except OSError as err:
        raise UserError(f"cannot read config file {p}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"config file {p} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of settings (key: value), got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------- value checks
def _fail(key: str, source: str, wanted: str, value: Any) -> UserError:
    return UserError(f"config key {key!r} in {source} must be {wanted}, got {value!r}")


def _opt_str(key, value, source):
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise _fail(key, source, "a non-empty string or null", value)
    return str(value)


def _str(key, value, source):
    if not isinstance(value, str) or not value:
        raise _fail(key, source, "a non-empty string", value)
    return value


def _choice(options):
    def check(key, value, source):
        text = str(value).lower() if isinstance(value, str) else value
        if text not in options:
            shown = ", ".join("null" if o is None else str(o) for o in options)
            raise UserError(f"config key {key!r} in {source} must be one of {shown}, got {value!r}")
        return text
    return check


def _mapping(key, value, source):
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(key, source, "a mapping (key: value)", value)
    return {str(k): v for k, v in value.items()}


def _int(minimum):
    def check(key, value, source):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _fail(key, source, f"an integer >= {minimum}", value)
        return int(value)
    return check


def _number(positive: bool):
    def check(key, value, source):
        if isinstance(value, str):  # YAML 1.1 reads 1e8 or -1e8 (no dot) as a string; so does the shell
            try:
                value = float(value)
            except ValueError:
                raise _fail(key, source, "a positive number" if positive else "a number", value) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
                or (positive and not value > 0):
            raise _fail(key, source, "a positive number" if positive else "a number", value)
        return float(value)
    return check


def _tasks(key, value, source):
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise _fail(key, source, "a non-empty list of task names or null", value)
    names = [str(t) for t in value]
    dup = sorted({t for t in names if names.count(t) > 1})
    if dup:
        raise UserError(f"config key {key!r} in {source} lists task(s) {dup} twice")
    return names


def _seeds(key, value, source):
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in value):
        raise _fail(key, source, "a non-empty list of integer seeds >= 0", value)
    if len(set(value)) != len(value):
        raise UserError(f"config key {key!r} in {source} lists a seed twice: {list(value)}")
    return [int(s) for s in value]


def _budgets(key, value, source):
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail(key, source, "a budget (number of groups) or a list of them", value)
    for b in value:
        if isinstance(b, bool) or not isinstance(b, int):
            raise _fail(key, source, "whole numbers of groups", b)
        if b < 1:
            raise UserError(f"budget must be >= 1 (the number of groups to train), got {b}")
    return sorted(set(int(b) for b in value))


def _code_version(key, value, source):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise UserError(f"config key {key!r} in {source} must be a string, got the number {value!r}: quote it "
                        f"(code_version: '...'), as YAML reads an all-digit git commit as a number")
    return _opt_str(key, value, source)


def _measure_all(key, value, source):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[value.lower()]
    raise _fail(key, source, "true, false or auto", value)


_CHECKS = {
    "dataset": _opt_str,
    "data_root": _opt_str,
    "dataset_options": _mapping,
    "preset": _opt_str,
    "recipe": _mapping,
    "engine": _choice(ENGINES),
    "tasks": _tasks,
    "model": _opt_str,
    "datamodule": _opt_str,
    "code_version": _code_version,
    "shared": _str,
    "trainer": _mapping,
    "affinity": _mapping,
    "affinity_from": _opt_str,
    "n_train_groups": _int(2),
    "sampling": _choice(SAMPLINGS),
    "seeds": _seeds,
    "measure_all": _measure_all,
    "max_candidates": _int(1),
    "predictor": _mapping,
    "budgets": _budgets,
    "singleton_gain": _number(False),
    "selection_time_limit": _number(True),
    "executor": _choice(EXECUTORS),
    "workers": _int(1),
    "ray_address": _opt_str,
    "logger": _choice(LOGGERS),
    "wandb_project": _str,
    "wandb_mode": _choice((*WANDB_MODES, None)),
    "output": _opt_str,
}
assert set(_CHECKS) == set(PipelineConfig.keys())


def resolve_config(config_file: str | os.PathLike[str] | None = None,
                   overrides: Mapping[str, Any] | None = None, *, max_epochs: int | None = None) -> PipelineConfig:
    """The config of a command: defaults < the run directory's saved ``config.yaml`` < ``config_file`` < ``overrides``.

    The run directory is ``overrides["output"]``, else the file's ``output``, else
    ``runs/<dataset>``; when it already holds a ``config.yaml``, that is the base, so
    ``lightning-etap report --output DIR`` needs no other option. A key the file or
    the options give replaces the saved value whole, mappings (``recipe``,
    ``trainer``, ...) included, so that a key removed from a mapping is removed.
    ``max_epochs`` goes to ``trainer`` with your own model, else to ``recipe``.

    Raises:
        UserError: an unreadable or invalid file, an unknown key or a bad value.
    """
    given: dict[str, Any] = {}
    if config_file is not None:
        given = dict(read_yaml(config_file))
        PipelineConfig.from_dict(given, f"config file {config_file}")  # names the file in errors
        check_trainer(given.get("trainer") or {}, f"config file {config_file}")
    if overrides:
        PipelineConfig.from_dict(dict(overrides), "the command-line options")  # names the options in errors
    for key, value in (overrides or {}).items():
        if isinstance(value, Mapping) and isinstance(given.get(key), Mapping):
            given[key] = {**given[key], **value}
        else:
            given[key] = value
    if "output" in given and given["output"] is not None:
        output = str(given["output"])
    else:
        dataset = given.get("dataset") or ("custom" if given.get("model") else "ettm1")
        output = str(Path("runs") / str(dataset).lower())
    saved_path = Path(output) / "config.yaml"
    merged: dict[str, Any] = {}
    if saved_path.is_file():
        merged = dict(read_yaml(saved_path))
        PipelineConfig.from_dict(merged, str(saved_path))
    # what this command gives replaces the saved value whole, mappings included: a file that says
    # `predictor: {}` means the defaults, not "keep what was saved"
    merged.update(given)
    merged["output"] = output
    if max_epochs is not None:
        key = "trainer" if merged.get("model") else "recipe"
        merged[key] = {**(merged.get(key) or {}), "max_epochs": max_epochs}
    return PipelineConfig.from_dict(merged, f"config file {config_file}" if config_file else "the options").resolved()
