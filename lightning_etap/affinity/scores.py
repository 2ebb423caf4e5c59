"""The numerical core of task affinity: plain functions over tensors.

Nothing here knows about Lightning. The :class:`~lightning_etap.affinity.AffinityCallback`
gathers a step's per-task losses, the shared parameters and the optimizer, and
calls into this module.

Notation (one training step, ``n`` tasks, shared parameters ``θ_s``):

* ``L_j`` the loss of task ``j`` on the step's batch, ``g_j = ∇_{θ_s} L_j``;
* ``u_i`` the update task ``i`` alone would make to ``θ_s`` (``θ_s ← θ_s − u_i``);
* ``Z[i, j] = u_i · g_j`` the *step products*; the ETAP step score is
  ``z[i→j] = Z[i, j] / L_j`` (paper eq. 5), source row ``i``, target column ``j``.

Per-task gradients are never held for all shared parameters at once: they are
produced one *parameter block* at a time (the parameters of one module, small
modules merged), as an ``n × P_block`` tensor, and folded into the ``n × n``
products right away. For a linear update ``u_i = α g_i + c`` (plain gradient,
SGD with momentum / dampening / Nesterov / weight decay) only the ``α``-weighted
Gram matrix ``G Gᵀ`` and ``G c`` are accumulated; for Adam, whose update is
non-linear in the gradient, ``U Gᵀ`` is accumulated block by block.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

__all__ = [
    "REDUCTIONS",
    "SUPPORTED_OPTIMIZERS",
    "AdamUpdate",
    "AffinityAccumulator",
    "ExactTaskGradients",
    "LinearUpdate",
    "TaskGradients",
    "UpdateRule",
    "apply_update",
    "group_affinity",
    "lookahead_task_losses",
    "optimizer_group_of",
    "parameter_blocks",
    "preserved_module_state",
    "step_products",
    "step_scores",
    "tag_step_scores",
    "task_update_rules",
]

#: how step scores become the time-averaged matrix (see :class:`AffinityAccumulator`)
REDUCTIONS: tuple[str, ...] = ("epoch_mean_sum", "mean")
#: optimizers whose update ``update="optimizer"`` can reproduce
SUPPORTED_OPTIMIZERS: tuple[str, ...] = ("torch.optim.SGD", "torch.optim.Adam", "torch.optim.AdamW")
#: smaller parameter blocks are merged up to this many values per task
MIN_BLOCK_NUMEL = 2**16


# --------------------------------------------------------------------------- parameter blocks
def parameter_blocks(
    params: Sequence[Tensor], module: nn.Module | None = None, min_numel: int = MIN_BLOCK_NUMEL
) -> list[list[int]]:
    """Partition ``params`` into blocks whose per-task gradients are computed together.

    A block is the parameters one module owns directly (a layer's weight and
    bias share their backward path, so one backward call yields both).
    Consecutive blocks are merged while their total size stays at most
    ``max(largest block, min_numel)`` values, so tiny layers (biases, norms) do
    not each cost a backward call while the peak memory stays
    ``n × max(largest block, min_numel)`` values.

    Args:
        params: the shared parameters, in a fixed order.
        module: a module owning them (to find each parameter's layer); without
            it every parameter is its own block before merging.
        min_numel: merge small blocks up to this many values.

    Returns:
        Lists of indices into ``params``; every index appears exactly once.
    """
    index = {id(p): k for k, p in enumerate(params)}
    owned: list[list[int]] = []
    seen: set[int] = set()
    if module is not None:
        for sub in module.modules():
            ks = [index[id(p)] for p in sub._parameters.values() if p is not None and id(p) in index]
            ks = [k for k in ks if k not in seen]
            if ks:
                owned.append(ks)
                seen.update(ks)
    owned += [[k] for k in range(len(params)) if k not in seen]
    sizes = [sum(params[k].numel() for k in b) for b in owned]
    budget = max([min_numel, *sizes])
    blocks: list[list[int]] = []
    total = 0
    for block, size in zip(owned, sizes, strict=True):
        if blocks and total + size <= budget:
            blocks[-1] += block
            total += size
        else:
            blocks.append(list(block))
            total = size
    return blocks


class TaskGradients(Protocol):
    """Anything that yields per-task gradients of the shared parameters, one block at a time."""

    def __call__(
        self, task_losses: Tensor, params: Sequence[Tensor], blocks: Sequence[Sequence[int]]
    ) -> Iterator[tuple[int, Tensor]]: ...


class ExactTaskGradients:
    """Exact per-task gradients from the live autograd graph, one parameter block at a time.

    Calling it with the stacked task losses (shape ``(n,)``, in the graph) yields
    ``(k, G_k)`` for every shared parameter ``k``: ``G_k[i] = ∂L_i/∂θ_k``, shape
    ``(n, *θ_k.shape)``. Each block costs one vectorised backward call
    (``torch.autograd.grad(..., is_grads_batched=True)``); if vectorisation
    fails for the model's operations it falls back, with one warning, to
    ``n`` separate backward calls per block. ``.grad`` is never touched and the
    graph is retained for the training step's own backward. Parameters a task
    does not reach get zero gradients.
    """

    def __init__(self, batched: bool = True) -> None:
        self.batched = batched

    def _separate(self, task_losses: Tensor, inputs: list[Tensor]) -> list[Tensor]:
        n = task_losses.shape[0]
        rows: list[list[Tensor]] = [[] for _ in inputs]
        for i in range(n):
            if task_losses[i].requires_grad:
                grads = torch.autograd.grad(task_losses[i], inputs, retain_graph=True, allow_unused=True)
            else:
                grads = (None,) * len(inputs)
            for r, g, p in zip(rows, grads, inputs, strict=True):
                r.append(torch.zeros_like(p) if g is None else g)
        return [torch.stack(r) for r in rows]

    def __call__(
        self, task_losses: Tensor, params: Sequence[Tensor], blocks: Sequence[Sequence[int]],
        scale: float = 1.0,
    ) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(k, G_k)``; ``scale`` multiplies the backward seeds (fp16 loss scale) and divides the result."""
        n = task_losses.shape[0]
        if not task_losses.requires_grad:  # no task reaches anything trainable
            for block in blocks:
                for k in block:
                    yield k, params[k].new_zeros((n, *params[k].shape))
            return
        eye = torch.eye(n, dtype=task_losses.dtype, device=task_losses.device) * scale
        for block in blocks:
            inputs = [params[k] for k in block]
            grads: Sequence[Tensor | None] | None = None
            if self.batched:
                try:
                    grads = torch.autograd.grad(
                        task_losses, inputs, grad_outputs=eye, retain_graph=True,
                        allow_unused=True, is_grads_batched=True,
                    )
                except RuntimeError as err:  # an op without a batching rule
                    self.batched = False
                    warnings.warn(
                        f"vectorised per-task backward failed ({str(err).splitlines()[0]}); "
                        "falling back to one backward call per task (slower, same result)",
                        RuntimeWarning, stacklevel=2,
                    )
            if grads is None:
                grads = self._separate(task_losses * scale if scale != 1.0 else task_losses, inputs)
            for k, g, p in zip(block, grads, inputs, strict=True):
                if g is None:
                    yield k, p.new_zeros((n, *p.shape))
                else:
                    yield k, (g if scale == 1.0 else g.float() / scale)


# --------------------------------------------------------------------------- update rules
@dataclass(frozen=True)
class LinearUpdate:
    """A per-task update linear in the task's gradient: ``u_i = alpha * g_i + offset``.

    ``offset`` (the parameter's shape, or ``None`` for zero) carries what every
    task shares: the momentum buffer's contribution and weight decay.
    """

    alpha: float
    offset: Tensor | None = None


@dataclass(frozen=True)
class AdamUpdate:
    """The Adam / AdamW step task ``i``'s gradient alone would make, from the optimizer's current state.

    With ``g' = ±g_i + wd·θ`` (coupled weight decay; ``−`` when maximising),
    ``m' = β1 m + (1−β1) g'``, ``v' = β2 v + (1−β2) g'²``, ``t' = t + 1``::

        u_i = lr · m' / (1 − β1^t') / (sqrt(v̂) / sqrt(1 − β2^t') + eps)  [+ lr · wd · θ if decoupled]

    with ``v̂ = max(v_max, v')`` under amsgrad and ``v'`` otherwise: exactly
    ``θ_before − θ_after`` of ``torch.optim.Adam(W).step()`` with ``.grad = g_i``,
    the state untouched. An empty state (before the first step) is the zero
    state PyTorch initialises (``m = v = 0``, ``t = 0``).
    """

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    maximize: bool
    step: float
    param: Tensor
    exp_avg: Tensor | None
    exp_avg_sq: Tensor | None
    max_exp_avg_sq: Tensor | None

    def __call__(self, grads: Tensor) -> Tensor:
        """Per-task updates ``(n, *shape)`` from per-task gradients ``(n, *shape)``."""
        g = -grads if self.maximize else grads
        theta = self.param.detach()
        if self.weight_decay != 0 and not self.decoupled:
            g = g + self.weight_decay * theta
        t = self.step + 1.0
        m = (1 - self.beta1) * g if self.exp_avg is None else torch.lerp(
            self.exp_avg.expand_as(g), g, 1 - self.beta1)
        v = (1 - self.beta2) * g * g if self.exp_avg_sq is None else (
            self.beta2 * self.exp_avg_sq + (1 - self.beta2) * g * g)
        if self.max_exp_avg_sq is not None:
            v = torch.maximum(self.max_exp_avg_sq, v)
        bc1 = 1 - self.beta1**t
        bc2 = 1 - self.beta2**t
        u = (self.lr / bc1) * m / (v.sqrt() / bc2**0.5 + self.eps)
        if self.weight_decay != 0 and self.decoupled:
            u = u + (self.lr * self.weight_decay) * theta
        return u


UpdateRule = LinearUpdate | AdamUpdate


def _scalar(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _sgd_rule(param: Tensor, group: Mapping[str, Any], state: Mapping[str, Any] | None, lr: float) -> LinearUpdate:
    """PyTorch's SGD step as ``α g_i + c`` (``torch.optim.SGD``; see its docs for the update)."""
    mu = _scalar(group.get("momentum", 0.0))
    tau = _scalar(group.get("dampening", 0.0))
    wd = _scalar(group.get("weight_decay", 0.0))
    nesterov = bool(group.get("nesterov", False))
    sign = -1.0 if group.get("maximize", False) else 1.0
    buf = None if state is None else state.get("momentum_buffer")
    theta = param.detach()
    # d_i = sign * g_i + wd * θ ; the coefficient of d_i and the shared part of the step
    if mu == 0:
        coef, shared = 1.0, None
    elif buf is None:  # first step: PyTorch initialises the buffer to d_i (dampening not applied)
        coef, shared = (1.0 + mu if nesterov else 1.0), None
    elif nesterov:  # d + μ (μ b + (1−τ) d)
        coef, shared = 1.0 + mu * (1 - tau), (mu * mu) * buf
    else:  # μ b + (1−τ) d
        coef, shared = 1.0 - tau, mu * buf
    offset = None
    if wd != 0:
        offset = (coef * wd) * theta
    if shared is not None:
        offset = shared if offset is None else offset + shared
    return LinearUpdate(alpha=lr * coef * sign, offset=None if offset is None else lr * offset)


def _adam_rule(param: Tensor, group: Mapping[str, Any], state: Mapping[str, Any] | None, lr: float,
               decoupled: bool) -> AdamUpdate:
    beta1, beta2 = (_scalar(b) for b in group["betas"])
    state = state or {}
    amsgrad = bool(group.get("amsgrad", False))
    max_sq = state.get("max_exp_avg_sq") if amsgrad else None
    if amsgrad and max_sq is None:
        max_sq = torch.zeros_like(param)
    return AdamUpdate(
        lr=lr, beta1=beta1, beta2=beta2, eps=_scalar(group["eps"]),
        weight_decay=_scalar(group.get("weight_decay", 0.0)),
        decoupled=bool(group.get("decoupled_weight_decay", decoupled)),
        maximize=bool(group.get("maximize", False)),
        step=_scalar(state.get("step", 0.0)), param=param,
        exp_avg=state.get("exp_avg"), exp_avg_sq=state.get("exp_avg_sq"), max_exp_avg_sq=max_sq,
    )


def optimizer_group_of(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[dict]:
    """The optimizer's parameter group holding each parameter.

    Raises:
        ValueError: a parameter the optimizer does not update.
    """
    where = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    missing = [k for k, p in enumerate(params) if id(p) not in where]
    if missing:
        raise ValueError(
            f"{len(missing)} shared parameter(s) (indices {missing[:5]}) are not in the optimizer's "
            "parameter groups; the affinity needs the update the optimizer makes to every shared parameter"
        )
    return [where[id(p)] for p in params]


def task_update_rules(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], update: str = "gradient",
    per_unit_lr: bool = False,
) -> list[UpdateRule]:
    """How each shared parameter would move if one task's gradient alone were applied.

    Args:
        optimizer: the training optimizer (its current lr and state are read, never modified).
        params: the shared parameters.
        update: ``"gradient"``: ``u_i = lr · g_i`` with the parameter group's lr
            (the released code's default, momentum ignored); ``"optimizer"``:
            the step the optimizer would take from its current state with
            ``g_i`` as the gradient (SGD, Adam, AdamW).
        per_unit_lr: return ``u_i / lr`` (every supported update is
            proportional to the lr, so this stays exact at ``lr = 0``).

    Raises:
        ValueError: unknown ``update``, a parameter outside the optimizer, or
            ``update="optimizer"`` with an unsupported optimizer.
    """
    if update not in ("gradient", "optimizer"):
        raise ValueError(f"update must be 'gradient' or 'optimizer', got {update!r}")
    groups = optimizer_group_of(optimizer, params)
    rules: list[UpdateRule] = []
    is_adam = isinstance(optimizer, torch.optim.Adam)
    is_sgd = isinstance(optimizer, torch.optim.SGD)
    if update == "optimizer" and not (is_adam or is_sgd):
        raise ValueError(
            f"update='optimizer' supports {', '.join(SUPPORTED_OPTIMIZERS)} (and subclasses); got "
            f"{type(optimizer).__module__}.{type(optimizer).__qualname__}. Use update='gradient' "
            "(u_i = lr * g_i) for other optimizers."
        )
    for p, group in zip(params, groups, strict=True):
        lr = 1.0 if per_unit_lr else _scalar(group["lr"])
        if update == "gradient":
            rules.append(LinearUpdate(alpha=lr))
        elif is_adam:
            decoupled = isinstance(optimizer, torch.optim.AdamW)
            rules.append(_adam_rule(p, group, optimizer.state.get(p), lr, decoupled))
        else:
            rules.append(_sgd_rule(p, group, optimizer.state.get(p), lr))
    return rules


def apply_update(rule: UpdateRule, grads: Tensor) -> Tensor:
    """Per-task updates ``(n, *shape)`` of one parameter from its per-task gradients ``(n, *shape)``."""
    if isinstance(rule, AdamUpdate):
        return rule(grads)
    u = rule.alpha * grads
    return u if rule.offset is None else u + rule.offset


# --------------------------------------------------------------------------- step products and scores
def step_products(
    task_losses: Tensor,
    params: Sequence[Tensor],
    rules: Sequence[UpdateRule],
    blocks: Sequence[Sequence[int]] | None = None,
    gradients: TaskGradients | None = None,
    *,
    grad_scale: float = 1.0,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``Z[i, j] = u_i · g_j`` for one step, float64 ``(n, n)``.

    Args:
        task_losses: the step's task losses stacked, shape ``(n,)``, in the graph.
        params: the shared parameters.
        rules: one update rule per parameter (:func:`task_update_rules`).
        blocks: parameter blocks (:func:`parameter_blocks`); default one per parameter.
        gradients: the per-task gradient provider (default :class:`ExactTaskGradients`).
        grad_scale: fp16 loss scale (seeds multiplied by it, gradients divided by it).
        all_reduce: averages a tensor over data-parallel ranks (each block's
            per-task gradients go through it before they are multiplied).

    For linear rules this accumulates ``Σ_p α_p G_p G_pᵀ`` and ``Σ_p G_p c_p``
    (``Z = gram + (G c)[None, :]``); for Adam ``Σ_p U_p G_pᵀ``. At most one
    block's ``n × P_block`` gradients are alive at a time.
    """
    n = task_losses.shape[0]
    blocks = [[k] for k in range(len(params))] if blocks is None else blocks
    gradients = ExactTaskGradients() if gradients is None else gradients
    gram = torch.zeros(n, n, dtype=torch.float64, device=task_losses.device)
    gc = torch.zeros(n, dtype=torch.float64, device=task_losses.device)
    stream = gradients(task_losses, params, blocks, scale=grad_scale) if grad_scale != 1.0 else \
        gradients(task_losses, params, blocks)
    for k, grads in stream:
        rule = rules[k]
        if all_reduce is not None:
            grads = all_reduce(grads.contiguous())
        flat = grads.reshape(n, -1)
        if isinstance(rule, LinearUpdate):
            if rule.alpha != 0:
                gram += rule.alpha * (flat @ flat.T).double()
            if rule.offset is not None:
                gc += (flat @ rule.offset.reshape(-1).to(flat.dtype)).double()
        else:
            gram += (rule(grads).reshape(n, -1) @ flat.T).double()
    return gram + gc.unsqueeze(0)


def step_scores(products: Tensor, task_losses: Tensor, normalize_by_loss: bool = True) -> tuple[Tensor, Tensor]:
    """ETAP step scores from step products (paper eq. 5).

    Args:
        products: ``Z[i, j] = u_i · g_j`` (:func:`step_products`), ``(n, n)``.
        task_losses: the step's task-loss values ``(n,)``.
        normalize_by_loss: divide column ``j`` by ``L_j``.

    Returns:
        ``(scores, valid)``: float64 ``(n, n)`` scores, ``scores[i, j] = z[i→j]``,
        and a boolean ``(n,)`` mask of the columns that count for this step
        (``False`` where ``L_j == 0`` under ``normalize_by_loss``; those
        columns hold zeros).
    """
    z = products.double()
    losses = task_losses.detach().double().to(z.device)
    valid = torch.ones(z.shape[1], dtype=torch.bool, device=z.device)
    if normalize_by_loss:
        valid = losses != 0
        z = torch.where(valid.unsqueeze(0), z / torch.where(valid, losses, 1.0).unsqueeze(0), 0.0)
    return z, valid


def tag_step_scores(losses_before: Tensor, losses_after: Tensor, lr: float | None = None) -> tuple[Tensor, Tensor]:
    """TAG step scores (Fifty et al. 2021): ``z[i→j] = 1 − L_j(θ − u_i) / L_j(θ)``.

    Args:
        losses_before: ``L_j(θ)``, shape ``(n,)``.
        losses_after: ``losses_after[i, j] = L_j(θ − u_i)``, shape ``(n, n)``.
        lr: divide by it (the released code's scaling), or ``None``.

    Returns:
        ``(scores, valid)`` as :func:`step_scores` (columns with ``L_j(θ) = 0`` invalid).
    """
    before = losses_before.detach().double()
    after = losses_after.detach().double().to(before.device)
    valid = before != 0
    z = torch.where(valid.unsqueeze(0), 1.0 - after / torch.where(valid, before, 1.0).unsqueeze(0), 0.0)
    if lr is not None:
        z = z / lr
    return z, valid


# --------------------------------------------------------------------------- TAG lookahead
@contextlib.contextmanager
def preserved_module_state(module: nn.Module, rng_state: Tensor | None = None) -> Iterator[Callable[[], None]]:
    """Leave no trace: restore the module's buffers and the torch CPU RNG on exit.

    Yields a ``reset()`` function that puts the buffers back and, if
    ``rng_state`` is given, sets the CPU RNG to it (so a re-run of the step
    draws the same dropout masks as the original forward). On exit the buffers
    and the RNG state from entry are restored.
    """
    entry_rng = torch.get_rng_state()
    saved = [(b, b.detach().clone()) for b in module.buffers()]

    def reset() -> None:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)
        if rng_state is not None:
            torch.set_rng_state(rng_state)

    try:
        yield reset
    finally:
        reset()
        torch.set_rng_state(entry_rng)


def lookahead_task_losses(
    params: Sequence[Tensor], updates: Sequence[Tensor], evaluate: Callable[[], Tensor],
    reset: Callable[[], None] | None = None, sources: Sequence[int] | None = None,
) -> Tensor:
    """Task losses after each task's own update: ``out[i, j] = L_j(θ − u_i)``.

    Args:
        params: the shared parameters (edited in place, restored exactly).
        updates: per parameter, the per-task updates ``(n, *shape)``.
        evaluate: recomputes the ``(n,)`` task losses at the current parameters.
        reset: called before every evaluation (buffers / RNG, see
            :func:`preserved_module_state`).
        sources: the tasks ``i`` to look ahead from (default: all); the other
            rows are NaN and cost no forward pass.
    """
    n = updates[0].shape[0] if updates else 0
    saved = [p.detach().clone() for p in params]
    rows: list[Tensor | None] = []
    wanted = set(range(n)) if sources is None else {int(i) for i in sources}
    try:
        with torch.no_grad():
            for i in range(n):
                if i not in wanted:
                    rows.append(None)
                    continue
                for p, u in zip(params, updates, strict=True):
                    p.sub_(u[i])
                if reset is not None:
                    reset()
                rows.append(evaluate().detach().double())
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    done = [r for r in rows if r is not None]
    if not done:
        return torch.full((n, n), math.nan, dtype=torch.float64)
    return torch.stack([r if r is not None else torch.full_like(done[0], math.nan) for r in rows])


# --------------------------------------------------------------------------- accumulation
class AffinityAccumulator:
    """Running sums of step scores, per epoch, for either reduction.

    For every epoch ``e`` it holds ``sum_e[i, j]`` (float64) and
    ``count_e[i, j]``, the number of steps whose entry ``[i, j]`` counted (a
    column ``j`` does not count while ``L_j = 0``; a row and a column do not
    count while their task is absent from the step). Plain tensors, so they
    can be checkpointed and summed across processes.

    * ``"epoch_mean_sum"`` (released code): ``Σ_e sum_e / count_e``.
    * ``"mean"`` (paper eq. 6): ``Σ_e sum_e / Σ_e count_e``.

    Epochs (or whole runs) in which an entry never counted contribute nothing
    to it; an entry that never counted is NaN.

    **Control variate.** When a cheap proxy score ``P_t`` is known at steps
    whose exact score ``X_t`` was not measured (:meth:`add_proxy`), and at
    the measured steps both are (:meth:`add` with ``proxy``), every
    unmeasured step gets the regression estimate
    ``X̂_t = X̄ + β (P_t − P̄)`` per entry, with ``X̄``, ``P̄`` the means over
    the measured steps and ``β = cov(X, P) / var(P)`` their least-squares
    slope (0 with fewer than :data:`MIN_PAIRS` measured steps or no variance
    of ``P``), and both reductions then average measured and estimated steps
    alike. The proxy follows the batch-to-batch swings of the exact score,
    so the estimate removes most of the sampling noise of measuring every
    k-th step (benchmarks/affinity_overhead.py measures how much).

    **Split halves.** With ``split=True`` the measured steps are also handed
    to two half accumulators in alternate blocks of :attr:`block`
    consecutive measured steps (blocks, so that neighbouring steps, which
    share the optimizer's state and nearly the same parameters, do not land
    in opposite halves); a proxy-only step goes to the half of the measured
    step before it. Each half is reduced like the whole with its own
    control variate. :meth:`half_matrices` gives their two matrices: how far
    they agree says how reproducible the whole matrix is.
    """

    #: measured steps needed before the control variate's slope is used
    MIN_PAIRS = 3

    def __init__(self, n: int, keep_steps: bool = False, split: bool = False) -> None:
        self.n = int(n)
        self.keep_steps = keep_steps
        # split halves: alternate blocks of measured steps (and the proxy-only steps after them), each half an
        # accumulator of its own with its own control variate, for the split-half reproducibility of the matrix
        self.halves: list[AffinityAccumulator] | None = [AffinityAccumulator(n), AffinityAccumulator(n)] \
            if split else None
        self.block = 1  # measured steps per block of a half (the callback sets it from its schedule)
        self.half = 0  # the half receiving the current block
        self.in_block = 0  # measured steps of the current block so far
        self.half_steps = [0, 0]  # measured steps in each half
        self.sums: dict[int, Tensor] = {}
        self.counts: dict[int, Tensor] = {}
        self.steps: list[int] = []
        self.step_scores: list[Tensor] = []
        # control variate: per epoch, proxy sums and counts of the steps measured by the proxy only
        self.proxy_sums: dict[int, Tensor] = {}
        self.proxy_counts: dict[int, Tensor] = {}
        # and over the measured steps: sums of X, P, X·P, P² and the count, per entry
        self.pairs: dict[str, Tensor] | None = None

    def _epoch(self, e: int) -> None:
        if e not in self.sums:
            self.sums[e] = torch.zeros(self.n, self.n, dtype=torch.float64)
            self.counts[e] = torch.zeros(self.n, self.n, dtype=torch.float64)

    def _entries(self, valid: Tensor) -> Tensor:
        """``valid`` as an ``(n, n)`` mask of the entries that count: a ``(n,)`` mask names columns."""
        v = valid.detach().cpu().bool()
        return v.unsqueeze(0).expand(self.n, self.n) if v.dim() == 1 else v

    def add(self, epoch: int, scores: Tensor, valid: Tensor, step: int | None = None,
            proxy: Tensor | None = None) -> None:
        """Add one measured step's ``(n, n)`` scores (and its proxy scores); only the ``valid`` entries count
        (an ``(n, n)`` mask, or an ``(n,)`` mask of columns)."""
        e = int(epoch)
        self._epoch(e)
        s = scores.detach().double().cpu()
        v = self._entries(valid)
        self.sums[e] += torch.where(v, s, 0.0)
        self.counts[e] += v.double()
        if proxy is not None:
            p = torch.where(v, proxy.detach().double().cpu(), 0.0)
            x = torch.where(v, s, 0.0)
            if self.pairs is None:
                self.pairs = {k: torch.zeros(self.n, self.n, dtype=torch.float64)
                              for k in ("x", "p", "xp", "pp", "count")}
            self.pairs["x"] += x
            self.pairs["p"] += p
            self.pairs["xp"] += x * p
            self.pairs["pp"] += p * p
            self.pairs["count"] += v.double()
        if self.keep_steps:
            self.steps.append(-1 if step is None else int(step))
            self.step_scores.append(torch.where(v, s, float("nan")))
        if self.halves is not None:
            if self.in_block >= self.block:
                self.half, self.in_block = 1 - self.half, 0
            self.halves[self.half].add(e, scores, valid, proxy=proxy)
            self.in_block += 1
            self.half_steps[self.half] += 1

    def add_proxy(self, epoch: int, proxy: Tensor, valid: Tensor) -> None:
        """Add the proxy scores of a step whose exact scores were not measured."""
        e = int(epoch)
        self._epoch(e)
        if e not in self.proxy_sums:
            self.proxy_sums[e] = torch.zeros(self.n, self.n, dtype=torch.float64)
            self.proxy_counts[e] = torch.zeros(self.n, self.n, dtype=torch.float64)
        v = self._entries(valid)
        self.proxy_sums[e] += torch.where(v, proxy.detach().double().cpu(), 0.0)
        self.proxy_counts[e] += v.double()
        if self.halves is not None:
            self.halves[self.half].add_proxy(e, proxy, valid)

    @property
    def epochs(self) -> list[int]:
        return sorted(self.sums)

    @property
    def proxy_steps(self) -> int:
        """Steps measured by the proxy only (the largest count over entries)."""
        return int(sum(float(c.max()) for c in self.proxy_counts.values()))

    def control_variate(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(X̄, P̄, β)`` per entry over the measured steps, or ``None`` without proxy-only steps."""
        if not self.proxy_sums or self.pairs is None:
            return None
        m = self.pairs["count"]
        safe = m.clamp(min=1)
        xbar, pbar = self.pairs["x"] / safe, self.pairs["p"] / safe
        cov = self.pairs["xp"] - m * xbar * pbar
        var = self.pairs["pp"] - m * pbar * pbar
        scale = self.pairs["pp"].clamp(min=1e-300)
        ok = (m >= self.MIN_PAIRS) & (var > 1e-12 * scale)
        beta = torch.where(ok, cov / torch.where(ok, var, 1.0), 0.0)
        return xbar, pbar, beta

    def _filled(self) -> tuple[list[Tensor], list[Tensor]]:
        """Per epoch: the sum and count of measured plus estimated steps (the control variate's, if any)."""
        cv = self.control_variate()
        if cv is not None:
            xbar, pbar, beta = cv
            measured = self.pairs["count"] > 0  # an entry never measured stays unknown
        sums, counts = [], []
        for e in self.epochs:
            s, c = self.sums[e], self.counts[e]
            if cv is not None and e in self.proxy_sums:
                pc = self.proxy_counts[e]
                extra = pc * (xbar - beta * pbar) + beta * self.proxy_sums[e]
                s = s + torch.where(measured, extra, 0.0)
                c = c + torch.where(measured, pc, 0.0)
            sums.append(s)
            counts.append(c)
        return sums, counts

    def epoch_means(self) -> Tensor:
        """``(E, n, n)`` per-epoch means (NaN in entries that never counted in that epoch)."""
        if not self.sums:
            return torch.zeros(0, self.n, self.n, dtype=torch.float64)
        return self._means(*self._filled())

    @staticmethod
    def _means(sums: list[Tensor], counts: list[Tensor]) -> Tensor:
        return torch.stack([s / c for s, c in zip(sums, counts, strict=True)])

    def matrix(self, reduction: str = "epoch_mean_sum") -> Tensor:
        """The time-averaged ``(n, n)`` matrix under ``reduction``."""
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not self.sums:
            return torch.full((self.n, self.n), float("nan"), dtype=torch.float64)
        sums, counts = self._filled()
        counts_t = torch.stack(counts)  # (E, n, n)
        if reduction == "mean":
            return torch.stack(sums).sum(0) / counts_t.sum(0)
        means = torch.nan_to_num(self._means(sums, counts), nan=0.0)
        out = means.sum(0)
        return torch.where(counts_t.sum(0) > 0, out, float("nan"))

    def half_matrices(self, reduction: str = "epoch_mean_sum") -> Tensor | None:
        """``(2, n, n)``: the matrix of each split half under ``reduction``, or ``None`` without halves (an
        accumulator made without ``split``, or restored from a checkpoint written before halves existed) or
        while a half has no measured step."""
        if self.halves is None or min(self.half_steps) == 0:
            return None
        return torch.stack([h.matrix(reduction) for h in self.halves])

    def state_dict(self) -> dict[str, Any]:
        return {
            "halves": None if self.halves is None else [h.state_dict() for h in self.halves],
            "half_routing": {"block": self.block, "half": self.half, "in_block": self.in_block,
                             "half_steps": list(self.half_steps)},
            "n": self.n,
            "keep_steps": self.keep_steps,
            "epochs": self.epochs,
            "sums": [self.sums[e].clone() for e in self.epochs],
            "counts": [self.counts[e].clone() for e in self.epochs],
            "steps": list(self.steps),
            "step_scores": [s.clone() for s in self.step_scores],
            "proxy_epochs": sorted(self.proxy_sums),
            "proxy_sums": [self.proxy_sums[e].clone() for e in sorted(self.proxy_sums)],
            "proxy_counts": [self.proxy_counts[e].clone() for e in sorted(self.proxy_sums)],
            "pairs": None if self.pairs is None else {k: v.clone() for k, v in self.pairs.items()},
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> AffinityAccumulator:
        acc = cls(int(state["n"]), bool(state["keep_steps"]))
        n = acc.n

        def entries(c: Tensor) -> Tensor:  # checkpoints written before per-entry counts hold column counts
            c = c.clone().double()
            return c.unsqueeze(0).expand(n, n).clone() if c.dim() == 1 else c

        for e, s, c in zip(state["epochs"], state["sums"], state["counts"], strict=True):
            acc.sums[int(e)] = s.clone().double()
            acc.counts[int(e)] = entries(c)
        acc.steps = [int(s) for s in state["steps"]]
        acc.step_scores = [s.clone() for s in state["step_scores"]]
        for e, s, c in zip(state.get("proxy_epochs", []), state.get("proxy_sums", []), state.get("proxy_counts", []),
                           strict=True):
            acc.proxy_sums[int(e)] = s.clone().double()
            acc.proxy_counts[int(e)] = entries(c)
        pairs = state.get("pairs")
        acc.pairs = None if pairs is None else {k: entries(v) for k, v in pairs.items()}
        if state.get("halves") is not None:  # checkpoints written before split halves existed have none
            acc.halves = [cls.from_state_dict(h) for h in state["halves"]]
            routing = state["half_routing"]
            acc.block, acc.half, acc.in_block = int(routing["block"]), int(routing["half"]), int(routing["in_block"])
            acc.half_steps = [int(s) for s in routing["half_steps"]]
        return acc


def group_affinity(matrix: Tensor | Any, members: Sequence[int]) -> Tensor:
    """Per-member group scores (paper eq. 7): ``out[t] = mean_{s ≠ t} matrix[s, t]``.

    Args:
        matrix: ``(n, n)`` time-averaged affinities, ``matrix[s, t] = z̄[s→t]``.
        members: distinct indices of the group's tasks, at least two.

    Returns:
        float64 ``(len(members),)``, in the order of ``members``.
    """
    m = torch.as_tensor(matrix, dtype=torch.float64)
    idx = torch.as_tensor(list(members), dtype=torch.long)
    if idx.numel() < 2:
        raise ValueError("a group needs at least two tasks to have an affinity (eq. 7 averages over the others)")
    sub = m[idx][:, idx]  # sub[a, b] = matrix[members[a], members[b]]
    off = sub.sum(0) - sub.diagonal()
    return off / (idx.numel() - 1)
