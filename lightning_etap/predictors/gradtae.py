"""GRAD-TAE: gain estimates from one all-task model, linearised (Li, Sharma & Zhang, KDD 2024, "Scalable
multitask learning using gradient-based estimation of task affinity"; the paper names its algorithm
Grad-TAG, the ETAP paper calls the baseline GRAD-TAE).

One model trained on all tasks, with parameters ``theta*`` (the paper's
meta-initialisation), stands in for every group's model through its
first-order Taylor expansion around ``theta*``::

    f_theta(x) ~ f_theta*(x) + grad f_theta*(x) . (theta - theta*)

where ``f`` is the task head's output (the logit of a binary task, the
prediction of a regression task). Restricting ``theta - theta* = R w`` to the
span of a random sign projection ``R`` (``p x d``, entries ``+-1/sqrt(d)``)
turns fine-tuning on a group ``S`` into a ``d``-dimensional generalised linear
model over the projected gradients ``g(x) = R^T grad f_theta*(x)``, with the
all-task model's output as a fixed offset::

    output_S(x) = f_theta*(x) + g(x) . w_S

``w_S`` is fitted on the training examples of ``S``'s tasks (logistic loss
for binary tasks, squared error for regression), and the member's estimated
loss on its held-out examples gives its relative gain against the same
estimate for the task alone (paper eq. 1).

* :func:`projected_gradients` computes the features from any model whose
  ``forward`` maps an input batch to a dict of per-task outputs (as
  :class:`~lightning_etap.models.MultiTaskMLP`) and a
  :class:`~lightning_etap.data.MultiTaskDataset`, a
  :class:`~lightning_etap.data.MultiTaskDataModule`, per-split tensors or
  per-split data loaders; per-example gradients come from ``torch.func``
  (``vmap`` over ``jacrev``) in bounded chunks.
* :class:`GradTAEPredictor` is the gain predictor over those features, with
  the interface of the other baselines; it needs no training groups.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit
from sklearn.exceptions import ConvergenceWarning

from ._baseline import BaselinePredictor, format_pairs
from ._persist import read_npz_document, write_npz_document
from ._validation import check_gains, check_masks, training_table

__all__ = ["GradTAEPredictor", "ProjectedGradients", "projected_gradients", "projection_matrix"]

_FORMAT = "lightning_etap.GradTAEPredictor"
_KINDS = ("binary", "regression")
_BASELINES = ("offset", "feature")
_ARRAYS = ("features", "offset", "target", "task", "held_out")


# --------------------------------------------------------------------------- features
def projection_matrix(
    n_parameters: int, dim: int = 200, seed: int = 0, *, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """Random sign projection: a ``(n_parameters, dim)`` tensor of independent, equally likely ``+-1/sqrt(dim)``.

    Every row has squared norm exactly 1 and ``E[R R^T] = I``, so
    ``E ||R^T g||^2 = ||g||^2`` for any gradient ``g`` (the Johnson-Lindenstrauss
    scaling). The signs are drawn on the CPU from a ``torch.Generator``
    seeded with ``seed``: the same matrix on every machine and device (the
    global RNG is not touched). Memory: ``n_parameters * dim`` values.

    Raises:
        ValueError: ``n_parameters`` or ``dim`` not a positive integer.
    """
    for name, value in (("n_parameters", n_parameters), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    generator = torch.Generator().manual_seed(int(seed))
    signs = torch.randint(0, 2, (int(n_parameters), int(dim)), generator=generator, dtype=torch.int8)
    return signs.to(dtype).mul_(2.0).sub_(1.0).div_(math.sqrt(dim)).to(device)


@dataclass(frozen=True, eq=False)
class ProjectedGradients:
    """Projected per-example gradients of one all-task model: the input of :class:`GradTAEPredictor`.

    One row per (example, output coordinate) of every task: a binary task
    has one row per example; a regression task with a ``k``-wide target has
    ``k`` rows per example, so that a task's loss (the mean over its rows) is
    the model's BCE / MSE. :func:`projected_gradients` builds it; any arrays
    of the same meaning can be passed directly.

    Args:
        features: ``(N, d)`` projected gradients ``R^T grad f_theta*(x)`` of the
            row's output (logit or prediction) w.r.t. the parameters.
        offset: ``(N,)`` the all-task model's output ``f_theta*(x)`` (logit or prediction).
        target: ``(N,)`` the label (0/1 for binary tasks) or target value.
        task: ``(N,)`` integer index of the row's task in ``task_names``.
        held_out: ``(N,)`` bool: True for rows on which losses are estimated
            (test or validation examples), False for rows the group models are fitted on.
        task_names: the ``n`` task names.
        task_kinds: ``"binary"`` or ``"regression"`` per task.
        seed: seed of the projection (information only).
        n_parameters: number of projected parameters ``p`` (information only).

    Raises:
        ValueError: inconsistent shapes, non-finite values, unknown kinds,
            binary targets other than 0/1, or a task without training or held-out rows.
    """

    features: np.ndarray
    offset: np.ndarray
    target: np.ndarray
    task: np.ndarray
    held_out: np.ndarray
    task_names: tuple[str, ...]
    task_kinds: tuple[str, ...]
    seed: int | None = None
    n_parameters: int | None = None

    def __post_init__(self) -> None:
        features = np.asarray(self.features)
        if features.dtype not in (np.float32, np.float64):
            features = features.astype(np.float64)
        put = object.__setattr__
        put(self, "features", features)
        put(self, "offset", np.asarray(self.offset, dtype=np.float64))
        put(self, "target", np.asarray(self.target, dtype=np.float64))
        put(self, "task", np.asarray(self.task, dtype=np.int64))
        put(self, "held_out", np.asarray(self.held_out, dtype=bool))
        put(self, "task_names", tuple(str(t) for t in self.task_names))
        put(self, "task_kinds", tuple(str(k) for k in self.task_kinds))
        if features.ndim != 2 or features.shape[1] < 1:
            raise ValueError(f"features must be a 2-D (rows, dim) array; got shape {features.shape}")
        rows = features.shape[0]
        for name in ("offset", "target", "task", "held_out"):
            if getattr(self, name).shape != (rows,):
                raise ValueError(
                    f"{name} must have shape ({rows},), one entry per feature row; got {getattr(self, name).shape}"
                )
        n = len(self.task_names)
        if n < 1 or len(set(self.task_names)) != n:
            raise ValueError(f"task_names must be non-empty and unique; got {list(self.task_names)}")
        if len(self.task_kinds) != n or any(k not in _KINDS for k in self.task_kinds):
            raise ValueError(
                f"task_kinds needs one of {_KINDS} per task ({n} tasks); got {list(self.task_kinds)}"
            )
        for name in ("features", "offset", "target"):
            if not np.isfinite(getattr(self, name)).all():
                raise ValueError(f"{name} has non-finite values: recompute the gradients of a finite model")
        if rows and (self.task.min() < 0 or self.task.max() >= n):
            raise ValueError(f"task indices must be in [0, {n}); got values in [{self.task.min()}, {self.task.max()}]")
        binary = np.array([k == "binary" for k in self.task_kinds])[self.task]
        if not np.isin(self.target[binary], (0.0, 1.0)).all():
            raise ValueError("binary tasks need 0/1 targets")
        for split, name in ((False, "training"), (True, "held-out")):
            have = np.bincount(self.task[self.held_out == split], minlength=n) > 0
            if not have.all():
                missing = [self.task_names[t] for t in np.flatnonzero(~have)]
                raise ValueError(f"task(s) {missing} have no {name} rows; every task needs both")

    def __repr__(self) -> str:
        return (f"ProjectedGradients({self.features.shape[0]} rows, dim={self.dim}, tasks={list(self.task_names)}, "
                f"seed={self.seed})")

    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    @property
    def dim(self) -> int:
        """The projection dimension ``d``."""
        return int(self.features.shape[1])


def _is_dataset(data) -> bool:
    return all(hasattr(data, a) for a in ("splits", "task_names", "task_kinds", "split"))


def _split_tensors(data, split: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``task -> (inputs, targets)`` of one split from any of the accepted data forms."""
    if _is_dataset(data):
        return {t: data.split(t, split) for t in data.task_names}
    if not isinstance(data, Mapping):
        raise TypeError(
            "data must be a MultiTaskDataset, a MultiTaskDataModule, or a mapping split -> "
            f"{{task: (inputs, targets)}} or split -> data loader; got {type(data).__name__}"
        )
    if split not in data:
        raise ValueError(f"data has no split {split!r}; it has {sorted(map(str, data))}")
    part = data[split]
    if isinstance(part, Mapping):
        return {str(t): (torch.as_tensor(xy[0]), torch.as_tensor(xy[1])) for t, xy in part.items()}
    xs: dict[str, list] = {}
    ys: dict[str, list] = {}
    for batch in part:  # batches as MultiTaskDataModule serves them: {"x": Tensor | {task: Tensor}, "y": {task: Tensor}}
        if not isinstance(batch, Mapping) or "x" not in batch or "y" not in batch:
            raise ValueError('data loader batches must be dicts {"x": inputs, "y": {task: targets}}')
        for t, y in batch["y"].items():
            x = batch["x"][t] if isinstance(batch["x"], Mapping) else batch["x"]
            xs.setdefault(str(t), []).append(torch.as_tensor(x))
            ys.setdefault(str(t), []).append(torch.as_tensor(y))
    return {t: (torch.cat(xs[t]), torch.cat(ys[t])) for t in xs}


