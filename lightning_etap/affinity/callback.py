"""Measure ETAP or TAG task affinity inside any Lightning fit."""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_etap.affinity.dashboard import AffinityDashboard
from lightning_etap.affinity.gram import GramEngine
from lightning_etap.affinity.result import AffinityResult
from lightning_etap.affinity.scores import (
    REDUCTIONS,
    AffinityAccumulator,
    ExactTaskGradients,
    apply_update,
    lookahead_task_losses,
    optimizer_group_of,
    parameter_blocks,
    preserved_module_state,
    step_products,
    step_scores,
    tag_step_scores,
    task_update_rules,
)

__all__ = ["HALF_BLOCK_STEPS", "SPLIT_HALF_WARN", "AffinityCallback", "reproducibility_warning"]

#: below this split-half Spearman correlation (``AffinityResult.split_half``) the end of fit warns that the
#: ranking of task pairs is not reproducible: the whole matrix's reliability, by the Spearman-Brown formula
#: ``2r / (1 + r)``, is then below 0.5
SPLIT_HALF_WARN = 1 / 3
#: the warning needs at least this many tasks (12 off-diagonal entries) and measured steps: with fewer, the
#: correlation of two halves is too noisy to tell a reproducible matrix from noise
WARN_MIN_TASKS = 4
WARN_MIN_STEPS = 4
#: the split halves take alternate blocks of measured steps spanning about this many optimizer steps (at least
#: one measured step), so that neighbouring steps, which share the optimizer's state, fall in the same half
HALF_BLOCK_STEPS = 10

SharedSpec = str | Sequence[Tensor] | Callable[[nn.Module], Iterable[Tensor]]

_CONTRACT = (
    'training_step must return a dict {"loss": total, "task_losses": {task: scalar loss tensor}} with the '
    "per-task losses still attached to the graph, e.g. "
    'return {"loss": sum(losses.values()), "task_losses": losses}'
)


#: > 0 while a TAG lookahead re-runs a training step
_LOOKAHEAD = [0]
_NO_GRADIENT = ("AffinityCallback: at every measured step every task's gradient on the shared parameters was 0, "
                "so the matrix is 0: check that shared= names the part of the model the task losses pass through")
#: Trainer precisions whose training forward matches a forward outside the precision context (TAG's lookahead)
_FULL_PRECISION = frozenset({"32-true", "64-true", "32", "64"})


@dataclass
class _Captured:
    task_losses: Mapping[str, Tensor]
    args: tuple
    kwargs: dict
    rng_state: Tensor | None


