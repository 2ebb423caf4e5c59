"""Per-task gradient products from layer activations: the fast exact engine.

The ETAP step score needs only ``Z[i, j] = u_i · g_j`` (see
:mod:`lightning_etap.affinity.scores`), never the per-task gradients
themselves. For a linear layer ``z = a Wᵀ + b`` inside the shared encoder the
per-task weight gradient is ``G_i = Δ_iᵀ A`` (``A`` the layer's inputs, one row
per example, ``Δ_i = ∂L_i/∂z``), so the products can be built from the layer's
inputs and output gradients, which autograd computes far more cheaply than
``n`` separate parameter backward passes.

What this module does at a measured step:

1. Forward hooks (:class:`ActivationTap`) record, during the step's forward, every
   call of every shared ``nn.Linear``: its input ``A`` and its output ``z``
   (still in the graph), and the outputs of the *shared root* (the shared
   submodule, e.g. ``encoder``).
2. ``D_i = ∂L_i/∂h`` at the root outputs ``h``: one backward per task through
   its own head only (cheap; see :func:`root_gradients`).
3. **Separable** batches (per-task inputs, Chemical-style: every example
   row of ``h`` feeds one task only, and nothing in the encoder mixes rows):
   one backward of ``Σ_i D_i`` from ``h`` to every ``z`` gives every row's
   ``Δ`` for its own task, so all ``n`` per-task gradients cost about one
   backward. **Dense** batches (shared inputs): one vectorised backward of
   the ``n`` seeds ``D_i`` from ``h`` to every ``z``.
4. Per layer, the products ``Σ α G_i·G_j + G_i·c`` are formed either from
   chunks of the explicit ``G_i = Δ_iᵀ A`` (at most ``max_chunk_bytes`` of them
   alive) or, for dense batches with few rows and wide layers, through the
   example Gram matrix ``A Aᵀ`` without ever forming ``G``
   (``G_i·G_j = ⟨Δ_i, (A Aᵀ) Δ_j⟩``), whichever costs fewer multiply-adds.
5. Small dense models (rows shared, every layer took the explicit path and all
   shared parameters fit one autograd block, :data:`~lightning_etap.affinity.scores.MIN_BLOCK_NUMEL`
   values): from the next step on, one vectorised backward straight to the
   parameters replaces steps 1-4. The multiply-adds are the same and there
   are fewer calls, whose fixed costs dominate such models (ETTm1's 24k
   shared parameters).

Shared parameters outside plain ``nn.Linear`` layers (convolutions, norms,
embeddings, ...) fall back to exact autograd per-task gradients
(:class:`~lightning_etap.affinity.scores.ExactTaskGradients`), block by block.

Under data-parallel training every per-task gradient chunk is all-reduced
(averaged over ranks) before it is multiplied, so every rank computes the
products of the *global* batch's gradients; the Gram-matrix shortcut, which
never forms the gradients, is not used then.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_etap.affinity.scores import (
    AdamUpdate,
    ExactTaskGradients,
    LinearUpdate,
    UpdateRule,
    parameter_blocks,
)

__all__ = ["ActivationTap", "FastLinearLayer", "GramEngine", "linear_layers", "root_gradients", "shared_root"]

#: at most this many bytes of explicit per-task gradient chunks alive at once
MAX_CHUNK_BYTES = 32 * 2**20

#: multiply-add equivalents, in the cost model of ``GramEngine.last_costs``, of the fixed cost of a plain
#: Lightning training step (loop, data, optimizer: about 6 ms on one CPU thread), of a measurement's own
#: fixed cost (autograd calls, hooks) and of its work per recorded layer call
FIXED_STEP_MACS = 6e7
FIXED_MEASURE_MACS = 2e7
FIXED_CALL_MACS = 2e6

#: the cost, per multiply-add, of the dense path's per-task products against the plain step's: they are batched
#: over n x rows rows and run faster than the plain step's products over the batch's rows (measured on the
#: benchmark's dense configurations, one CPU thread: an exact step's extra time is 0.77-0.94 of the multiply-add
#: count's prediction, 0.88 on ETTm1, 0.84 on the wide encoder with 10 tasks, 0.82 with 30)
DENSE_WORK_FACTOR = 0.8

#: multiply-add equivalents of one task's backward call through its head (the proxy's per-task fixed cost)
PROXY_TASK_MACS = 6e6
#: columns of the basis of leading input directions through which the control variate's proxy sees the last
#: layer's weight gradients
PROXY_RANK = 8

#: modules whose training-mode forward mixes the rows of a batch (per-task rows are then not separable)
_ROW_MIXING: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)


# --------------------------------------------------------------------------- discovery
@dataclass
class FastLinearLayer:
    """A shared ``nn.Linear`` whose per-task gradients come from its activations."""

    module: nn.Linear
    weight: int  # index of the weight in the shared parameter list
    bias: int | None  # index of the bias, or None (no bias, or the bias is not shared / frozen)

    @property
    def indices(self) -> list[int]:
        """The indices of its shared parameters (weight, then bias if shared)."""
        return [self.weight] if self.bias is None else [self.weight, self.bias]


def _plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` (or a subclass) whose forward is ``nn.Linear``'s own ``F.linear``."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def linear_layers(module: nn.Module, params: Sequence[Tensor]) -> list[FastLinearLayer]:
    """The plain ``nn.Linear`` modules of ``module`` whose weight is among ``params``.

    A layer whose weight is not shared (or is frozen) is left to the other
    path for its bias; a layer whose bias is shared goes here only together
    with its weight. ``nn.MultiheadAttention``'s ``out_proj`` is left out
    (the attention never calls it, it uses its weight).
    """
    index = {id(p): k for k, p in enumerate(params)}
    out: list[FastLinearLayer] = []
    # nn.MultiheadAttention's out_proj is a Linear whose forward is never called (the attention uses its
    # weight directly): left to the autograd path from the start, without the first-step check's warning
    seen: set[int] = {id(m.out_proj) for m in module.modules() if isinstance(m, nn.MultiheadAttention)}
    for sub in module.modules():
        if id(sub) in seen or not _plain_linear(sub):
            continue
        seen.add(id(sub))
        w = index.get(id(sub.weight))
        if w is None:
            continue
        b = index.get(id(sub.bias)) if sub.bias is not None else None
        out.append(FastLinearLayer(sub, w, b))
    return out


def tied_layers(layers: Sequence[FastLinearLayer]) -> set[int]:
    """Indices of the layers owning a parameter another layer owns too (tied weights).

    Such a parameter gets gradient from both layers: neither layer's
    activations alone give its per-task gradients, so both take the exact
    autograd path.
    """
    owners: dict[int, list[int]] = {}
    for k, layer in enumerate(layers):
        for p in layer.indices:
            owners.setdefault(p, []).append(k)
    return {k for ks in owners.values() if len(ks) > 1 for k in ks}


def shared_root(module: nn.Module, params: Sequence[Tensor]) -> nn.Module | None:
    """The smallest submodule of ``module`` owning every parameter in ``params`` (``None``: only ``module`` itself)."""
    wanted = {id(p) for p in params}
    best: nn.Module | None = None
    best_size = None
    for name, sub in module.named_modules():
        if sub is module or not name:
            continue
        owned = {id(p) for p in sub.parameters()}
        if wanted <= owned:
            size = len(owned)
            if best_size is None or size < best_size:
                best, best_size = sub, size
    return best


# --------------------------------------------------------------------------- recording
@dataclass
class _LinearCall:
    layer: int  # index into the engine's fast layers
    root_call: int  # the enclosing root call, -1 outside any
    inputs: Tensor  # (rows, in), detached
    output: Tensor  # the layer's output, in the graph (any leading shape)
    version: int = 0  # the output's version counter when recorded (an in-place op on it changes it)


@dataclass
class _Record:
    linear: list[_LinearCall] = field(default_factory=list)
    roots: list[list[Tensor]] = field(default_factory=list)  # per root call: tensor outputs in the graph
    open_root: int = -1


class ActivationTap:
    """Forward hooks that record what :class:`GramEngine` needs, only while ``active``.

    Recording costs nothing but references: the layer inputs are tensors
    autograd saves anyway, and the outputs are kept alive only until the step's
    products are computed (:meth:`take`).
    """

    def __init__(self, layers: Sequence[FastLinearLayer], root: nn.Module | None) -> None:
        self.layers = list(layers)
        self.root = root
        self.active = False
        self._record = _Record()
        self._handles: list[Any] = []
        # The hooks are plain closures, not bound methods: a copy.deepcopy of the module (an EMA or teacher copy
        # made inside training_step) copies its hooks, and a bound method would drag this tap and the step's
        # recorded tensors into the copy (non-leaf tensors cannot be deep-copied). The copy's hooks ignore calls
        # of the copy (``module is not ...``), so a teacher's forward is never mistaken for the student's.
        for k, layer in enumerate(self.layers):
            self._handles.append(layer.module.register_forward_hook(self._linear_hook(k), with_kwargs=True))
        if root is not None:
            tap = self

            def root_pre(module: nn.Module, args: tuple) -> None:
                if module is tap.root:
                    tap._root_pre(module, args)

            def root_post(module: nn.Module, args: tuple, output: Any) -> None:
                if module is tap.root:
                    tap._root_post(module, args, output)

            self._handles.append(root.register_forward_pre_hook(root_pre))
            self._handles.append(root.register_forward_hook(root_post))

    def _linear_hook(self, k: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not self.active or not torch.is_grad_enabled() or not isinstance(output, Tensor):
                return
            if module is not self.layers[k].module:  # a deep copy of the layer
                return
            x = args[0] if args else kwargs.get("input")  # layer(x) or layer(input=x)
            if not isinstance(x, Tensor) or not output.requires_grad:
                return
            self._record.linear.append(_LinearCall(k, self._record.open_root,
                                                   x.detach().reshape(-1, x.shape[-1]), output, output._version))
        return hook

    def _root_pre(self, module: nn.Module, args: tuple) -> None:
        if self.active and torch.is_grad_enabled():
            self._record.roots.append([])
            self._record.open_root = len(self._record.roots) - 1

    def _root_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self.active or not torch.is_grad_enabled() or self._record.open_root < 0:
            return
        self._record.roots[self._record.open_root] = [t for t in _tensor_leaves(output) if t.requires_grad]
        self._record.open_root = -1

    def take(self) -> _Record:
        """The record of the step so far (and a fresh one for what follows)."""
        record, self._record = self._record, _Record()
        return record

    def clear(self) -> None:
        self._record = _Record()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()


def _tensor_leaves(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensor_leaves(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensor_leaves(v)]
    return []


# --------------------------------------------------------------------------- the engine
@dataclass
class _LayerData:
    """One fast layer's step data: inputs ``A (R, in)`` and output gradients."""

    inputs: Tensor  # (R, in) float32
    delta: Tensor  # dense: (n, R, out); separable: (R, out)
    owner: Tensor | None  # separable: (R,) task of each row (-1: none)