def _select_parameters(model: torch.nn.Module, parameters) -> tuple[dict, dict]:
    """``(differentiated, fixed)`` name -> tensor dicts of the model's parameters and buffers (detached)."""
    named = dict(model.named_parameters())
    if parameters is None:
        chosen = [n for n, p in named.items() if p.requires_grad]
    else:
        prefixes = [parameters] if isinstance(parameters, str) else [str(p) for p in parameters]
        chosen = [n for n in named if any(n == q or n.startswith(q + ".") for q in prefixes)]
        unmatched = [q for q in prefixes if not any(n == q or n.startswith(q + ".") for n in named)]
        if unmatched:
            raise ValueError(f"parameters {unmatched} match no parameter of the model; names: {list(named)[:8]}...")
    if not chosen:
        raise ValueError("no parameter to differentiate: the model has no trainable parameters selected")
    grad = {n: named[n].detach() for n in chosen}
    fixed = {n: p.detach() for n, p in named.items() if n not in grad}
    fixed.update({n: b.detach() for n, b in model.named_buffers()})
    return grad, fixed


def _output_jacobian(model, grad_params, fixed, x, task):
    """Per-example Jacobian ``(B, k, p)`` of ``model(x)[task]`` w.r.t. ``grad_params`` and the outputs ``(B, k)``."""

    def output(params, xi):
        out = torch.func.functional_call(model, (params, fixed), (xi.unsqueeze(0),))[task].reshape(-1)
        return out, out

    jac, value = torch.func.vmap(torch.func.jacrev(output, has_aux=True), in_dims=(None, 0))(grad_params, x)
    b, k = value.shape
    return torch.cat([jac[n].reshape(b, k, -1) for n in grad_params], dim=2), value