class AffinityCallback(Callback):
    r"""Task affinity (ETAP, or TAG's lookahead) measured during an ordinary fit.

    At every measured optimizer step it takes each task's loss ``L_j`` from the
    module's ``training_step`` output, the per-task gradients ``g_j`` of the
    shared parameters from the live autograd graph, the update ``u_i`` each
    task alone would make, and scores ``z[i→j] = g_j · u_i / L_j`` (paper
    eq. 5). Training is untouched: ``.grad``, the optimizer state, the RNG and
    the parameters are never changed (bit-for-bit the same run as without it).

    The module needs one thing: ``training_step`` returns
    ``{"loss": total, "task_losses": {task: scalar tensor}}``. The shared
    parameters are named by ``shared``.

    Defaults follow the authors' released code; the paper's text differs in
    three places: it does not divide by the learning rate (``divide_by_lr``),
    it uses SGD momentum in the update (``update="optimizer"``), and it averages
    all steps (``reduction="mean"``, eq. 6) where the code averages each epoch
    and sums the epochs.

    Args:
        shared: the shared parameters: a submodule name (``"encoder"``), a list
            of parameters, or a callable ``module -> parameters``. Frozen
            parameters (``requires_grad=False``) are left out. A name or a
            callable is resolved in ``setup`` (safe under ``ddp_spawn``).
        tasks: the tasks to measure, in the matrix's order; must be returned by
            every step (extra returned tasks are ignored). ``None``: every
            returned task, in the order of the first step's dict.
        method: ``"etap"`` (gradient products, eq. 5) or ``"tag"`` (Fifty et
            al. 2021): ``z[i→j] = 1 − L_j(θ_s − u_i) / L_j(θ_s)`` on the same
            batch, shared parameters moved, heads unchanged; the step function
            is called again once per task (no gradient, logging silenced,
            buffers and RNG restored and the RNG replayed so dropout draws the
            same masks). The step should have no other side effects.
        update: the per-task update ``u_i``. ``"gradient"`` (released code):
            ``u_i = η g_i`` with the parameter group's learning rate, momentum
            ignored. ``"optimizer"``: the step the real optimizer would take
            from its current state with ``g_i`` as the gradient, its state
            untouched. SGD: momentum, dampening, Nesterov, weight decay per
            parameter group; before the first step, PyTorch's own rule (the
            momentum buffer starts as the gradient, no dampening). Adam / AdamW
            (amsgrad, coupled or decoupled weight decay): the Adam step from the
            current ``(exp_avg, exp_avg_sq, step)`` with ``g_i`` (the zero state
            before the first step); non-linear in ``g_i``, so
            ``z[i→j] = g_j · adam_step(g_i) / L_j`` is this library's definition
            (no published method covers Adam).
        divide_by_lr: divide once more by the learning rate (released code:
            ``Z = G·Uᵀ / L_j / η``; with ``update="gradient"`` this leaves
            ``g_j·g_i / L_j``). Each parameter's contribution is divided by its
            own group's lr (exact even at lr 0). TAG divides by the lr of the
            first parameter group holding shared parameters; a step with lr 0
            is skipped.
        normalize_by_loss: divide column ``j`` by ``L_j`` (paper and code). A
            step whose ``L_j`` is exactly 0 leaves column ``j`` out (counted in
            ``result.zero_loss_skips``). TAG's score is a ratio already and
            always divides by ``L_j(θ_s)``.
        reduction: ``"epoch_mean_sum"`` (released code: mean of the step scores
            within each epoch, summed over epochs) or ``"mean"`` (eq. 6: mean
            over all measured steps).
        every_n_steps: which optimizer steps are measured. An integer ``k``:
            every k-th step (``global_step % k == 0``). ``"auto"`` (default):
            the first step of the fit is measured, and from the shapes it
            recorded (layer widths, rows, tasks, the gradient path taken) a
            multiply-add count of a measured step against a plain step picks
            the smallest ``k`` whose extra work stays near ``overhead`` times
            the training work; every k-th step after it is measured. The
            choice depends on shapes only, so reruns measure the same steps;
            it is recorded in ``result.settings["every_n_steps_chosen"]`` and
            checkpointed (under DDP rank zero's choice is broadcast). The
            model counts the fixed Python cost of a step too, which dominates
            small models.
        overhead: the target extra work of the measured steps of
            ``every_n_steps="auto"``, as a fraction of plain training (default
            0.1); where the control variate runs, its proxy adds at most half
            as much again.
        scope: which gradients are scored. ``"shared"`` (default): every
            shared parameter (the paper's score). Cheaper approximations whose
            agreement with it is measured in ``benchmarks/affinity_overhead.py``:
            ``"last_layer"``: only the last shared ``nn.Linear`` layer run in the
            forward pass; ``"representation"``: gradients of the task losses
            w.r.t. the shared module's output instead of any parameter (needs
            ``shared`` to name a submodule, and ``update="gradient"``).
        engine: how per-task gradient products are computed; both are exact.
            ``"fast"`` (default): from the activations of the shared
            ``nn.Linear`` layers (forward hooks; with per-task inputs all
            per-task gradients cost about one backward), exact autograd for
            any other shared parameter; ``"autograd"``: explicit per-task
            gradients of every shared parameter, one parameter block at a time.
            TAG always uses ``"autograd"`` (it needs the update vectors).
        control_variate: between measured steps, score every step with a cheap
            proxy and use it as a control variate. The proxy is the product of
            the last shared linear layer's per-task gradients, its weight
            gradients seen through a few leading directions of the layer's
            inputs (one backward per task through its own head, nothing
            through the rest of the encoder; :meth:`GramEngine.proxy_products
            <lightning_etap.affinity.gram.GramEngine.proxy_products>`); it
            follows the exact score's swings from batch to batch, so every
            unmeasured step gets the regression estimate
            ``X̄ + β (P_t − P̄)`` fitted per entry on the measured steps
            (:class:`~lightning_etap.affinity.scores.AffinityAccumulator`),
            which removes most of the sampling noise of a sparse schedule.
            ``"auto"`` (default): with ``every_n_steps="auto"``, on when the
            multiply-add model puts the proxy at no more than ``overhead``
            (wide encoders; not small models, where a backward call's fixed
            cost dominates), scoring every unmeasured step when it costs at
            most half of ``overhead`` and every other one otherwise, so that
            it adds at most half of ``overhead`` on top of the measured
            steps'. Off with an integer schedule. ``True``: always on, at
            every unmeasured step with an integer schedule, at every or every
            other one as the cost model chooses under ``"auto"`` (needs
            ``method="etap"``, ``scope="shared"``, ``engine="fast"`` and a
            shared submodule). Recorded in
            ``result.settings["control_variate_chosen"]``, ``["proxy_every"]``
            and ``["proxy_steps"]``.
        keep_step_scores: also keep every measured step's matrix (``result.step_matrices``).
        log_every_n_steps: log the running matrix to every logger of the Trainer
            as ``affinity/<source>-><target>`` scalars this often (``None``: the
            Trainer's ``log_every_n_steps``; ``0``: no curves). Rank zero only,
            through each logger's ``log_metrics`` (see :class:`AffinityDashboard`).
        heatmap: at the end of fit log the matrix as a heatmap (W&B: a table and
            an image; other loggers: ``affinity_heatmap.png``,
            ``affinity_matrix.csv`` and ``affinity_curves.csv`` in their log directory).
        save_dir: at the end of training global rank zero saves the result there
            (:meth:`AffinityResult.save`; read it back with
            :meth:`AffinityResult.load`). Under ``ddp_spawn`` the measurement
            lives in the worker processes, so this is how it reaches the caller.

    Reproducibility: the measured steps are split into two halves
    (proxy-scored steps go with the measured step before them), each reduced
    like the whole matrix, and ``result.split_half`` is the Spearman
    correlation of the two halves' off-diagonal entries
    (``result.split_half_pairs``: of what is left after each task's row and
    column effects): near 1 when the ranking of the pairs is settled,
    near 0 when it is mostly the noise of which steps happened to be
    measured. Below ``SPLIT_HALF_WARN`` (1/3: the whole matrix's
    reliability, about ``2r / (1 + r)``, below 0.5), with at least 4 tasks
    and 4 measured steps, the end of fit warns and names the fix (measure
    more steps). The halves take alternate blocks of measured steps spanning
    about 10 optimizer steps. It costs two more ``n x n`` sums.

    Gradient accumulation: every micro-batch of a measured step is scored on
    its own live graph and the micro-batch scores are averaged into the step's
    score. A step with a non-finite loss, gradient or score is skipped
    (counted in ``result.skipped_steps``, warned once).

    Data-parallel training (DDP): the per-task gradients and losses of a
    measured step are averaged over the ranks before they are multiplied, so
    every rank holds the affinity of the global batch, exactly what one
    process computes on it (TAG: the updates and the lookahead losses).

    Mixed precision: the per-task backward passes run on the step's own graph
    (bf16 / fp16 activations under autocast); products are accumulated in
    float32 / float64. With fp16 loss scaling (a ``GradScaler``) the seeds of
    the per-task backward passes are multiplied by the current scale against
    underflow and the gradients divided by it again; the task losses
    ``training_step`` returns are unscaled, so the scores are too.

    Raises:
        ValueError: invalid arguments; at fit time, a step without
            ``"task_losses"``, tasks missing from it, an unknown submodule
            name, no trainable shared parameter, or ``update="optimizer"``
            with an optimizer other than SGD / Adam / AdamW.
        NotImplementedError: manual optimization.

    Example:
        >>> from lightning_etap.affinity import AffinityCallback
        >>> affinity = AffinityCallback(shared="encoder")
        >>> # trainer = L.Trainer(callbacks=[affinity]); trainer.fit(model, datamodule)
        >>> # affinity.result.matrix, affinity.result.group_score(["a", "b", "c"])
    """

    def __init__(
        self,
        shared: SharedSpec = "encoder",
        tasks: Sequence[str] | None = None,
        *,
        method: str = "etap",
        update: str = "gradient",
        divide_by_lr: bool = True,
        normalize_by_loss: bool = True,
        reduction: str = "epoch_mean_sum",
        every_n_steps: int | str = "auto",
        overhead: float = 0.1,
        scope: str = "shared",
        engine: str = "fast",
        control_variate: bool | str = "auto",
        keep_step_scores: bool = False,
        log_every_n_steps: int | None = None,
        heatmap: bool = True,
        save_dir: str | None = None,
    ) -> None:
        if method not in ("etap", "tag"):
            raise ValueError(f"method must be 'etap' or 'tag', got {method!r}")
        if update not in ("gradient", "optimizer"):
            raise ValueError(f"update must be 'gradient' or 'optimizer', got {update!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if every_n_steps != "auto" and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
                                        or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive integer or 'auto', got {every_n_steps!r}")
        if isinstance(overhead, bool) or not isinstance(overhead, (int, float)) or not 0 < overhead <= 10:
            raise ValueError(f"overhead must be a fraction of training time in (0, 10], got {overhead!r}")
        if scope not in ("shared", "last_layer", "representation"):
            raise ValueError(f"scope must be 'shared', 'last_layer' or 'representation', got {scope!r}")
        if engine not in ("fast", "autograd"):
            raise ValueError(f"engine must be 'fast' or 'autograd', got {engine!r}")
        if control_variate not in ("auto", True, False):
            raise ValueError(f"control_variate must be True, False or 'auto', got {control_variate!r}")
        if control_variate is True and (method != "etap" or scope != "shared" or engine != "fast"):
            raise ValueError("control_variate=True needs method='etap', scope='shared' and engine='fast' (the "
                             "proxy is built from the fast engine's activations)")
        if scope != "shared" and method == "tag":
            raise ValueError(f"scope={scope!r} applies to method='etap' (TAG moves every shared parameter)")
        if scope == "representation" and update != "gradient":
            raise ValueError("scope='representation' has no optimizer state to follow: use update='gradient'")
        if scope == "representation" and not isinstance(shared, str):
            raise ValueError("scope='representation' needs shared= the name of the shared submodule, whose "
                             "output is the shared representation")
        if tasks is not None:
            if isinstance(tasks, str):
                raise TypeError(f"tasks must be a sequence of task names, not the string {tasks!r}")
            names = [str(t) for t in tasks]
            dup = sorted({t for t in names if names.count(t) > 1})
            if dup:
                raise ValueError(f"duplicate task name(s) {dup} in tasks")
            if len(names) < 2:
                raise ValueError(f"affinity needs at least two tasks, got {names}")
            tasks = names
        if isinstance(shared, nn.Module):  # callable, but calling it would run its forward
            raise TypeError(f"shared= a module object ({type(shared).__name__}): pass its name in the "
                            "LightningModule instead, e.g. shared='encoder' (a dotted path reaches nested ones), "
                            "or a callable such as lambda m: m.encoder.parameters()")
        if isinstance(shared, Tensor):  # one shared parameter
            shared = [shared]
        if not (isinstance(shared, str) or callable(shared)):
            if not isinstance(shared, Iterable):
                raise TypeError(f"shared must be a submodule name, a non-empty list of parameters or a callable "
                                f"module -> parameters, got {type(shared).__name__} {shared!r:.80}")
            shared = list(shared)
            if not shared or not all(isinstance(p, Tensor) for p in shared):
                raise ValueError("shared must be a submodule name, a non-empty list of parameters or a callable")
        self.shared = shared
        self.tasks = tasks
        self.method = method
        self.update = update
        self.divide_by_lr = bool(divide_by_lr)
        self.normalize_by_loss = bool(normalize_by_loss)
        self.reduction = reduction
        self.every_n_steps = every_n_steps
        self.overhead = float(overhead)
        self.scope = scope
        self.engine = engine
        self.control_variate = control_variate
        self.keep_step_scores = bool(keep_step_scores)
        self.dashboard = AffinityDashboard(log_every_n_steps=log_every_n_steps, heatmap=heatmap)
        self.save_dir = None if save_dir is None else str(save_dir)
        # run state lives in setup() (tensors made here would be shared between ddp_spawn workers)
        self._module: L.LightningModule | None = None
        self._loaded = False
        self._restore = True  # False while Lightning restores a checkpoint for validate / test / predict
        self._task_names: list[str] | None = None
        self._acc: AffinityAccumulator | None = None
        self._last_fit: tuple[int, weakref.ref] | None = None  # (global step, module) at the end of the last fit
        self._dropped = 0  # measured steps a new fit dropped (warned at train start, after any checkpoint restore)
        self._compiled = False  # the module holds torch.compile'd code (set in setup)
        self._holds_donated = False  # this callback keeps torch's donated buffers off (a compiled module)

    # ------------------------------------------------------------------ settings
    @property
    def settings(self) -> dict[str, Any]:
        """The measurement's settings, as stored with the result."""
        shared = self.shared if isinstance(self.shared, str) else (
            "callable" if callable(self.shared) else f"{len(self.shared)} parameters")
        return {
            "method": self.method, "update": self.update, "divide_by_lr": self.divide_by_lr,
            "normalize_by_loss": self.normalize_by_loss, "reduction": self.reduction,
            "every_n_steps": self.every_n_steps, "scope": self.scope, "shared": shared,
            **({"overhead": self.overhead} if self.every_n_steps == "auto" else {}),
            **({"control_variate": self.control_variate} if self._cv_possible() else {}),
        }

    def _cv_possible(self) -> bool:
        """Whether the control variate can be on (explicitly, or by the ``"auto"`` schedule's choice)."""
        if self.method != "etap" or self.scope != "shared" or self.engine != "fast":
            return False
        return self.control_variate is True or (self.control_variate == "auto" and self.every_n_steps == "auto")

    @property
    @override
    def state_key(self) -> str:
        extra = {"engine": self.engine} if self.engine != "fast" else {}  # both engines give the same numbers
        return self._generate_state_key(**self.settings, tasks=self.tasks, **extra)

    # ------------------------------------------------------------------ setup / teardown
    def _reset(self) -> None:
        self._task_names = list(self.tasks) if self.tasks is not None else None
        self._acc = None
        if self._task_names is not None:
            self._acc = AffinityAccumulator(len(self._task_names), self.keep_step_scores, split=True)
        self._measured = 0
        self._skipped = 0
        self._zero_loss: list[int] = [0] * len(self._task_names or [])
        self._absent: list[int] = [0] * len(self._task_names or [])  # steps each task was absent from
        self._pending_absent = torch.ones(len(self._task_names or []), dtype=torch.bool)
        self._warned: set[str] = set()
        # whether any measured step had a non-zero product / one between two different tasks (tensors, so that
        # a measured step never waits on the device for them; read once at the end of fit)
        self._seen_gradient: Tensor | bool = False
        self._seen_overlap: Tensor | bool = False
        # every_n_steps="auto": the step it was decided at (None: not yet) and the chosen interval
        self._anchor: int | None = None
        self._chosen: int | None = self.every_n_steps if isinstance(self.every_n_steps, int) else None
        self._proxy_every = 1  # the control variate's proxy scores every this-many-th unmeasured step
        self._proxy_ok = False  # the last measured step could compute the control variate's proxy
        # the control variate: True / False once known; None while "auto" has not decided
        if not self._cv_possible():
            self._cv: bool | None = False
        else:
            self._cv = True if (self.control_variate is True and self.every_n_steps != "auto") else None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        sharded = {c.__name__ for c in type(trainer.strategy).__mro__} & _SHARDED_STRATEGIES
        if sharded:
            raise NotImplementedError(
                f"AffinityCallback does not support {sharded.pop()}: it shards the shared parameters across "
                "devices, so no rank holds a task's whole gradient to measure. Measure under strategy='ddp' or on "
                "one device (a smaller model or a shorter run that fits)")
        if not pl_module.automatic_optimization:
            raise NotImplementedError(
                "AffinityCallback supports automatic optimization only: with manual optimization Lightning "
                "does not own the backward pass the per-task gradients are taken from"
            )
        self._params = _resolve_shared(pl_module, self.shared)
        self._blocks = parameter_blocks(self._params, pl_module)
        self._compiled = _compiled(pl_module)
        # compiled graphs have no batching rule for a vectorised backward: one backward call per task
        self._gradients = ExactTaskGradients(batched=not self._compiled)
        self._engine: GramEngine | None = None
        if self._compiled:
            self._prepare_compiled()
        elif self.method == "etap" and (self.engine == "fast" or self.scope != "shared"):
            root = pl_module.get_submodule(self.shared) if isinstance(self.shared, str) else None
            self._engine = GramEngine(pl_module, self._params, root=root, scope=self.scope)
        self._measuring = False
        # A second trainer.fit of the same Trainer and module goes on from the step the last one ended at (staged
        # training): the measurement goes on too, as from a checkpoint of that step. Anything else starts anew.
        last = self._last_fit
        continuing = (last is not None and last[0] == trainer.global_step > 0 and last[1]() is pl_module
                      and self._acc is not None)
        self._dropped = 0
        if not self._loaded and not continuing:
            # said at the start of training, once Lightning has restored any checkpoint (after setup): a
            # measurement resumed from a checkpoint drops nothing
            self._dropped = self._measured if self._acc is not None else 0
            self._reset()
        self._last_fit = None
        self._captured: _Captured | None = None
        self._pending: list[tuple[Tensor, Tensor, Tensor | None]] = []
        self._pending_bad = False
        self._pending_absent = torch.ones(len(self._task_names or []), dtype=torch.bool)
        self._proxying = False
        self._tag_state: tuple | None = None
        self._wrap(pl_module)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore = True
        if stage != "fit":
            return
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.close()
            self._engine = None
        if self._holds_donated:
            self._holds_donated = False
            _DONATED["holders"] -= 1
            if _DONATED["holders"] == 0 and _DONATED["saved"] is not None:
                _set_donated_buffers(_DONATED["saved"])
        self._unwrap()
        self._captured = None
        self._tag_state = None
        self._pending = []
        self._loaded = False
        self._last_fit = (trainer.global_step, weakref.ref(pl_module))

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # a failed fit must not leave the module wrapped

    def _prepare_compiled(self) -> None:
        """Measure a ``torch.compile``'d module: exact autograd, and a graph that can be backpropagated repeatedly.

        Inside a compiled graph the fast engine's forward hooks are unreliable (they may not run, and the
        activations they keep may be buffers the compiled code reuses), so the per-task gradients come from
        exact autograd. Its per-task backward calls go through the graph before the training step's own
        backward, which a graph compiled with donated buffers refuses: they are off while this fit runs (they
        save memory only; the numbers are the same) and restored at teardown.
        """
        if self.method == "etap" and self.scope != "shared":
            raise ValueError(
                f"AffinityCallback: scope={self.scope!r} reads the shared layers' activations through forward "
                "hooks, which do not run reliably inside a torch.compile'd module. Use scope='shared' (exact, "
                "measured with autograd on a compiled module), or measure without torch.compile")
        if not self._holds_donated:  # one hold per callback; torch's setting comes back when the last is released
            if _DONATED["holders"] == 0:
                _DONATED["saved"] = _set_donated_buffers(False)
            _DONATED["holders"] += 1
            self._holds_donated = True
        if self.method == "etap" and self.engine == "fast":
            rank_zero_warn("AffinityCallback: the module is torch.compile'd: the per-task gradients come from "
                           "exact autograd, one backward call per task (the fast engine's activation hooks are "
                           "unreliable inside compiled graphs): the same numbers, at a higher cost. Donated buffers "
                           "(torch._functorch.config.donated_buffer) are off during this fit, since the measurement "
                           "backpropagates through the graph more than once.", category=UserWarning)

    def _wrap(self, pl_module: L.LightningModule) -> None:
        self._unwrap()
        self._tap = _StepTap.attach(pl_module, self)
        self._module = pl_module

    def _unwrap(self) -> None:
        if self._module is None:
            return
        self._tap.detach(self._module, self)
        self._module = None

    def _capture(self, pl_module: L.LightningModule, out: Any, args: tuple, kwargs: dict,
                 rng: Tensor | None) -> None:
        trainer = pl_module._trainer
        if trainer is None or not trainer.training or _LOOKAHEAD[0]:
            return
        if out is None:  # Lightning skips this step
            self._captured = None
            return
        if not isinstance(out, Mapping) or "task_losses" not in out:
            got = f"a dict with keys {sorted(out)}" if isinstance(out, Mapping) else type(out).__name__
            raise ValueError(f"AffinityCallback: training_step returned {got}; {_CONTRACT}")
        losses = out["task_losses"]
        if not isinstance(losses, Mapping) or not losses:
            raise ValueError(f"AffinityCallback: 'task_losses' is {type(losses).__name__}; {_CONTRACT}")
        for key in losses:
            if not isinstance(key, str):
                raise TypeError(
                    f"AffinityCallback: the keys of task_losses must be task names (str); got {key!r} "
                    f"({type(key).__name__}). Name the tasks, e.g. {{f'task_{{i}}': loss for i, loss in "
                    "enumerate(per_task_losses)}"
                )
        if self._task_names is not None:  # every step, measured or not
            self._check_names(losses)
        self._captured = _Captured(losses, args, kwargs, rng)

    # ------------------------------------------------------------------ per step
    def _check_names(self, losses: Mapping[str, Tensor]) -> None:
        """The step returned every measured task (and, without ``tasks=``, no other)."""
        names = self._task_names
        missing = [t for t in names if t not in losses]
        if missing:
            where = "in tasks" if self.tasks is not None else "in the first step's task_losses"
            raise ValueError(
                f"AffinityCallback: task(s) {missing} named {where} are not in this step's task_losses "
                f"(it returned {list(losses)}); every step must return every measured task"
            )
        if self.tasks is None and len(losses) != len(names):
            extra = [t for t in losses if t not in names]
            raise ValueError(f"AffinityCallback: unknown task(s) {extra} in task_losses; measured tasks are {names}")

    def _ordered_losses(self, losses: Mapping[str, Tensor]) -> tuple[list[str], Tensor, list[Tensor]]:
        if self._task_names is None:
            returned = list(losses)
            if len(returned) < 2:
                raise ValueError(f"AffinityCallback needs at least two tasks; the step returned {returned}")
            self._task_names = returned
            self._acc = AffinityAccumulator(len(returned), self.keep_step_scores, split=True)
            self._zero_loss = [0] * len(returned)
            self._absent = [0] * len(returned)
            self._pending_absent = torch.ones(len(returned), dtype=torch.bool)
        names = self._task_names
        values = []
        like = next((v for v in losses.values() if isinstance(v, Tensor)), None)
        for t in names:
            v = losses[t]
            if isinstance(v, (float, np.floating)) and math.isnan(v) and like is not None:
                v = torch.full((), math.nan, dtype=like.dtype, device=like.device)  # absent, said as a number
            if isinstance(v, (int, float, np.number)):
                raise ValueError(
                    f"AffinityCallback: task_losses[{t!r}] is a Python number ({v!r}), not a tensor: did the step "
                    "call .item() on it? Return the loss tensor itself, still attached to the graph (log "
                    f".item() separately if you want); {_CONTRACT}")
            if not isinstance(v, Tensor) or v.numel() != 1:
                raise ValueError(f"AffinityCallback: task_losses[{t!r}] must be a scalar tensor; {_CONTRACT}")
            values.append(v.reshape(()))
        return names, torch.stack(values), values

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=RuntimeWarning)

    def _bad_step(self, why: str) -> None:
        self._pending_bad = True
        self._warn_once("nonfinite", f"AffinityCallback: skipping a step with {why} (further skips counted silently "
                        "in result.skipped_steps)")

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        opt = self._optimizer(trainer)
        task_update_rules(opt, self._params, self.update)  # validates the optimizer early
        if self._dropped and not self._loaded:
            rank_zero_warn(
                f"AffinityCallback: this fit starts a new measurement; the previous fit's ({self._dropped} "
                "measured steps) is dropped. Keep it first (result = affinity.result), or fit on with the same "
                "Trainer and module to go on measuring.", category=UserWarning)
        self._dropped = 0

    def _optimizer(self, trainer: L.Trainer) -> torch.optim.Optimizer:
        ids = {id(p) for p in self._params}
        for opt in trainer.optimizers:
            if any(id(p) in ids for g in opt.param_groups for p in g["params"]):
                return opt
        raise ValueError("AffinityCallback: no optimizer updates the shared parameters")

    # ------------------------------------------------------------------ schedule
    def _is_measured(self, trainer: L.Trainer) -> bool:
        """Whether the optimizer step about to run is measured."""
        step = trainer.global_step
        if self.every_n_steps != "auto":
            return step % self._chosen == 0
        if self._chosen is None:  # "auto" before its first measured step: measure it and decide there
            return True
        return (step - self._anchor) % self._chosen == 0

    def _decide_interval(self, trainer: L.Trainer, n: int) -> None:
        """``"auto"``: fix the interval after the first measured step, from multiply-add counts."""
        if self.every_n_steps != "auto" or self._chosen is not None:
            return
        plain = None
        if self.method == "tag":  # n lookahead forwards plus n per-task backward passes: about n plain steps
            ratio = float(n)
        elif self._engine is not None and self._engine.last_costs is not None:
            plain, extra = self._engine.last_costs
            ratio = extra / plain
        else:  # explicit per-task gradients: about n backward passes against forward + backward
            ratio = 2.0 * n / 3.0
        cv, every = False, 1
        if self._cv is None:  # the control variate: on when its proxy costs at most half the budget, scored at
            # every step or, when one proxy costs up to the whole budget, at every other step
            proxy = self._engine.last_proxy_macs if self._engine is not None else None
            if proxy is not None and plain is not None and self._proxy_ok:
                p = proxy / plain
                cv = self.control_variate is True or p <= self.overhead
                every = 1 if p <= self.overhead / 2 else 2
        k = max(1, math.ceil(ratio / self.overhead - 1e-9))
        if trainer.world_size > 1:  # every rank measures the same steps
            k, cv, every = trainer.strategy.broadcast((k, cv, every), src=0)
        self._chosen, self._anchor = int(k), trainer.global_step
        if self._cv is None:
            self._cv = bool(cv) and k > 1  # with every step measured the proxy has nothing to estimate
            # every other step: with every 2nd step measured, the unmeasured steps are those (all odd offsets,
            # which the offset rule of on_train_batch_start would never pick)
            self._proxy_every = (1 if k == 2 else int(every)) if self._cv else 1

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._measuring = self._is_measured(trainer)
        offset = trainer.global_step - (self._anchor or 0)  # integer schedules have no anchor and score every step
        self._proxying = not self._measuring and self._cv is True and offset % self._proxy_every == 0
        if (self._measuring or self._proxying) and self._engine is not None:
            self._engine.start_step(proxy=self._cv is not False)

    def _all_reduce(self, trainer: L.Trainer) -> Callable[[Tensor], Tensor] | None:
        """Averages a tensor over the data-parallel ranks (``None`` on one process)."""
        if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return None
        world = trainer.world_size

        def mean(t: Tensor) -> Tensor:
            t = t.detach().clone()
            torch.distributed.all_reduce(t)
            return t / world

        return mean

    @staticmethod
    def _grad_scale(trainer: L.Trainer) -> float:
        """The fp16 loss scale of the step (1.0 without a ``GradScaler``)."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
            return 1.0
        return float(scaler.get_scale())

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        cap, self._captured = self._captured, None
        if cap is None or not (self._measuring or self._proxying):
            return
        self._measure(trainer, cap, loss)

    def _measure(self, trainer: L.Trainer, cap: _Captured, total: Tensor) -> None:
        names, losses, parts = self._ordered_losses(cap.task_losses)
        values = losses.detach()
        # a NaN loss marks an absent task, attached or not (below)
        detached = [t for k, t in enumerate(names) if not parts[k].requires_grad and bool(torch.isfinite(values[k]))]
        if detached:
            self._warn_once("detached", f"AffinityCallback: task_losses {detached} are not attached to the autograd "
                            "graph; their gradients count as zero. Return the losses before .detach() / .item()")
        reduce = self._all_reduce(trainer)
        total_ok = torch.isfinite(total.detach().reshape(())).to(values.dtype)
        if reduce is not None:  # the global batch's losses; every rank then takes the same decisions
            both = reduce(torch.cat([values.double(), total_ok.double().reshape(1)]))
            values, total_ok = both[:-1].to(values.dtype), both[-1]
        finite = torch.isfinite(values)
        present = None  # every task is (the common case: one check, one wait on the device)
        if not bool(torch.cat([finite, total_ok.reshape(1) == 1]).all()):
            if float(total_ok) != 1.0:  # the training loss itself (on some rank) is not finite
                self._bad_step("a non-finite training loss")
                return
            # a task whose loss is NaN / inf while the training loss is finite (no labels in this batch, left out
            # of the total) is absent from the step: no gradient is taken through its loss, and its row and column
            # do not count (TAG: no lookahead from it either). Every task non-finite skips the step.
            if not bool(finite.any()):
                self._bad_step("a non-finite task loss")
                return
            present = finite
            parts = [p if ok else p.detach().nan_to_num(0.0, 0.0, 0.0) * 0.0
                     for p, ok in zip(parts, present.tolist(), strict=True)]
            losses = torch.stack(parts)
            values = torch.where(present, values, 0.0)
            self._pending_absent = self._pending_absent & ~present.cpu()
        else:
            self._pending_absent = torch.zeros_like(self._pending_absent)
        opt = self._optimizer(trainer)
        scale = self._grad_scale(trainer)
        if self.method == "etap":
            rules = task_update_rules(opt, self._params, self.update, per_unit_lr=self.divide_by_lr)
            proxy = None
            if self._cv is not False and self._engine is not None:
                proxy = self._engine.proxy_products(parts, rules, grad_scale=scale, all_reduce=reduce)
                self._proxy_ok = proxy is not None
            if not self._measuring:  # a proxy-only step of the control variate
                if proxy is None:
                    return
                self._engine.stop_step()
                scores, valid = step_scores(proxy, values, self.normalize_by_loss)
                self._add_micro(scores, _entries(valid, present), proxy=True)
                return
            if self._engine is not None:
                products = self._engine.products(losses, rules, grad_scale=scale, all_reduce=reduce, parts=parts)
            else:
                products = step_products(losses, self._params, rules, self._blocks, self._gradients,
                                         grad_scale=scale, all_reduce=reduce)
            self._decide_interval(trainer, len(names))
            self._note_products(products)
            scores, valid = step_scores(products, values, self.normalize_by_loss)
            proxy_scores = step_scores(proxy, values, self.normalize_by_loss)[0] if proxy is not None else None
            self._add_micro(scores, _entries(valid, present), proxy_scores)
            return
        # TAG: the per-task updates now (graph alive), the lookahead after the backward
        lr = None
        if self.divide_by_lr:
            lr = float(optimizer_group_of(opt, self._params[:1])[0]["lr"])
            if lr == 0:
                self._bad_step("learning rate 0 (TAG with divide_by_lr)")
                return
        rules = task_update_rules(opt, self._params, self.update)
        updates: list[Tensor | None] = [None] * len(self._params)
        for k, grads in self._gradients(losses, self._params, self._blocks, scale=scale):
            if reduce is not None:
                grads = reduce(grads.contiguous())
            updates[k] = apply_update(rules[k], grads)
        self._decide_interval(trainer, len(names))
        if updates:
            self._seen_gradient = torch.stack([u.ne(0).any() for u in updates]).any() | self._seen_gradient
        if not all(bool(torch.isfinite(u).all()) for u in updates):
            self._bad_step("a non-finite gradient or update")
            return
        # under reduced precision the step's own losses came from its autocast / half-precision forward, the
        # lookahead's from a forward outside it: their ratio would measure the rounding, not the update. Then
        # the reference losses are recomputed by the lookahead's own forward (one more forward per step).
        same = str(trainer.precision) in _FULL_PRECISION
        self._tag_state = (names, values if same else None, updates, lr, cap, reduce, present)

    @override
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state, self._tag_state = self._tag_state, None
        if state is None:
            return
        names, before, updates, lr, cap, reduce, present = state
        # an absent task: no lookahead from it (its update is zero), and its column does not count
        sources = None if present is None else torch.nonzero(present).flatten().tolist()
        original = self._tap.original

        def evaluate() -> Tensor:
            out = original(*cap.args, **cap.kwargs)
            return torch.stack([out["task_losses"][t].detach().reshape(()) for t in names])

        _LOOKAHEAD[0] += 1  # other affinity callbacks' wrappers ignore these calls
        try:
            with torch.no_grad(), _silenced_logging(pl_module), \
                    preserved_module_state(pl_module, cap.rng_state) as reset:
                if before is None:  # reduced precision: the reference losses from the lookahead's own forward
                    reset()
                    before = evaluate().double()
                    if reduce is not None:
                        before = reduce(before)
                after = lookahead_task_losses(self._params, updates, evaluate, reset, sources=sources)
        finally:
            _LOOKAHEAD[0] -= 1
        if reduce is not None:
            after = reduce(after)
        if present is not None:
            keep = present.to(before.device)
            before = torch.where(keep, before, 0.0)  # NaN when recomputed under reduced precision
            after = torch.where(keep.unsqueeze(0) & keep.unsqueeze(1).to(after.device), after, 0.0)
        scores, valid = tag_step_scores(before, after, lr)
        self._add_micro(scores, _entries(valid, present))

    def _note_products(self, products: Tensor) -> None:
        """Remember whether the products of a measured step carry anything (see :meth:`_check_signal`)."""
        nonzero = products != 0
        self._seen_gradient = nonzero.any() | self._seen_gradient
        self._seen_overlap = nonzero.fill_diagonal_(False).any() | self._seen_overlap

    def _check_signal(self, matrix: Any) -> None:
        """At the end of fit: warn about entries of ``matrix`` (the result's) no step measured, and when no measured
        step had a gradient, or none had two tasks' gradients meet."""
        if not self._measured:
            return
        never = [t for t, k in zip(self._task_names, self._absent, strict=True) if k >= self._measured]
        if never:
            rank_zero_warn(f"AffinityCallback: task(s) {never} had a NaN / inf loss at every measured step (absent "
                           "from all of them), so their rows and columns of the matrix are NaN. If a task has labels "
                           "in only some batches, measure more steps (every_n_steps=1); otherwise check its loss",
                           category=RuntimeWarning)
        names, n = self._task_names, self._measured
        rare = [f"{t} ({n - k} of {n})" for t, k in zip(names, self._absent, strict=True) if 2 * k > n and k < n]
        if rare:
            rank_zero_warn(f"AffinityCallback: task(s) {', '.join(rare)} were present in fewer than half of the "
                           "measured steps (NaN loss: no labels in the batch; under DDP, a task missing on any rank "
                           "is missing from the step), so their rows and columns rest on those steps only; measure "
                           "more steps (every_n_steps=1) or use larger batches", category=RuntimeWarning)
        zero = [f"{t} ({k} of {n})" for t, k in zip(names, self._zero_loss, strict=True) if k]
        if zero:
            rank_zero_warn(f"AffinityCallback: task(s) {', '.join(zero)} had a loss of exactly 0 in some measured "
                           "steps: those steps leave the task's column out (the score divides by its loss) but count "
                           "its row with its zero gradient, which biases the row (towards 0 with plain gradient "
                           "updates; momentum or Adam state still moves it). If 0 stands for 'no labels "
                           "in this batch', return NaN as that task's loss instead (and leave it out of the total): "
                           "the task is then absent from the step, row and column (result.zero_loss_skips counts "
                           "the zero-loss steps)", category=RuntimeWarning)
        # other entries no step measured: two tasks never present together, a zero loss
        pairs = [f"{names[i]}->{names[j]}" for i, j in zip(*np.nonzero(np.isnan(matrix)), strict=True)
                 if i != j and names[i] not in never and names[j] not in never]
        if pairs:
            listed = ", ".join(pairs[:8]) + (f" and {len(pairs) - 8} more" if len(pairs) > 8 else "")
            rank_zero_warn(f"AffinityCallback: no measured step scored {listed} (the two tasks were never present "
                           "in the same step, or the destination's loss was always 0), so those entries are NaN; "
                           "measure more steps (every_n_steps=1) or train longer", category=RuntimeWarning)
        if not bool(self._seen_gradient):
            rank_zero_warn(_NO_GRADIENT, category=RuntimeWarning)
        elif self.method == "etap" and not bool(self._seen_overlap):
            hint = ("with per-task inputs (each example belongs to one task) the gradients w.r.t. the "
                    "representation never share a row: use scope='shared'" if self.scope == "representation" else
                    "the tasks use disjoint parts of the shared parameters: check shared=, which should name the "
                    "parameters every task's loss goes through (the trunk or encoder), not the per-task heads")
            rank_zero_warn(f"AffinityCallback: at every measured step every product between two different tasks' "
                           f"gradients was exactly 0, so the matrix says nothing about how they interact; {hint}",
                           category=RuntimeWarning)

    def _add_micro(self, scores: Tensor, valid: Tensor, proxy: Tensor | bool | None = None) -> None:
        """Queue a micro-batch's scores and ``(n, n)`` mask of the entries that count (``proxy``: its proxy
        scores, or ``True`` when ``scores`` are proxy scores)."""
        checked = [scores] + ([proxy] if isinstance(proxy, Tensor) else [])
        if not all(bool(torch.isfinite(t[valid]).all()) for t in checked):
            self._bad_step("a non-finite gradient or score")
            return
        self._pending.append((scores, valid, proxy))

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        pending, bad = self._pending, self._pending_bad
        absent = self._pending_absent  # tasks absent from every micro-batch of the step
        self._pending, self._pending_bad = [], False
        self._pending_absent = torch.ones_like(absent)
        if bad:
            if self._measuring:  # a proxy-only step with a non-finite value is just left out
                self._skipped += 1
            return
        if not pending:
            return

        def mean(items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
            total = torch.zeros_like(items[0][0])
            count = torch.zeros_like(items[0][1], dtype=torch.float64)
            for s, v in items:
                total += torch.where(v, s, 0.0)
                count += v.double()
            ok = count > 0
            return torch.where(ok, total / count.clamp(min=1), 0.0), ok

        if pending[0][2] is True:  # a proxy-only step
            proxy, valid = mean([(s, v) for s, v, _ in pending])
            self._acc.add_proxy(trainer.current_epoch, proxy, valid)
            return
        scores, valid = mean([(s, v) for s, v, _ in pending])
        proxy = None
        if self._cv and all(isinstance(p, Tensor) for _, _, p in pending):
            proxy, _ = mean([(p, v) for _, v, p in pending])
        counted = valid.any(dim=0).cpu()  # columns some entry of which counted
        for j in torch.nonzero(absent).flatten().tolist():
            self._absent[j] += 1
        for j in torch.nonzero(~counted & ~absent).flatten().tolist():  # present, but its loss was 0 throughout
            self._zero_loss[j] += 1
        self._acc.block = max(1, math.ceil(HALF_BLOCK_STEPS / (self._chosen or 1)))
        self._acc.add(trainer.current_epoch, scores, valid, step=trainer.global_step, proxy=proxy)
        self._measured += 1
        if self.dashboard.is_due(trainer, trainer.global_step):
            self.dashboard.log_step(trainer, self._task_names, self._acc.matrix(self.reduction).numpy(),
                                    step=trainer.global_step)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._acc is not None and self._measured:
            result = self.result
            self._check_signal(result.matrix)
            self._check_reproducible(result)
            self.dashboard.log_final(trainer, result)
            if self.save_dir is not None and trainer.is_global_zero:
                result.save(self.save_dir)

    def _second_half_empty(self) -> bool:
        """Whether the measurement keeps split halves and every measured step fell in the first (a short fit);
        a measurement resumed from a checkpoint written before halves existed has none and is not short."""
        acc = self._acc
        return acc is not None and acc.halves is not None and min(acc.half_steps) == 0

    def _check_reproducible(self, result: AffinityResult) -> None:
        """Warn (rank zero) when the two split halves of the measurement rank the pairs differently."""
        message = reproducibility_warning(result.split_half, result.measured_steps, result.n_tasks, self._chosen,
                                          self.every_n_steps == "auto", halves=not self._second_half_empty())
        if message is not None:
            rank_zero_warn(message, category=RuntimeWarning)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._captured = None  # do not keep the step's graph alive
        if self._engine is not None:
            self._engine.stop_step()

    # ------------------------------------------------------------------ result
    @property
    def result(self) -> AffinityResult:
        """The measurement so far (after or during fit).

        Raises:
            RuntimeError: no step has been measured yet.
        """
        if self._acc is None or self._task_names is None:
            raise RuntimeError(
                "AffinityCallback has measured no training step yet; run trainer.fit first. (Under "
                "strategy='ddp_spawn' the fit runs in worker processes and the measurement stays there: pass "
                "save_dir= and read it with AffinityResult.load(save_dir).)")
        acc = self._acc
        steps = None
        if acc.keep_steps:
            n = acc.n
            stack = torch.stack(acc.step_scores) if acc.step_scores else torch.zeros(0, n, n, dtype=torch.float64)
            steps = (stack.numpy(), acc.steps)
        return AffinityResult(
            task_names=tuple(self._task_names),
            matrix=acc.matrix(self.reduction).numpy(),
            epoch_matrices=acc.epoch_means().numpy(),
            epochs=acc.epochs,
            step_matrices=None if steps is None else steps[0],
            steps=None if steps is None else steps[1],
            measured_steps=self._measured,
            skipped_steps=self._skipped,
            zero_loss_skips=dict(zip(self._task_names, self._zero_loss, strict=True)),
            absent_steps={t: k for t, k in zip(self._task_names, self._absent, strict=True) if k},
            half_matrices=None if (halves := acc.half_matrices(self.reduction)) is None else halves.numpy(),
            settings={**self.settings, "every_n_steps_chosen": self._chosen,
                      **({"control_variate_chosen": bool(self._cv), "proxy_steps": acc.proxy_steps,
                          "proxy_every": self._proxy_every} if self._cv_possible() else {})},
        )

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        schedule = {"anchor": self._anchor, "chosen": self._chosen, "control_variate": self._cv,
                    "proxy_every": self._proxy_every}
        if self._acc is None:
            return {"version": 1, "settings": self.settings, "task_names": self._task_names, "accumulator": None,
                    "schedule": schedule}
        return {
            "version": 1,
            "settings": self.settings,
            "task_names": list(self._task_names),
            "accumulator": self._acc.state_dict(),
            "measured_steps": self._measured,
            "skipped_steps": self._skipped,
            "zero_loss_skips": list(self._zero_loss),
            "absent_steps": list(self._absent),
            "schedule": schedule,
        }

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Lightning restores callbacks for validate / test / predict too: a measurement resumes only with a fit
        self._restore = trainer.state.fn == TrainerFn.FITTING
        if not self._restore:
            return
        # Lightning hands a callback its state only under an identical state_key, which holds the settings: a
        # measurement saved with other settings would be dropped with a generic warning and restart silently
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return  # load_state_dict receives it
        saved = {k: v for k, v in states.items() if _is_measurement(v)}
        # pair saved measurements with this Trainer's affinity callbacks: identical keys first, then equal
        # settings (another engine gives the same numbers), in callback order
        callbacks = [cb for cb in trainer.callbacks if isinstance(cb, AffinityCallback)]
        free = [k for k in saved if k not in {cb.state_key for cb in callbacks}]
        adopted: dict[int, str] = {}
        for cb in callbacks:
            if cb.state_key in saved:
                continue
            match = next((k for k in free if k not in adopted.values()
                          and not _settings_diff(saved[k].get("settings", {}), cb.settings)), None)
            if match is not None:
                adopted[id(cb)] = match
        if id(self) in adopted:
            self.load_state_dict(saved[adopted[id(self)]])
            return
        left = [k for k in free if k not in adopted.values()]
        if not left:
            rank_zero_warn("AffinityCallback: the checkpoint holds no measurement for this callback; it measures "
                           f"only the steps from here on (step {checkpoint.get('global_step', '?')})",
                           category=RuntimeWarning)
            return
        key = left[0]
        diff = _settings_diff(saved[key].get("settings", {}), self.settings)
        raise ValueError(
            f"AffinityCallback: the checkpoint's affinity measurement was made with other settings {diff} "
            "(checkpoint value, this callback's); resume with the checkpoint's settings to continue it. To start "
            "a new measurement from this checkpoint instead, remove the old one from it first: "
            "ckpt = torch.load(path, weights_only=False); "
            f"del ckpt['callbacks'][{key!r}]; torch.save(ckpt, path)"
        )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self._restore:  # validate / test / predict from a checkpoint: keep the fit's measurement
            self._restore = True
            return
        diff = _settings_diff(state_dict.get("settings", {}), self.settings)
        if diff:
            raise ValueError(f"AffinityCallback: checkpoint was measured with other settings {diff} "
                             "(checkpoint value, current value)")
        names = state_dict.get("task_names")
        if self.tasks is not None and names is not None and list(names) != list(self.tasks):
            raise ValueError(f"AffinityCallback: checkpoint measured tasks {names}, this callback {self.tasks}")
        self._reset()
        if state_dict.get("accumulator") is not None:
            self._task_names = list(names)
            self._acc = AffinityAccumulator.from_state_dict(state_dict["accumulator"])
            if self._acc.halves is None:
                self._warn_once("no-halves", "AffinityCallback: this checkpoint was written before split halves "
                                "existed, so result.split_half stays None for the rest of this fit")
            self._measured = int(state_dict["measured_steps"])
            self._skipped = int(state_dict["skipped_steps"])
            self._zero_loss = [int(v) for v in state_dict["zero_loss_skips"]]
            self._absent = [int(v) for v in state_dict.get("absent_steps", [0] * len(self._zero_loss))]
            self._pending_absent = torch.ones(len(self._task_names), dtype=torch.bool)
        schedule = state_dict.get("schedule")
        if schedule is not None and self.every_n_steps == "auto":
            self._anchor = schedule["anchor"]
            self._chosen = schedule["chosen"]
        if schedule is not None and self._cv_possible() and "control_variate" in schedule:
            self._cv = schedule["control_variate"]
            self._proxy_every = int(schedule.get("proxy_every", 1))
        self._loaded = True


# ---------------------------------------------------------------------- helpers
def _is_measurement(state: Any) -> bool:
    """Whether a checkpoint's callback state is an :class:`AffinityCallback` measurement."""
    return isinstance(state, Mapping) and {"version", "settings", "task_names", "accumulator"} <= set(state)


def _settings_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{setting: (saved value, current value)}`` for the settings both name and that differ."""
    return {k: (saved[k], v) for k, v in current.items() if k in saved and saved[k] != v}


def reproducibility_warning(split_half: float | None, measured_steps: int, n_tasks: int, every: int | None,
                            auto: bool, *, halves: bool = True) -> str | None:
    """The end-of-fit warning for a matrix whose ranking is not reproducible, or ``None``.

    It warns when fewer than :data:`WARN_MIN_STEPS` steps were measured (too few to trust or to judge), and
    when the split-half Spearman correlation is below :data:`SPLIT_HALF_WARN` with at least
    :data:`WARN_MIN_TASKS` tasks, and names the fix for the schedule: ``every`` is the interval measured
    (``None`` or 1: every step), ``auto`` whether the callback chose it. ``halves=False`` (the measured
    steps did not reach the second split half: a short fit) warns too, as the matrix's reproducibility is
    then unknown.
    """
    k = every or 1
    if k == 1:
        schedule, fix = "every step", "train longer or on larger batches"
    elif auto:
        schedule, fix = (f"one step in {k}, chosen by every_n_steps='auto'",
                         f"raise overhead (now measuring one step in {k}) or pass a smaller integer every_n_steps")
    else:
        schedule, fix = f"one step in {k}", "pass a smaller every_n_steps (1 measures every step) or train longer"
    if measured_steps < WARN_MIN_STEPS:
        if measured_steps == 0:
            return None
        few = "train longer" if k == 1 else "pass a smaller every_n_steps for a fit this short (1 measures every step)"
        return (f"AffinityCallback: only {measured_steps} step(s) measured ({schedule}): the matrix rests on "
                f"{measured_steps} batch(es), too few to trust or to judge its reproducibility. To trust it, {few}.")
    if not halves and n_tasks >= WARN_MIN_TASKS:
        return (f"AffinityCallback: {measured_steps} steps measured ({schedule}) all fell in the first split half "
                "(halves alternate in blocks of about 10 optimizer steps), so there is no split-half figure and "
                "the matrix's reproducibility is unknown. To judge it, train longer (the second half starts after "
                "about 10 optimizer steps; several blocks in each half give a steady figure)"
                + ("" if k == 1 else " or pass a smaller every_n_steps") + ".")
    if split_half is None or split_half >= SPLIT_HALF_WARN or n_tasks < WARN_MIN_TASKS:
        return None
    whole = 2 * split_half / (1 + split_half) if split_half > 0 else None
    reliability = "" if whole is None else f"; the whole matrix's reliability is about {whole:.2f}"
    return (f"AffinityCallback: the affinity ranking is not reproducible: two halves of the measured steps rank "
            f"the task pairs with Spearman {split_half:.2f}{reliability} ({measured_steps} steps measured, "
            f"{schedule}), so the ranking is mostly noise. To trust it, {fix}; result.split_half holds the figure.")


class _StepTap:
    """One wrapper around a module's ``training_step`` shared by every affinity callback of the fit.

    It calls the original step, hands the output to each registered callback
    and returns it unchanged. Several callbacks can measure one fit (e.g. with
    different settings); the original is put back when the last one detaches.
    """

    _ATTR = "_lightning_etap_step_tap"

    def __init__(self, module: nn.Module) -> None:
        self.original = module.training_step
        self.had_own = "training_step" in module.__dict__
        self.listeners: list[AffinityCallback] = []
        tap = self

        @functools.wraps(self.original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            rng = torch.get_rng_state() if any(cb.method == "tag" for cb in tap.listeners) else None
            out = tap.original(*args, **kwargs)
            for cb in list(tap.listeners):
                cb._capture(module, out, args, kwargs, rng)
            return out

        self.wrapper = training_step

    @classmethod
    def attach(cls, module: nn.Module, callback: AffinityCallback) -> _StepTap:
        tap = module.__dict__.get(cls._ATTR)
        if tap is None:
            tap = cls(module)
            module.__dict__[cls._ATTR] = tap
            module.__dict__["training_step"] = tap.wrapper
        if callback not in tap.listeners:
            tap.listeners.append(callback)
        return tap

    def detach(self, module: nn.Module, callback: AffinityCallback) -> None:
        if callback in self.listeners:
            self.listeners.remove(callback)
        if self.listeners or module.__dict__.get(self._ATTR) is not self:
            return
        del module.__dict__[self._ATTR]
        if module.__dict__.get("training_step") is self.wrapper:  # nobody wrapped over us
            if self.had_own:
                module.__dict__["training_step"] = self.original
            else:
                del module.__dict__["training_step"]


def _resolve_shared(pl_module: nn.Module, shared: SharedSpec) -> list[Tensor]:
    """The trainable shared parameters named by ``shared`` (deduplicated, in order)."""
    if isinstance(shared, str):
        try:
            sub = pl_module.get_submodule(shared)
        except AttributeError:
            children = [name for name, _ in pl_module.named_children()]
            hint = ""
            if shared in dict(pl_module.named_parameters()):
                hint = f" ({shared!r} is a parameter: pass shared=[module.get_parameter({shared!r})])"
            raise ValueError(
                f"AffinityCallback: the module has no submodule {shared!r}{hint}; its submodules are {children} "
                "(a dotted path reaches nested ones, e.g. 'encoder.blocks'). "
                "Pass shared= a submodule name, a list of parameters or a callable module -> parameters"
            ) from None
        params = list(sub.parameters())
        what = f"submodule {shared!r}"
    else:
        params = list(shared(pl_module)) if callable(shared) else list(shared)
        what = "the given shared parameters"
        owned = {id(p) for p in pl_module.parameters()}
        foreign = [k for k, p in enumerate(params) if id(p) not in owned]
        if foreign:
            raise ValueError(f"AffinityCallback: {len(foreign)} of {what} (indices {foreign[:5]}) are not "
                             "parameters of the LightningModule")
    unique: dict[int, Tensor] = {}
    for p in params:
        unique.setdefault(id(p), p)
    params = list(unique.values())
    if not params:
        raise ValueError(f"AffinityCallback: {what} hold no parameters")
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError(f"AffinityCallback: all {len(params)} parameters of {what} are frozen (requires_grad=False); "
                         "the affinity is measured on trainable shared parameters")
    return trainable


def _entries(valid: Tensor, present: Tensor | None = None) -> Tensor:
    """The ``(n, n)`` mask of a step's entries that count: its valid columns, minus the rows and columns of the
    tasks not ``present`` in it."""
    n = valid.shape[0]
    mask = valid.bool().unsqueeze(0).expand(n, n)
    if present is not None:
        p = present.to(valid.device).bool()
        mask = mask & p.unsqueeze(0) & p.unsqueeze(1)
    return mask.clone()


#: strategies that shard parameters (and their gradients) across devices
_SHARDED_STRATEGIES = {"FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"}


def _compiled(module: nn.Module) -> bool:
    """Whether ``module`` runs ``torch.compile``'d code: compiled by Lightning (``trainer.fit(torch.compile(m))``),
    in place (``module.compile()``) or through a compiled submodule (``self.encoder = torch.compile(enc)``)."""
    if getattr(module, "_compiler_ctx", None) is not None:
        return True
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch without dynamo
        return False
    return any(isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
               for m in module.modules())


#: callbacks keeping torch's donated buffers off, and the setting to restore when the last one is done
_DONATED: dict[str, Any] = {"holders": 0, "saved": None}


def _set_donated_buffers(value: bool) -> bool | None:
    """Set torch's ``donated_buffer`` compile option; its previous value (``None``: this torch has none)."""
    try:
        from torch._functorch import config
    except ImportError:  # pragma: no cover
        return None
    previous = getattr(config, "donated_buffer", None)
    if previous is not None:
        config.donated_buffer = value
    return previous


@contextlib.contextmanager
def _silenced_logging(module: L.LightningModule):
    """``module.log`` / ``log_dict`` do nothing inside (the TAG lookahead re-runs the step)."""
    def noop(*args: Any, **kwargs: Any) -> None:
        return None

    saved = {k: module.__dict__[k] for k in ("log", "log_dict") if k in module.__dict__}
    module.log = noop
    module.log_dict = noop
    try:
        yield
    finally:
        for k in ("log", "log_dict"):
            if k in saved:
                setattr(module, k, saved[k])
            else:
                module.__dict__.pop(k, None)