class _TaskBlocks:
    """The rows of a separable batch grouped by task: ``(R, d)`` tensors as ``(n, rows, d)`` blocks.

    Row ``r`` belongs to task ``owner[r]`` (``-1``: to none; left out). When
    the rows are already in task order with as many per task (Chemical's
    concatenated per-task batches), the blocks are views of the tensor;
    otherwise they are zero-padded copies (the zero rows add nothing to a
    product). Either way every task's gradient of a layer is one batched
    matrix product instead of one call per task.
    """

    #: padded blocks may hold at most this many times the rows they group (beyond it: one product per task)
    MAX_PADDING = 2.0

    def __init__(self, n: int, rows: int, index: tuple[Tensor, Tensor] | None, keep: Tensor | None,
                 counts: list[int] | None = None) -> None:
        self.n, self.rows, self.index, self.keep = n, rows, index, keep
        kept = n * rows if counts is None else sum(counts)
        #: whether grouping into ``(n, rows, d)`` blocks is worth its memory (rows spread evenly enough)
        self.batched = n * rows <= self.MAX_PADDING * kept + n
        self.counts = counts

    @classmethod
    def of(cls, owner: Tensor, n: int) -> _TaskBlocks:
        R = owner.shape[0]
        if R and R % n == 0:
            rows = R // n
            in_order = torch.arange(n, device=owner.device).repeat_interleave(rows)
            if torch.equal(owner, in_order):
                return cls(n, rows, None, None)
        keep = owner >= 0
        own = owner[keep]
        counts = torch.bincount(own, minlength=n)
        order = torch.argsort(own, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.empty_like(own)
        pos[order] = torch.arange(own.numel(), device=own.device) - starts[own[order]]
        rows = int(counts.max()) if own.numel() else 0
        return cls(n, rows, (own, pos), keep, counts.tolist())

    def rows_of(self, t: Tensor) -> list[Tensor]:
        """``t`` ``(R, d)`` as one ``(rows_i, d)`` tensor per task (for unevenly spread rows)."""
        own = self.index[0] if self.index is not None else None
        kept = t if self.keep is None else t[self.keep]
        if own is None:
            return list(kept.reshape(self.n, self.rows, t.shape[-1]).unbind(0))
        return list(torch.split(kept[torch.argsort(own, stable=True)], self.counts))

    def split(self, t: Tensor) -> Tensor:
        """``t`` ``(R, d)`` as ``(n, rows, d)``."""
        if self.index is None:
            return t.reshape(self.n, self.rows, t.shape[-1])
        out = t.new_zeros(self.n, self.rows, t.shape[-1])
        out[self.index] = t[self.keep]
        return out


class GramEngine:
    """Step products ``Z[i, j] = u_i · g_j`` of the shared parameters from layer activations.

    Args:
        module: the LightningModule (hooks go on its submodules).
        params: the trainable shared parameters, in a fixed order.
        root: the shared root module (its outputs are the shared representation);
            ``None`` to find it (:func:`shared_root`).
        scope: ``"shared"`` (every shared parameter, exact), ``"last_layer"``
            (only the last shared ``nn.Linear`` called in the forward pass) or
            ``"representation"`` (gradients w.r.t. the root outputs instead of
            any parameter).
        separable: ``"auto"`` (detect per-task rows at every step), ``False``
            (always the dense path).
        max_chunk_bytes: bound on explicit per-task gradient chunks.
        use_gram_trick: allow the example-Gram shortcut on dense batches.

    Call :meth:`start_step` before a measured step's forward (the hooks record
    only then) and :meth:`products` in ``on_before_backward``.
    """

    def __init__(
        self,
        module: nn.Module,
        params: Sequence[Tensor],
        root: nn.Module | None = None,
        *,
        scope: str = "shared",
        separable: bool | str = "auto",
        max_chunk_bytes: int = MAX_CHUNK_BYTES,
        use_gram_trick: bool = True,
    ) -> None:
        if scope not in ("shared", "last_layer", "representation"):
            raise ValueError(f"scope must be 'shared', 'last_layer' or 'representation', got {scope!r}")
        self.params = list(params)
        self.scope = scope
        self.root = root if root is not None else shared_root(module, self.params)
        if scope == "representation" and self.root is None:
            raise ValueError(
                "scope='representation' needs a shared submodule whose output is the shared representation; "
                "the shared parameters are not all inside one submodule (name it with shared='<submodule>')"
            )
        self.layers = linear_layers(module, self.params) if scope != "representation" else []
        #: fast layers whose parameters take the exact autograd path instead: tied weights (from the start,
        #: value nan) and layers found at the first measured step to get gradient outside their own recorded
        #: forward calls (:meth:`_verify`; value: the share of the gradient the calls missed)
        self.excluded: dict[int, float] = {k: math.nan for k in tied_layers(self.layers)}
        covered = {p for k, lay in enumerate(self.layers) if k not in self.excluded for p in lay.indices}
        self.rest = [k for k in range(len(self.params)) if k not in covered] if scope == "shared" else []
        self._module = module
        self._rest_blocks = _reindexed_blocks(self.params, self.rest, module)
        self._layer_blocks: dict[int, tuple[list[int], list[list[int]]]] = {}  # scope="last_layer": per layer
        self._verified = False
        self._gradients = ExactTaskGradients()
        self.separable = separable
        self.max_chunk_bytes = int(max_chunk_bytes)
        self.use_gram_trick = bool(use_gram_trick)
        mixing = self.root is not None and any(isinstance(m, _ROW_MIXING) for m in self.root.modules())
        self._root_mixes_rows = mixing
        self.tap = ActivationTap(self.layers, self.root)
        # set once a step's rows turned out shared between tasks (a fixed property of the model and data layout):
        # later steps skip the check and go straight to the dense path
        self._rows_shared = False
        # set once a dense step took the explicit-gradient path in every layer while every shared parameter fits
        # one autograd block: later steps take one vectorised backward straight to the parameters, the same
        # multiply-adds in fewer calls (the per-call costs dominate such small models)
        self._single_block = scope == "shared" and len(parameter_blocks(self.params, module)) == 1
        self._all_blocks = [list(range(len(self.params)))]
        self._delegate = False
        #: the path the last step took ("separable", "dense", "representation", "none"), for diagnostics
        self.last_path = ""
        #: (plain step, measurement) multiply-add estimates of the last measured step (see :meth:`_costs`)
        self.last_costs: tuple[float, float] | None = None
        #: multiply-add estimate of the last proxy computation (see :meth:`proxy_products`)
        self.last_proxy_macs: float | None = None
        self._omegas: dict[tuple[int, str], Tensor] = {}
        self._blocks_memo: dict[int, tuple[Tensor, _TaskBlocks]] = {}  # per step: row groupings by owner tensor

    def close(self) -> None:
        self.tap.remove()

    def start_step(self, proxy: bool = False) -> None:
        """Record the coming step's forward (for the exact products, or only for the ``proxy``)."""
        self.tap.clear()
        self.tap.active = proxy or not self._delegate

    def stop_step(self) -> None:
        self.tap.active = False
        self.tap.clear()

    # ------------------------------------------------------------------ main entry
    def products(
        self,
        task_losses: Tensor,
        rules: Sequence[UpdateRule],
        *,
        grad_scale: float = 1.0,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
        parts: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """``Z`` (float64 ``(n, n)``) of the step whose forward was recorded.

        Args:
            task_losses: ``(n,)`` per-task losses, in the graph.
            parts: the ``n`` scalar losses ``task_losses`` was stacked from, if
                at hand: a backward call from one of them reaches only that
                task's head, where one from ``task_losses[i]`` passes zero
                gradients through every other head too.
            rules: one update rule per shared parameter
                (:func:`~lightning_etap.affinity.scores.task_update_rules`);
                ``scope="representation"`` uses only their learning-rate
                factor (the first rule's ``alpha``).
            grad_scale: the loss scale of fp16 training: seeds are multiplied by
                it (against underflow) and the gradients divided by it again.
            all_reduce: averages a tensor over data-parallel ranks in place
                (``None``: one process).
        """
        record = self.tap.take()
        self.tap.active = False
        self._blocks_memo = {}
        n = task_losses.shape[0]
        device = task_losses.device
        Z = torch.zeros(n, n, dtype=torch.float64, device=device)
        if not task_losses.requires_grad:
            self.last_path = "none"
            return Z
        seeds = torch.eye(n, dtype=task_losses.dtype, device=device) * grad_scale
        parts = list(parts) if parts is not None else [task_losses[i] for i in range(n)]
        roots = [t for call in record.roots for t in call]
        if self.scope == "representation":
            self._representation(task_losses, parts, roots, seeds, rules, Z, grad_scale, all_reduce)
            return Z
        if self._delegate:
            self.last_path = "autograd"
            self._autograd_products(task_losses, rules, Z, grad_scale, all_reduce, n, every=True)
            return Z
        calls = record.linear
        if self.scope == "last_layer" and calls:
            last = calls[-1].layer
            calls = [c for c in calls if c.layer == last]
        if not self._verified and self.layers:
            self._verify(parts, calls, grad_scale, all_reduce)
        rest, rest_blocks = self.rest, self._rest_blocks
        if self.scope == "last_layer":  # the measured layer's parameters by autograd when it is excluded
            rest, rest_blocks = self._excluded_layer_params(calls[-1].layer if calls else None)
        if self.excluded:
            calls = [c for c in calls if c.layer not in self.excluded]
        data = self._layer_data(task_losses, parts, record, calls, roots, seeds, grad_scale, n)
        linear = all(isinstance(r, LinearUpdate) for r in rules)
        # without a recorded linear layer the cost is unknown here (the callback then assumes n backward passes)
        self.last_costs = (self._costs(record.linear, data, n, linear and all_reduce is None, roots)
                           if record.linear else None)
        tricks = [self._layer_products(self.layers[k], layer_data, rules, Z, all_reduce, n)
                  for k, layer_data in data.items()]
        if self._single_block and self.last_path == "dense" and self._rows_shared and data and not any(tricks):
            self._delegate = True
        if rest:
            self._autograd_products(task_losses, rules, Z, grad_scale, all_reduce, n, keep=(rest, rest_blocks))
        return Z

    def _excluded_layer_params(self, layer: int | None) -> tuple[list[int], list[list[int]]]:
        """The parameter indices of ``layer`` and their autograd blocks when it is excluded, else nothing."""
        if layer is None or layer not in self.excluded:
            return [], []
        if layer not in self._layer_blocks:
            keep = self.layers[layer].indices
            self._layer_blocks[layer] = (keep, _reindexed_blocks(self.params, keep, self._module))
        return self._layer_blocks[layer]

    def _verify(self, parts: Sequence[Tensor], calls: list[_LinearCall], grad_scale: float, all_reduce) -> None:
        """Check, once, that the recorded calls account for every fast layer's whole gradient.

        The fast path builds a layer's per-task gradients from its own forward
        calls only. A weight that also gets gradient elsewhere (used with
        ``F.linear`` or ``x @ layer.weight``, tied to another module's weight,
        a penalty on it inside a task loss) would silently get wrong products.
        One backward of the summed task losses to the layers' parameters and
        outputs compares the true gradient with the one rebuilt from the
        calls; a layer off by more than a rounding tolerance (relative 1e-3,
        3e-2 when the calls ran in reduced precision) moves its parameters to
        the exact autograd path from then on, with a warning. Under DDP the
        errors are averaged over ranks first, so that every rank decides alike.
        """
        self._verified = True
        # every fast layer (one whose calls all went unrecorded still gets its gradient); under
        # scope="last_layer" the layer measured; not those already excluded (tied weights)
        layers = sorted({c.layer for c in calls}) if self.scope == "last_layer" else list(range(len(self.layers)))
        layers = [k for k in layers if k not in self.excluded]
        if not layers:
            return
        live = [p for p in parts if p.requires_grad]
        targets = [i for k in layers for i in self.layers[k].indices]
        errors = torch.zeros(len(layers), dtype=torch.float64, device=self.params[targets[0]].device)
        if live:
            total = torch.stack([p.reshape(()) for p in live]).sum() * grad_scale
            outputs = [c.output for c in calls]
            grads = torch.autograd.grad(total, [self.params[i] for i in targets] + outputs, retain_graph=True,
                                        allow_unused=True)
            true = dict(zip(targets, grads[:len(targets)]))
            # the same gradients rebuilt from the recorded calls: weight Δᵀ A and bias Σ Δ, summed over calls
            rebuilt: dict[int, Tensor] = {}
            for call, g in zip(calls, grads[len(targets):]):
                if g is None:
                    continue
                delta = g.reshape(-1, g.shape[-1]).float()
                lay = self.layers[call.layer]
                for i, piece in ((lay.weight, delta.T @ call.inputs.float()), (lay.bias, delta.sum(0))):
                    if i is not None:
                        rebuilt[i] = rebuilt[i] + piece if i in rebuilt else piece
            for row, k in enumerate(layers):
                diff = norm = 0.0
                for i in self.layers[k].indices:
                    param = self.params[i]
                    want = torch.zeros_like(param, dtype=torch.float32) if true[i] is None else true[i].float()
                    got = rebuilt[i].reshape(want.shape) if i in rebuilt else torch.zeros_like(want)
                    diff += float((want - got).square().sum())
                    norm += max(float(want.square().sum()), float(got.square().sum()))
                if not (math.isfinite(diff) and math.isfinite(norm)):
                    errors[row] = math.nan  # overflowed: no verdict from this step
                else:
                    errors[row] = (diff / norm) ** 0.5 if norm > 0 else 0.0
        if all_reduce is not None:
            errors = all_reduce(errors)
        if not bool(torch.isfinite(errors).all()):  # e.g. fp16's first steps overflow: check at the next one
            self._verified = False
            return
        reduced = any(c.output.dtype not in (torch.float32, torch.float64) for c in calls)
        tolerance = 3e-2 if reduced else 1e-3
        bad = {k: float(e) for k, e in zip(layers, errors.tolist()) if e > tolerance}
        if not bad:
            return
        self.excluded.update(bad)
        if self.scope == "shared":
            moved = {i for k in bad for i in self.layers[k].indices}
            self.rest = sorted(set(self.rest) | moved)
            self._rest_blocks = _reindexed_blocks(self.params, self.rest, self._module)
        names = {id(m): name for name, m in self._module.named_modules()}
        inplace = [k for k in bad if any(c.layer == k and c.output._version != c.version for c in calls)]
        listed = ", ".join(f"{names.get(id(self.layers[k].module), '?')!r} ({100 * e:.1f} % of its gradient)"
                           for k, e in bad.items())
        why = ("the weight used directly, e.g. F.linear(x, layer.weight) or a penalty on it in a task loss")
        if inplace:
            why = ("the layer's output modified in place, e.g. by nn.ReLU(inplace=True) after it: inplace=False "
                   "keeps the fast path; or " + why)
        rank_zero_warn(
            f"AffinityCallback: the per-task gradients of shared linear layer(s) {listed} cannot be rebuilt from "
            f"the layer's recorded forward calls ({why}); they now come from exact autograd (engine='autograd' "
            "for these layers: correct, slower)",
            category=UserWarning,
        )

    def _costs(self, all_calls: list[_LinearCall], data: dict[int, _LayerData], n: int,
               trick_allowed: bool, roots: Sequence[Tensor] = ()) -> tuple[float, float]:
        """Multiply-adds of a plain step and of this step's measurement, from the recorded shapes.

        A plain step costs about three forward passes of the shared layers
        (forward, input and weight gradients). The measurement: separable rows,
        one input-gradient pass and one weight-gradient pass (every task's
        gradient of a layer in one batched product), plus the ``n x n``
        products; dense rows, ``n`` input-gradient passes plus, per layer, the
        cheaper of explicit gradients and the example-Gram shortcut, both
        scaled by :data:`DENSE_WORK_FACTOR` (batched over ``n`` tasks' rows, they
        run faster per multiply-add than the plain step's products). Shared
        parameters outside ``nn.Linear`` layers count as ``n`` backward passes of
        the whole encoder. Both get a fixed per-step / per-call cost (Python
        and dispatch), which dominates for small models: the calls counted are
        one per recorded layer call, the representation gradients (one
        vectorised call, or one per task: :func:`root_gradients`) and the
        backward pass to the layers.
        """
        forward = float(sum(c.inputs.shape[0] * c.inputs.shape[1] * c.output.shape[-1] for c in all_calls))
        plain = 3.0 * forward + FIXED_STEP_MACS
        root_calls = n if roots and n * n * sum(r.numel() for r in roots) >= BATCHED_ROOT_WORK else 1
        extra = FIXED_MEASURE_MACS + FIXED_CALL_MACS * (len(all_calls) + 1 + root_calls)
        for d in data.values():
            R, fan_in = d.inputs.shape
            fan_out = d.delta.shape[-1]
            size = fan_in * fan_out
            if d.owner is not None:  # one input- and one weight-gradient pass (one batched product per layer)
                extra += 2.0 * R * size + n * n * size + FIXED_CALL_MACS
            else:
                direct = n * R * size + n * n * size
                trick = R * R * fan_in + n * R * R * fan_out + n * n * R * fan_out
                extra += DENSE_WORK_FACTOR * (n * R * size + (min(direct, trick) if trick_allowed else direct))
        if self.rest:
            extra += 2.0 * n * forward
        return plain, extra

    # ------------------------------------------------------------------ control-variate proxy
    def proxy_products(
        self,
        parts: Sequence[Tensor],
        rules: Sequence[UpdateRule],
        *,
        grad_scale: float = 1.0,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor | None:
        """Cheap proxy products of the recorded step (``None`` when there is nothing to build them from).

        The proxy is the exact product of the last shared ``nn.Linear``
        layer's gradients, with its weight gradients seen through a
        :data:`PROXY_RANK`-column basis of the leading directions of the layer's inputs:
        ``P[i, j] = α (b_i · b_j + (Δ_iᵀ A Q) · (Δ_jᵀ A Q))``, where ``Δ_i``
        are task ``i``'s gradients at the layer's outputs (one backward call
        per task through its head, nothing through the rest of the encoder),
        ``b_i`` their sum over rows (the bias gradient) and ``Q`` an
        orthonormal basis of the inputs' leading directions (one step of a
        randomised range finder from a fixed random start, the same on every
        rank; under DDP from the all-reduced ``AᵀAΩ``). A shared root
        without a recorded linear layer falls back to the gradients of a bias
        added to the shared representation, ``P[i, j] = α b_i · b_j``.

        ``P`` is not the affinity and ranks the pairs poorly on its own; what
        makes it useful is that it moves with the exact products from batch to
        batch (the control variate of
        :class:`~lightning_etap.affinity.scores.AffinityAccumulator`). On the
        benchmark's wide encoder its per-step correlation with the exact
        products is 0.96 (median over entries), that of the representation
        bias 0.93. The record is left in place for :meth:`products` of the
        same step.
        """
        record = self.tap._record
        n = len(parts)
        if not any(p.requires_grad for p in parts):
            return None
        if not record.linear:
            return self._bias_proxy(record, parts, rules, grad_scale, all_reduce)
        layer = record.linear[-1].layer
        calls = [c for c in record.linear if c.layer == layer]
        outputs = [c.output for c in calls]
        A = torch.cat([c.inputs for c in calls]).float() if len(calls) > 1 else calls[0].inputs.float()
        out_dim = outputs[0].shape[-1]
        omega = self._proxy_start(A.shape[1], A.device)
        Y = A.T @ (A @ omega)  # (in, q): the inputs' leading directions, one power step
        if all_reduce is not None:
            Y = all_reduce(Y)
        Q = torch.linalg.qr(Y).Q
        # the row weights of the proxy's gradient features: a row of ones (the bias gradient, a sum over rows)
        # and the rows' coordinates in the basis; each task's (R, out) output gradients meet them at once, so
        # the n x R x out block of every task's gradients is never formed
        C = (A @ Q).T
        if self.layers[layer].module.bias is not None:
            C = torch.cat([C.new_ones(1, C.shape[1]), C])
        C = C.contiguous()
        seed = torch.tensor(float(grad_scale), dtype=parts[0].dtype, device=parts[0].device)
        F = A.new_zeros(n, C.shape[0] * out_dim)
        for i, part in enumerate(parts):
            if not part.requires_grad:
                continue
            grads = torch.autograd.grad(part, outputs, grad_outputs=seed, retain_graph=True, allow_unused=True)
            if all(g is None for g in grads):
                continue
            rows = [(torch.zeros_like(z) if g is None else g).reshape(-1, out_dim) for g, z in zip(grads, outputs)]
            delta = rows[0] if len(rows) == 1 else torch.cat(rows)
            F[i] = (C @ delta.float()).reshape(-1)
        if grad_scale != 1.0:
            F /= grad_scale
        if all_reduce is not None:
            F = all_reduce(F)
        R, fan_in, q = A.shape[0], A.shape[1], Q.shape[1]
        self.last_proxy_macs = float(FIXED_MEASURE_MACS + n * (PROXY_TASK_MACS + R * out_dim)
                                     + 3 * R * fan_in * q + n * R * out_dim * (q + 1) + n * n * F.shape[1])
        rule = rules[self.layers[layer].weight]
        alpha = rule.alpha if isinstance(rule, LinearUpdate) else 1.0
        return alpha * (F @ F.T).double()

    def _proxy_start(self, fan_in: int, device: torch.device) -> Tensor:
        """The fixed random start ``Ω`` (``fan_in x q``) of the proxy's range finder, the same on every rank."""
        key = (fan_in, str(device))
        omega = self._omegas.get(key)
        if omega is None:
            q = min(fan_in, PROXY_RANK)
            gen = torch.Generator().manual_seed(0)
            omega = torch.randn(fan_in, q, generator=gen).to(device)
            self._omegas[key] = omega
        return omega

    def _bias_proxy(self, record: _Record, parts, rules, grad_scale, all_reduce) -> Tensor | None:
        """``P[i, j] = α b_i · b_j``, ``b_i = Σ_rows ∂L_i/∂h`` at the shared representation ``h``."""
        n = len(parts)
        roots = [t for call in record.roots for t in call]
        if not roots:
            return None
        widths = [r.shape[-1] if r.dim() else 1 for r in roots]
        F = torch.zeros(n, sum(widths), dtype=torch.float32, device=parts[0].device)
        seed = torch.tensor(float(grad_scale), dtype=parts[0].dtype, device=parts[0].device)
        for i, part in enumerate(parts):
            if not part.requires_grad:
                continue
            grads = torch.autograd.grad(part, roots, grad_outputs=seed, retain_graph=True, allow_unused=True)
            col = 0
            for g, w in zip(grads, widths, strict=True):
                if g is not None:
                    F[i, col:col + w] = g.reshape(-1, w).sum(0).float()
                col += w
        if grad_scale != 1.0:
            F /= grad_scale
        if all_reduce is not None:
            F = all_reduce(F)
        rows = sum(r.numel() for r in roots)
        self.last_proxy_macs = float(FIXED_MEASURE_MACS + n * (PROXY_TASK_MACS + rows) + n * n * F.shape[1])
        alpha = next((r.alpha for r in rules if isinstance(r, LinearUpdate)), 1.0)
        return alpha * (F @ F.T).double()

    # ------------------------------------------------------------------ output gradients
    def _layer_data(self, task_losses, parts: list[Tensor], record: _Record, calls: list[_LinearCall],
                    roots: list[Tensor], seeds: Tensor, grad_scale: float, n: int) -> dict[int, _LayerData]:
        if not calls:
            return {}
        outputs = [c.output for c in calls]
        owners: list[Tensor] | None = None
        D: Sequence[Tensor | None] | None = None
        if roots:
            D = root_gradients(parts, roots, seeds, stacked=task_losses)
            if self.separable == "auto" and not self._rows_shared and not self._mixing_now():
                owners = _row_owners(record, D)
                self._rows_shared = owners is None
        if owners is not None:
            self.last_path = "separable"
            total = [None if d is None else d.sum(0) for d in D]
            grads = torch.autograd.grad(
                [r for r, t in zip(roots, total) if t is not None], outputs,
                grad_outputs=[t for t in total if t is not None], retain_graph=True, allow_unused=True)
            per_call_owner = _call_owners(record, calls, owners)
            if per_call_owner is not None:
                return _gather(calls, grads, per_call_owner, grad_scale, dense=False)
        self.last_path = "dense"
        if roots and D is not None and any(d is not None for d in D):
            keep = [i for i, d in enumerate(D) if d is not None]
            grads = torch.autograd.grad([roots[i] for i in keep], outputs, grad_outputs=[D[i] for i in keep],
                                        retain_graph=True, allow_unused=True, is_grads_batched=True)
            if all(g is not None for g in grads) or not self._outputs_outside_roots(calls):
                return _gather(calls, grads, None, grad_scale, dense=True)
        grads = torch.autograd.grad(task_losses, outputs, grad_outputs=seeds, retain_graph=True,
                                    allow_unused=True, is_grads_batched=True)
        return _gather(calls, grads, None, grad_scale, dense=True)

    def _task_blocks(self, owner: Tensor, n: int) -> _TaskBlocks:
        """The grouping of ``owner``'s rows by task, computed once per step for layers that share it."""
        hit = self._blocks_memo.get(id(owner))
        if hit is None or hit[0] is not owner:
            hit = (owner, _TaskBlocks.of(owner, n))
            self._blocks_memo[id(owner)] = hit
        return hit[1]

    def _outputs_outside_roots(self, calls: list[_LinearCall]) -> bool:
        return any(c.root_call < 0 for c in calls)

    def _mixing_now(self) -> bool:
        return self._root_mixes_rows and any(m.training for m in self.root.modules() if isinstance(m, _ROW_MIXING))

    # ------------------------------------------------------------------ products of one layer
    def _layer_products(self, layer: FastLinearLayer, data: _LayerData, rules: Sequence[UpdateRule], Z: Tensor,
                        all_reduce, n: int) -> bool:
        """Add one layer's products to ``Z``; whether the example-Gram shortcut was taken."""
        rw = rules[layer.weight]
        rb = rules[layer.bias] if layer.bias is not None else None
        A, delta, owner = data.inputs, data.delta, data.owner
        dense = owner is None
        blocks = None
        if not dense:  # the rows grouped by task: (n, rows, ·) blocks, views where the layout allows
            blocks = self._task_blocks(owner, n)
            delta = blocks.split(delta) if blocks.batched else blocks.rows_of(delta)
        # bias: g_i = Σ_rows Δ_i  (n, out)
        if rb is not None:
            gb = delta.sum(1) if isinstance(delta, Tensor) else torch.stack([d.sum(0) for d in delta])
            if all_reduce is not None:
                gb = all_reduce(gb)
            _accumulate(Z, rb, gb, gb, layer.module.bias, None)
        out_dim, in_dim = layer.module.weight.shape
        R = A.shape[0]
        linear = isinstance(rw, LinearUpdate)
        trick = (self.use_gram_trick and dense and linear and all_reduce is None
                 and R * R * in_dim + n * R * R * out_dim + n * n * R * out_dim < n * R * in_dim * out_dim)
        if trick:
            self._gram_trick(rw, A, delta, Z, layer.module.weight)
            return True
        # explicit chunks of G (n, rows of W, in)
        per_row = n * in_dim * 4 * (2 if not linear else 1)
        step = max(1, min(out_dim, self.max_chunk_bytes // max(1, per_row)))
        if blocks is not None:  # every task's rows of A: one batched product per chunk, or one per task
            A = blocks.split(A) if blocks.batched else blocks.rows_of(A)
        for o0 in range(0, out_dim, step):
            o1 = min(out_dim, o0 + step)
            if dense:
                G = torch.matmul(delta[:, :, o0:o1].transpose(1, 2), A)  # (n, rows of W, in)
            elif blocks.batched:
                G = torch.bmm(delta[:, :, o0:o1].transpose(1, 2), A)
            else:
                G = torch.stack([d[:, o0:o1].T @ a for d, a in zip(delta, A, strict=True)])
            if all_reduce is not None:
                G = all_reduce(G)
            _accumulate(Z, rw, G.reshape(n, -1), G, layer.module.weight, (o0, o1))
        return False

    def _gram_trick(self, rule: LinearUpdate, A: Tensor, delta: Tensor, Z: Tensor, weight: Tensor) -> None:
        """``α Σ ⟨Δ_i, K Δ_j⟩ + ⟨Δ_i, A Cᵀ⟩`` with ``K = A Aᵀ``: the weight products without forming ``G``."""
        n = delta.shape[0]
        if rule.alpha != 0:
            K = A @ A.T  # (R, R)
            M = torch.matmul(K, delta)  # (n, R, out)
            # a plain matrix product over the flattened (row, unit) axis: torch.einsum takes a path ~10x slower
            Z += rule.alpha * (delta.reshape(n, -1) @ M.reshape(n, -1).T).double()
        if rule.offset is not None:
            AC = A @ rule.offset.detach().to(A.dtype).reshape(weight.shape).T  # (R, out)
            Z += (delta.reshape(n, -1) @ AC.reshape(-1)).double().unsqueeze(0).expand(n, n)

    # ------------------------------------------------------------------ other paths
    def _autograd_products(self, task_losses, rules, Z, grad_scale, all_reduce, n, every: bool = False,
                           keep: tuple[list[int], list[list[int]]] | None = None) -> None:
        """Products of explicit autograd per-task gradients: of the parameters outside the fast layers (or
        ``keep``: indices and their blocks), or ``every`` one."""
        if every:
            keep = (list(range(len(self.params))), self._all_blocks)
        elif keep is None:
            keep = (self.rest, self._rest_blocks)
        indices, blocks = keep
        params = [self.params[k] for k in indices]
        local_rules = [rules[k] for k in indices]
        for k, grads in self._gradients(task_losses, params, blocks, scale=grad_scale):
            flat = grads.reshape(n, -1).float()
            if all_reduce is not None:
                flat = all_reduce(flat)
            _accumulate(Z, local_rules[k], flat, flat.reshape(grads.shape), params[k], None)

    def _representation(self, task_losses, parts, roots, seeds, rules, Z, grad_scale, all_reduce) -> None:
        """``Z[i, j] = α D_i · D_j`` with ``D_i = ∂L_i/∂h`` at the shared representation ``h``."""
        self.last_path = "representation"
        self.last_costs = (FIXED_STEP_MACS, FIXED_MEASURE_MACS)
        if not roots:
            return
        D = root_gradients(parts, roots, seeds, stacked=task_losses)
        n = task_losses.shape[0]
        alpha = rules[0].alpha if isinstance(rules[0], LinearUpdate) else 1.0
        for d in D:
            if d is None:
                continue
            flat = d.reshape(n, -1).float() / grad_scale
            if all_reduce is not None:
                flat = all_reduce(flat)
            Z += alpha * (flat @ flat.T).double()


# --------------------------------------------------------------------------- helpers
#: ``n² x`` representation size (values) below which :func:`root_gradients` takes one vectorised call
BATCHED_ROOT_WORK = 2**22


def root_gradients(task_losses: Sequence[Tensor], roots: Sequence[Tensor], seeds: Tensor,
                   stacked: Tensor | None = None) -> list[Tensor | None]:
    """``D[k][i] = seeds[i, i] · ∂L_i/∂roots[k]``, shape ``(n, *roots[k].shape)`` (``None``: no task reaches it).

    ``task_losses``: the ``n`` scalar losses, separate tensors (not slices of
    a stacked one, or every call passes zeros through every head);
    ``stacked``: the same losses stacked, if at hand.

    Large representations: one backward call per task, each through that
    task's own head and loss only. A vectorised call over the ``n`` one-hot
    seeds pushes ``n`` gradients through *every* head (vmap cannot see that
    ``n - 1`` of them are zero) and sums ``n x n`` representation-sized
    tensors: with 30 tasks on a 1024-wide representation of 256 rows that
    alone cost about five plain training steps. Small ones (``n² x`` the
    representation's size below :data:`BATCHED_ROOT_WORK`, e.g. Chemical's
    264 x 16): that one vectorised call, whose fixed cost is one call's
    instead of ``n``.
    """
    n = len(task_losses)
    size = sum(r.numel() for r in roots)
    if n * n * size < BATCHED_ROOT_WORK and any(t.requires_grad for t in task_losses):
        losses = stacked if stacked is not None else torch.stack([t.reshape(()) for t in task_losses])
        return list(torch.autograd.grad(losses, roots, grad_outputs=seeds, retain_graph=True,
                                        allow_unused=True, is_grads_batched=True))
    per_root: list[list[Tensor | None]] = [[None] * n for _ in roots]
    for i in range(n):
        if not task_losses[i].requires_grad:
            continue
        grads = torch.autograd.grad(task_losses[i], roots, grad_outputs=seeds[i, i], retain_graph=True,
                                    allow_unused=True)
        for k, g in enumerate(grads):
            per_root[k][i] = g
    out: list[Tensor | None] = []
    for root, rows in zip(roots, per_root, strict=True):
        if all(g is None for g in rows):
            out.append(None)
            continue
        zero = torch.zeros_like(root)
        out.append(torch.stack([zero if g is None else g for g in rows]))
    return out


def _reindexed_blocks(params: Sequence[Tensor], keep: Sequence[int], module: nn.Module) -> list[list[int]]:
    sub = [params[k] for k in keep]
    return parameter_blocks(sub, module) if sub else []


def _row_owners(record: _Record, D: Sequence[Tensor | None]) -> list[Tensor] | None:
    """Per root call, the task owning each row of its (single) output, or ``None`` if rows are shared."""
    owners: list[Tensor] = []
    k = 0
    for call in record.roots:
        if len(call) != 1:
            return None
        d = D[k]
        k += 1
        if d is None:
            owners.append(torch.full((call[0].reshape(-1, call[0].shape[-1]).shape[0],), -1, dtype=torch.long))
            continue
        n = d.shape[0]
        x = d.reshape(n, -1, d.shape[-1])
        # a row belongs to the task(s) whose gradient on it is not all zero (a NaN counts as not zero); the
        # absolute row sums by one matrix-vector product are several times faster than ne(0).any(-1)
        nz = (x.abs() @ x.new_ones(x.shape[-1])) != 0  # (n, rows)
        per_row = nz.sum(0)
        if bool((per_row > 1).any()):
            return None
        code = torch.arange(1, n + 1, device=d.device).unsqueeze(1)
        owners.append((nz * code).sum(0) - 1)  # the task of each row, -1 for rows no task reaches
    return owners if owners else None


def _call_owners(record: _Record, calls: list[_LinearCall], owners: list[Tensor]) -> list[Tensor] | None:
    out = []
    for c in calls:
        if c.root_call < 0:
            return None
        own = owners[c.root_call]
        if own.shape[0] != c.inputs.shape[0]:
            return None
        out.append(own)
    return out


def _gather(calls: list[_LinearCall], grads: Sequence[Tensor | None], owners: list[Tensor] | None,
            grad_scale: float, dense: bool) -> dict[int, _LayerData]:
    """Concatenate every call's rows per layer (float32, unscaled)."""
    per_layer: dict[int, list[tuple[Tensor, Tensor, Tensor | None]]] = {}
    for idx, (c, g) in enumerate(zip(calls, grads)):
        if g is None:
            continue
        out_dim = c.output.shape[-1]
        if dense:
            delta = g.reshape(g.shape[0], -1, out_dim).float()
        else:
            delta = g.reshape(-1, out_dim).float()
        if grad_scale != 1.0:
            delta = delta / grad_scale
        per_layer.setdefault(c.layer, []).append((c.inputs.float(), delta, None if owners is None else owners[idx]))
    data = {}
    for k, items in per_layer.items():
        A = torch.cat([a for a, _, _ in items]) if len(items) > 1 else items[0][0]
        if dense:
            delta = torch.cat([d for _, d, _ in items], dim=1) if len(items) > 1 else items[0][1]
            owner = None
        else:
            delta = torch.cat([d for _, d, _ in items]) if len(items) > 1 else items[0][1]
            owner = torch.cat([o for _, _, o in items]) if len(items) > 1 else items[0][2]
            owner = owner.to(delta.device)
        data[k] = _LayerData(A, delta, owner)
    return data


def _accumulate(Z: Tensor, rule: UpdateRule, flat: Tensor, shaped: Tensor, param: Tensor,
                rows: tuple[int, int] | None) -> None:
    """Add ``u_i · g_j`` of one parameter (or rows ``rows`` of it) to ``Z``.

    ``flat``: ``(n, numel)`` per-task gradients; ``shaped``: the same as
    ``(n, *shape)`` (or ``(n, rows, *rest)`` for a slice).
    """
    n = flat.shape[0]
    if isinstance(rule, LinearUpdate):
        if rule.alpha != 0:
            Z += rule.alpha * (flat @ flat.T).double()
        if rule.offset is not None:
            off = rule.offset.detach()
            if rows is not None:
                off = off[rows[0]:rows[1]]
            Z += (flat @ off.reshape(-1).to(flat.dtype)).double().unsqueeze(0).expand(n, n)
        return
    rule = _adam_slice(rule, rows)
    U = rule(shaped.to(rule.param.dtype)).reshape(n, -1).to(flat.dtype)
    Z += (U @ flat.T).double()


def _adam_slice(rule: AdamUpdate, rows: tuple[int, int] | None) -> AdamUpdate:
    if rows is None:
        return rule
    a, b = rows

    def cut(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[a:b]

    return AdamUpdate(
        lr=rule.lr, beta1=rule.beta1, beta2=rule.beta2, eps=rule.eps, weight_decay=rule.weight_decay,
        decoupled=rule.decoupled, maximize=rule.maximize, step=rule.step, param=rule.param[a:b],
        exp_avg=cut(rule.exp_avg), exp_avg_sq=cut(rule.exp_avg_sq), max_exp_avg_sq=cut(rule.max_exp_avg_sq),
    )