def projected_gradients(
    model: torch.nn.Module,
    data,
    *,
    dim: int = 200,
    seed: int = 0,
    fit_split: str = "train",
    eval_split: str = "test",
    tasks: Sequence[str] | None = None,
    task_kinds: Sequence[str] | Mapping[str, str] | None = None,
    parameters: str | Sequence[str] | None = None,
    max_examples: int | None = None,
    chunk_size: int | None = None,
) -> ProjectedGradients:
    """Per-example gradients of an all-task model's outputs, randomly projected to ``dim`` dimensions.

    For every example ``x`` of every task ``t`` (in ``fit_split`` and
    ``eval_split``) and every coordinate ``j`` of its output: the row
    ``R^T d model(x)[t][j] / d theta`` at the model's current parameters, with
    ``R = projection_matrix(p, dim, seed)`` over the ``p`` differentiated
    parameters (flattened in ``named_parameters`` order), beside the output
    value itself and the target. The model is evaluated in ``eval()`` mode
    (no dropout) and its training mode is restored afterwards; its
    parameters are not changed.

    Args:
        model: the model trained on all tasks; ``model(x)`` for an input batch
            ``x`` of shape ``(B, features)`` must return a mapping from task
            name to the ``(B, k)`` (or ``(B,)``) outputs: logits for binary
            tasks, predictions for regression tasks (as
            :class:`~lightning_etap.models.MultiTaskMLP`). A LightningModule works as is.
        data: a :class:`~lightning_etap.data.MultiTaskDataset`, a
            :class:`~lightning_etap.data.MultiTaskDataModule` (its dataset and
            tasks are used), or a mapping ``split -> {task: (inputs, targets)}``
            or ``split -> iterable of batches`` in the data module's format
            (``{"x": inputs or {task: inputs}, "y": {task: targets}}``; pass
            loaders that visit every example once, such as the validation and
            test loaders, not the oversampling training loader).
        dim: projection dimension ``d`` (default 200, as Li et al.).
        seed: seed of the projection and of the subsampling.
        fit_split: the split the group models are fitted on (default ``"train"``).
        eval_split: the split the losses are estimated on (default ``"test"``, where
            eq. 1's ground truth is measured; ``"val"`` keeps the test split unseen).
        tasks: the tasks to include (default: the model's ``task_names``, else the data's tasks).
        task_kinds: ``"binary"`` / ``"regression"`` per task (default: the model's
            or the dataset's ``task_kinds``).
        parameters: the parameters to differentiate: names or name prefixes
            (``"encoder"`` selects ``encoder.*``); default every parameter with
            ``requires_grad``. The others are held fixed.
        max_examples: at most this many examples per task and split, drawn at
            random with ``seed`` (default all). Useful for multi-output tasks:
            a ``k``-wide target gives ``k`` rows per example.
        chunk_size: examples per vectorised Jacobian (default: about ``2**24``
            Jacobian entries per chunk, i.e. 64 MiB in float32). Memory is this
            chunk plus the projection (``p * dim`` values) plus the output rows.

    Returns:
        :class:`ProjectedGradients` in the model's floating dtype; rows ordered by
        split (fit, then eval), task, example and output coordinate.

    Raises:
        ValueError: unknown tasks or splits, missing task kinds, targets whose
            width does not match the outputs, or parameters that match nothing.

    Example:
        >>> from lightning_etap.data import load_dataset
        >>> from lightning_etap.models import MultiTaskMLP
        >>> data = load_dataset("digits").subset(["digit_3", "digit_8", "digit_5"])
        >>> model = MultiTaskMLP(data.feature_dim, data.task_names)  # train it on all tasks first
        >>> feats = projected_gradients(model, data, max_examples=40)
        >>> feats.features.shape, feats.n_parameters
        ((240, 200), 1123)
        >>> predictor = GradTAEPredictor(feats).fit()
        >>> predictor.predict(np.array([[True, True, False]])).shape
        (1, 3)
    """
    if hasattr(data, "dataset") and _is_dataset(data.dataset):  # a MultiTaskDataModule
        tasks = list(getattr(data, "tasks", data.dataset.task_names)) if tasks is None else tasks
        data = data.dataset
    if max_examples is not None and (isinstance(max_examples, bool) or int(max_examples) < 1):
        raise ValueError(f"max_examples must be None or a positive integer; got {max_examples!r}")
    splits = {False: _split_tensors(data, fit_split), True: _split_tensors(data, eval_split)}
    if tasks is None:
        tasks = getattr(model, "task_names", None) or (data.task_names if _is_dataset(data) else list(splits[False]))
    tasks = [str(t) for t in tasks]
    for held_out, part in splits.items():
        missing = [t for t in tasks if t not in part]
        if missing:
            raise ValueError(f"split {eval_split if held_out else fit_split!r} has no data for task(s) {missing}")
    kinds = _task_kinds(tasks, task_kinds, model, data)

    grad_params, fixed = _select_parameters(model, parameters)
    n_params = sum(p.numel() for p in grad_params.values())
    dtype = next(iter(grad_params.values())).dtype
    device = next(iter(grad_params.values())).device
    projection = projection_matrix(n_params, dim, seed, dtype=dtype, device=device)

    out = {name: [] for name in _ARRAYS}
    was_training = model.training
    model.eval()
    try:
        for held_out in (False, True):
            for index, task in enumerate(tasks):
                x, y = splits[held_out][task]
                if max_examples is not None and x.shape[0] > max_examples:
                    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 2 * index + int(held_out))
                    keep = torch.randperm(x.shape[0], generator=g)[: int(max_examples)].sort().values
                    x, y = x[keep], y[keep]
                y = y.reshape(y.shape[0], -1)
                width = max(1, y.shape[1])
                step = chunk_size or max(1, min(4096, 2**24 // (width * n_params)))
                for start in range(0, x.shape[0], int(step)):
                    xb = x[start : start + int(step)].to(device=device, dtype=dtype)
                    with torch.no_grad():
                        jac, value = _output_jacobian(model, grad_params, fixed, xb, task)
                        if value.shape[1] != y.shape[1]:
                            raise ValueError(
                                f"task {task!r}: the model outputs {value.shape[1]} value(s) per example but the "
                                f"targets have width {y.shape[1]}"
                            )
                        feats = (jac @ projection).reshape(-1, int(dim))
                    out["features"].append(feats.cpu().numpy())
                    out["offset"].append(value.reshape(-1).double().cpu().numpy())
                    out["target"].append(y[start : start + int(step)].reshape(-1).double().cpu().numpy())
                    out["task"].append(np.full(feats.shape[0], index, dtype=np.int64))
                    out["held_out"].append(np.full(feats.shape[0], held_out))
    finally:
        model.train(was_training)
    return ProjectedGradients(
        **{name: np.concatenate(parts) for name, parts in out.items()},
        task_names=tuple(tasks),
        task_kinds=tuple(kinds),
        seed=int(seed),
        n_parameters=int(n_params),
    )


def _task_kinds(tasks: list[str], task_kinds, model, data) -> list[str]:
    if task_kinds is not None:
        if isinstance(task_kinds, Mapping):
            missing = [t for t in tasks if t not in task_kinds]
            if missing:
                raise ValueError(f"task_kinds has no entry for task(s) {missing}")
            return [str(task_kinds[t]) for t in tasks]
        kinds = [str(k) for k in task_kinds]
        if len(kinds) != len(tasks):
            raise ValueError(f"task_kinds has {len(kinds)} entries for {len(tasks)} tasks")
        return kinds
    for source in (model, data):
        names, kinds = getattr(source, "task_names", None), getattr(source, "task_kinds", None)
        if names is not None and kinds is not None:
            known = {str(t): str(k) for t, k in zip(names, kinds)}
            if all(t in known for t in tasks):
                return [known[t] for t in tasks]
    raise ValueError(
        "the task kinds are unknown: pass task_kinds=['binary' | 'regression', ...] (one per task), "
        "or a model / dataset with task_names and task_kinds"
    )


# --------------------------------------------------------------------------- solver
def _row_terms(z: np.ndarray, target: np.ndarray, binary: np.ndarray):
    """Per-row loss, its first and second derivative in the output ``z``."""
    s = expit(z)
    diff = z - target
    loss = np.where(binary, np.logaddexp(0.0, z) - target * z, diff * diff)
    grad = np.where(binary, s - target, 2.0 * diff)
    curv = np.where(binary, s * (1.0 - s), 2.0)
    return loss, grad, curv


def _solve(h: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(h, b)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(h, b, rcond=None)[0]


def _fit_linearised(x, offset, target, binary, weight, penalty, max_iter: int, tol: float):
    """Minimise ``sum_r weight_r loss_r(offset_r + x_r . c) + 1/2 sum_j penalty_j c_j^2`` from ``c = 0``.

    Damped Newton (Armijo backtracking); when half the Newton decrement (an
    estimate of the distance to the optimum, in loss units) is <= ``tol``, the
    last full step is taken and the fit ends. Returns ``(c, converged)``.
    """
    coef = np.zeros(x.shape[1])
    z = offset.copy()
    loss, grad, curv = _row_terms(z, target, binary)
    value = float(weight @ loss)
    for _ in range(max_iter):
        g = x.T @ (weight * grad) + penalty * coef
        h = (x * (weight * curv)[:, None]).T @ x
        h[np.diag_indices_from(h)] += penalty
        step = _solve(h, -g)
        decrement = float(-(g @ step))
        if decrement <= 2.0 * tol:  # close enough for a full step to land (quadratically) on the optimum
            return coef + step, True
        t = 1.0
        while True:
            cand = coef + t * step
            zc = offset + x @ cand
            lc, gc, cc = _row_terms(zc, target, binary)
            vc = float(weight @ lc) + 0.5 * float(penalty @ (cand * cand))
            if vc <= value - 1e-4 * t * decrement or t < 1e-10:
                break
            t *= 0.5
        coef, z, value, grad, curv = cand, zc, vc, gc, cc
    return coef, False


# --------------------------------------------------------------------------- predictor
class GradTAEPredictor(BaselinePredictor):
    """Estimated relative gain of every member of a group from one linearised all-task model (GRAD-TAE).

    For a group ``S`` and the features ``g`` (:func:`projected_gradients`),
    the group's fine-tuned model is estimated as the linear model
    ``z(x) = f*(x) + g(x) . w_S`` with coefficients (``baseline="offset"``)

    ``w_S = argmin_w  sum_{t in S} mean_{x in train_t} loss_t(z(x), y) + alpha * kappa / 2 * ||w||^2``

    where ``loss_t`` is the binary cross-entropy on the logit ``z`` for binary
    tasks and the squared error for regression tasks (the reference model's
    losses), ``f*`` the all-task model's output and ``kappa`` the features'
    mean squared entry (``mean_t mean_{x in train_t} ||g(x)||^2 / d``), which
    makes ``alpha`` independent of the scale of the gradients. The objective
    is the reference model's multi-task loss (the sum of the members' mean
    task losses) with a fixed penalty, so a larger group brings more data
    against the same prior, as in multi-task training with weight decay. The
    estimated loss of member ``t`` is ``L_S[t] = mean_{x in held-out_t}
    loss_t(z(x), y)`` and its predicted gain is eq. 1 with both losses estimated:

    ``predict(masks)[S, t] = (L_{t}[t] - L_S[t]) / L_{t}[t]``

    with ``L_{t}`` the same fit for task ``t`` alone (``stl_loss_``).
    Binary fits use damped Newton from ``w = 0`` (the all-task model itself);
    groups of regression tasks only are solved in closed form from per-task
    second moments of the features, so any number of them is cheap.

    Choices made here (the ETAP paper describes GRAD-TAE in one sentence, and
    Li et al.'s summary fixes only the all-task base model, the linearisation,
    the low-dimensional gradient projection and the logistic fit per subset):

    * the projection has independent ``+-1/sqrt(d)`` entries and covers every
      trainable parameter (shared and task-specific);
    * a ridge penalty towards ``theta*`` (``alpha``, relative to ``kappa``):
      with ``d = 200`` and a few hundred examples per task an unpenalised
      logistic fit overfits or diverges, and large steps leave the region
      where the linearisation holds. The default 0.1 was chosen here on
      ETTm1 (all 127 groups trained once for the ground truth, features of
      500 examples per task and split: Pearson with the measured gains 0.65
      per member and 0.55 per group total at 0.1; 0.62 / 0.47 at 1e-3;
      0.65 / 0.59 at 1) and on planted conflicts between tasks (best
      between 0.01 and 0.1);
    * ``baseline="offset"`` keeps ``f*(x)`` with coefficient 1 (the Taylor
      expansion itself); ``baseline="feature"`` instead adds an intercept and
      ``f*(x)`` as unpenalised regressors (``z = f*(x) + g . w + b + c f*(x)``),
      letting each group re-calibrate the all-task output;
    * the losses are those of the linearised model on held-out rows; the
      fitted ``w`` are not mapped back to ``theta* + R w`` and re-evaluated
      through the network, which would need the model at prediction time;
    * tasks are weighted equally and their losses summed (per-task mean
      losses, as the reference multi-task model and the oversampled training
      of the paper), not pooled example by example; the penalty does not
      grow with the group (a mean over the members would weaken every
      member's data against the prior as the group grows, and in tests it
      hid the benefit of a related task).

    The ETAP paper compares GRAD-TAE's *pairwise* affinities (Table 2) and
    selects groups from them (Table 4): :meth:`pairwise_affinity` returns them,
    averaged over any sampled groups as Li et al. do.

    Cost: one ``d``-dimensional fit per group over the training rows of its
    members (binary tasks: a few Newton steps of ``O(rows * d^2)`` each), so
    thousands of groups take seconds to minutes, not the millions ETAP predicts.

    Args:
        features: :class:`ProjectedGradients` of the all-task model.
        alpha: ridge penalty relative to ``kappa`` (default 0.1); must be > 0.
        baseline: ``"offset"`` (default) or ``"feature"``, see above.
        max_iter: Newton steps per binary fit (default 50).
        tol: Newton stopping tolerance in loss units (default 1e-10).

    Attributes:
        n_tasks_: number of tasks; ``task_names_``: their names; ``task_kinds_``: their kinds.
        stl_loss_: ``(n,)`` estimated held-out loss of each task fitted alone.
        base_loss_: ``(n,)`` held-out loss of the all-task model itself (``w = 0``).
        penalty_scale_: ``kappa``.

    Raises:
        ValueError: (in ``fit``) invalid options or features, an estimated
            single-task loss that is not positive, invalid masks/gains when given.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> task = np.repeat([0, 1, 2], 40)
        >>> held_out = np.tile(np.arange(40) >= 30, 3)
        >>> feats = ProjectedGradients(rng.normal(size=(120, 8)), np.zeros(120),
        ...                            rng.integers(0, 2, 120), task, held_out,
        ...                            ("a", "b", "c"), ("binary",) * 3)
        >>> model = GradTAEPredictor(feats).fit()
        >>> model.predict(np.array([[True, True, False], [False, False, True]])).round(2)[1]
        array([nan, nan,  0.])
    """

    _FORMAT = _FORMAT
    _FIT_HINT = "fit() (no training groups needed)"
    _CHUNK = 4096
    _SCALARS = ("n_tasks_", "task_names_", "task_kinds_", "stl_loss_", "base_loss_", "penalty_scale_")

    def __init__(
        self,
        features: ProjectedGradients,
        *,
        alpha: float = 0.1,
        baseline: str = "offset",
        max_iter: int = 50,
        tol: float = 1e-10,
    ):
        self.features = features
        self.alpha = alpha
        self.baseline = baseline
        self.max_iter = max_iter
        self.tol = tol

    # ------------------------------------------------------------------ fitting
    def _check_options(self) -> None:
        if not isinstance(self.features, ProjectedGradients):
            raise ValueError(
                "features must be a ProjectedGradients (see lightning_etap.predictors.projected_gradients); "
                f"got {type(self.features).__name__}"
            )
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float, np.number)) or not (np.isfinite(a) and a > 0):
            raise ValueError(f"alpha must be a finite float > 0; got {a!r}")
        if self.baseline not in _BASELINES:
            raise ValueError(f"baseline must be one of {_BASELINES}; got {self.baseline!r}")
        m = self.max_iter
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ValueError(f"max_iter must be an integer >= 1; got {m!r}")
        if not isinstance(self.tol, (int, float, np.number)) or not (np.isfinite(self.tol) and self.tol >= 0):
            raise ValueError(f"tol must be a finite float >= 0; got {self.tol!r}")

    def fit(self, masks=None, gains=None) -> GradTAEPredictor:
        """Prepare the features and fit every task alone (the eq. 1 reference); training groups are ignored.

        Args:
            masks: optional ``(m, n)`` training masks (validated and ignored).
            gains: optional ``(m, n)`` training gains (validated and ignored; needs ``masks``).

        Returns:
            self
        """
        self._check_options()
        feats = self.features
        n = feats.n_tasks
        masks, gains, _ = training_table(masks, gains, list(feats.task_names), "GradTAEPredictor", required=False)
        if masks is not None:
            checked = check_masks(masks, n)
            if gains is not None:
                check_gains(gains, checked)
        elif gains is not None:
            raise ValueError("gains were given without masks: pass fit(masks, gains) or fit()")
        fit_rows = ~feats.held_out
        sq = (np.asarray(feats.features[fit_rows], dtype=np.float64) ** 2).sum(axis=1) / feats.dim
        kappa = float(np.mean(np.bincount(feats.task[fit_rows], sq, n) / np.bincount(feats.task[fit_rows], None, n)))
        if not kappa > 0:
            raise ValueError("the projected gradients are all zero: the model's outputs do not depend on its parameters")
        self.n_tasks_ = n
        self.task_names_ = list(feats.task_names)
        self.task_kinds_ = list(feats.task_kinds)
        self.penalty_scale_ = kappa
        self._prepare()
        self.base_loss_ = self._heldout_losses(np.zeros((1, self._width)), np.ones((1, n), bool))[0]
        self.stl_loss_ = np.diag(self.group_loss(np.eye(n, dtype=bool)))
        bad = ~(self.stl_loss_ > 0)
        if bad.any():
            names = [self.task_names_[t] for t in np.flatnonzero(bad)]
            raise ValueError(
                f"the estimated single-task loss of {names} is not positive: the relative gain (eq. 1) is undefined"
            )
        return self

    def _prepare(self) -> None:
        """Derived, unsaved state: row indices per task, penalty, second moments of regression tasks."""
        feats = self.features
        n = feats.n_tasks
        self._binary = np.array([k == "binary" for k in feats.task_kinds])
        self._rows = {
            held: [np.flatnonzero((feats.task == t) & (feats.held_out == held)) for t in range(n)]
            for held in (False, True)
        }
        extra = 2 if self.baseline == "feature" else 0
        self._width = feats.dim + extra
        self._penalty = np.r_[np.full(feats.dim, float(self.alpha) * self.penalty_scale_), np.zeros(extra)]
        # closed form for regression tasks: loss_t(c) = const_t + 2 lin_t . c + c' quad_t c
        p = self._width
        self._moments = {held: (np.zeros((n, p, p)), np.zeros((n, p)), np.zeros(n)) for held in (False, True)}
        for t in np.flatnonzero(~self._binary):
            for held in (False, True):
                x, offset, target = self._design(self._rows[held][t])
                resid = offset - target
                quad, lin, const = self._moments[held]
                quad[t] = x.T @ x / len(resid)
                lin[t] = x.T @ resid / len(resid)
                const[t] = resid @ resid / len(resid)

    def _design(self, rows: np.ndarray):
        """``(x, offset, target)`` of the given rows in float64 (``x`` with the baseline columns when used)."""
        feats = self.features
        x = np.asarray(feats.features[rows], dtype=np.float64)
        offset = feats.offset[rows]
        if self.baseline == "feature":
            x = np.hstack([x, np.ones((len(rows), 1)), offset[:, None]])
        return x, offset, feats.target[rows]

    # ------------------------------------------------------------ group models
    def _group_coefs(self, masks: np.ndarray) -> np.ndarray:
        """``(m, width)`` fitted coefficients ``w_S`` (plus ``b, c`` with ``baseline="feature"``) per group."""
        coefs = np.zeros((masks.shape[0], self._width))
        regression = ~(masks & self._binary).any(axis=1)
        weights = masks.astype(np.float64)
        quad, lin, _ = self._moments[False]
        idx = np.flatnonzero(regression)
        for start in range(0, idx.size, 128):
            block = idx[start : start + 128]
            h = 2.0 * (weights[block] @ quad.reshape(quad.shape[0], -1)).reshape(-1, self._width, self._width)
            h[:, np.arange(self._width), np.arange(self._width)] += self._penalty
            b = 2.0 * weights[block] @ lin
            try:
                coefs[block] = -np.linalg.solve(h, b[..., None])[..., 0]
            except np.linalg.LinAlgError:
                coefs[block] = [-_solve(hg, bg) for hg, bg in zip(h, b)]
        not_converged = 0
        for g in np.flatnonzero(~regression):
            members = np.flatnonzero(masks[g])
            rows = np.concatenate([self._rows[False][t] for t in members])
            x, offset, target = self._design(rows)
            task = self.features.task[rows]
            counts = np.array([self._rows[False][t].size for t in members])
            weight = np.repeat(1.0 / counts, counts)
            coefs[g], ok = _fit_linearised(x, offset, target, self._binary[task], weight, self._penalty,
                                           int(self.max_iter), float(self.tol))
            not_converged += not ok
        if not_converged:
            warnings.warn(
                f"GradTAEPredictor: {not_converged} group fit(s) did not converge in max_iter={self.max_iter} Newton "
                "steps; raise max_iter or alpha", ConvergenceWarning, stacklevel=3)
        return coefs

    def _heldout_losses(self, coefs: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """``(m, n)`` held-out loss of every member under its group's coefficients; NaN for non-members."""
        out = np.full(masks.shape, np.nan)
        quad, lin, const = self._moments[True]
        for t in range(masks.shape[1]):
            groups = np.flatnonzero(masks[:, t])
            if not groups.size:
                continue
            c = coefs[groups]
            if self._binary[t]:
                x, offset, target = self._design(self._rows[True][t])
                z = offset[:, None] + x @ c.T
                out[groups, t] = (np.logaddexp(0.0, z) - target[:, None] * z).mean(axis=0)
            else:
                out[groups, t] = const[t] + 2.0 * c @ lin[t] + ((c @ quad[t]) * c).sum(axis=1)
        return out

    def group_loss(self, masks) -> np.ndarray:
        """Estimated held-out loss of every member of every group under the group's linearised model.

        Args:
            masks: ``(m, n)`` bool group masks.

        Returns:
            ``(m, n)`` float array (BCE or MSE per member; a singleton gets the
            single-task estimate), NaN for non-members.
        """
        self._check_fitted()
        masks = check_masks(masks, self.n_tasks_)
        out = np.empty(masks.shape)
        for start in range(0, masks.shape[0], self._CHUNK):
            block = masks[start : start + self._CHUNK]
            out[start : start + self._CHUNK] = self._heldout_losses(self._group_coefs(block), block)
        return out

    def _member_gains(self, masks: np.ndarray) -> np.ndarray:
        return (self.stl_loss_ - self._heldout_losses(self._group_coefs(masks), masks)) / self.stl_loss_

    def pairwise_affinity(self, masks=None) -> np.ndarray:
        """Pairwise task affinity from estimated group gains, as Li et al. average them.

        ``affinity[s, t]`` = the mean predicted gain of ``t`` over the groups in
        ``masks`` that contain both ``s`` and ``t`` (source row, destination
        column, as :class:`~lightning_etap.predictors.TAGPredictor` expects);
        the diagonal is 0. By default ``masks`` are all pairs, so
        ``affinity[s, t]`` is the estimated gain of ``t`` in ``{s, t}``; pass
        randomly sampled groups (e.g. of a fixed size) for Li et al.'s
        higher-order averaging.

        Raises:
            ValueError: a pair of tasks that no group in ``masks`` contains.
        """
        self._check_fitted()
        n = self.n_tasks_
        if masks is None:
            from lightning_etap.groups import all_groups

            masks = all_groups(n, min_size=2, max_size=2)
        masks = check_masks(masks, n)
        gains = np.nan_to_num(self.predict(masks), nan=0.0)
        u = masks.astype(np.float64)
        count = u.T @ u
        np.fill_diagonal(count, 1.0)
        uncovered = np.argwhere(np.triu(count == 0, k=1))
        if len(uncovered):
            raise ValueError(
                f"{len(uncovered)} pair(s) of tasks are in none of the groups: "
                f"{format_pairs(uncovered, self.task_names_)}; sample more groups"
            )
        affinity = (u.T @ gains) / count
        np.fill_diagonal(affinity, 0.0)
        return affinity

    # ------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write the predictor and its features to one ``.npz`` file (no pickle); :meth:`load` reproduces it exactly.

        Raises:
            sklearn.exceptions.NotFittedError: before ``fit``.
        """
        self._check_fitted()
        from lightning_etap import __version__

        feats = self.features
        params = {k: v for k, v in self.get_params(deep=False).items() if k != "features"}
        fitted = {name: getattr(self, name) for name in self._SCALARS}
        meta = {"task_names": list(feats.task_names), "task_kinds": list(feats.task_kinds),
                "seed": feats.seed, "n_parameters": feats.n_parameters}
        arrays = {name: getattr(feats, name) for name in _ARRAYS}
        return write_npz_document(path, _FORMAT, params, fitted, arrays, __version__, features=meta)

    @classmethod
    def load(cls, path: str | Path) -> GradTAEPredictor:
        """Rebuild a predictor written by :meth:`save`.

        Raises:
            ValueError: the file is not a saved GradTAEPredictor of this format version.
        """
        header, arrays = read_npz_document(path, _FORMAT)
        feats = ProjectedGradients(**{name: arrays[name] for name in _ARRAYS}, **header["features"])
        model = cls(feats, **header["params"])
        for name in cls._SCALARS:
            setattr(model, name, header["fitted"][name])
        model.stl_loss_ = np.asarray(model.stl_loss_, dtype=np.float64)
        model.base_loss_ = np.asarray(model.base_loss_, dtype=np.float64)
        model._prepare()
        return model

