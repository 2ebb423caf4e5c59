"""Train many small group models at once, in one process, exactly as one-at-a-time training would.

:class:`BatchedMLPTrainer` is a :class:`~lightning_etap.groundtruth.base.GroupTrainer`
for the reference shared-bottom MLP (:class:`~lightning_etap.models.MultiTaskMLP`)
on per-task-input datasets (Chemical, School, Parkinson's, Landmine). Instead
of one Lightning ``Trainer`` per ``(group, seed)`` job it keeps the parameters
of many models *stacked* (``[models, in, out]`` tensors) and trains them
together with hand-written forward / backward passes, an SGD-with-momentum
step on the stacked tensors, and per-model early stopping. The models are
tiny (a 180-32-16 MLP for Chemical), so one model alone cannot keep a CPU
busy; a stack of hundreds can.

What is reproduced, job by job, from :func:`~lightning_etap.training.train_group`
------------------------------------------------------------------------------
* initialisation: the reference model is built under ``torch.manual_seed(seed)``
  (what ``lightning.seed_everything`` does to torch's generator) and its
  parameters are copied into the stack;
* training rows: the same oversampling draw
  (:func:`~lightning_etap.data.datamodule.oversample_indices`, task order,
  ``torch.Generator().manual_seed(seed)``) and the same batch order
  (:func:`~lightning_etap.data.datamodule.epoch_permutation`);
* the loss of a model: the sum of its tasks' mean losses (binary
  cross-entropy on logits, or mean-squared error);
* the optimiser: ``torch.optim.SGD``'s update rule (momentum buffer set to the
  first gradient, dampening 0, optional Nesterov and weight decay), the lr
  schedule of :func:`~lightning_etap.models.mtl_mlp._lr_factor`;
* early stopping on the summed validation loss (strict improvement, patience,
  stop on a non-finite value), the best epoch's weights restored, and
  per-task test losses computed over the full test split as the reference's
  ``MeanMetric`` does.

The numbers agree with ``train_group`` up to floating-point summation order
(the stacked kernels add the same terms in a different order). Measured on
Chemical with the paper's recipe run to the end (1000 epochs, six groups):
test losses within 1.7e-6 relative, same epochs and best epoch; capped at 15
epochs (30 random groups and seeds): within 3e-7. Under a deliberately
chaotic recipe (lr 50x higher, early stopping after 5-30 epochs) the float
differences grow: 39 of 40 jobs stopped at the same epoch and the median
test loss agreed to 1e-7, but the worst to 3 %. ``tests/test_batched.py``
checks the agreement job by job.

How jobs are batched
--------------------
A job's epoch has ``ceil(n / batch_size)`` steps, where ``n`` is the group's
training rows after oversampling (the largest member's train size). Jobs
with the same ``n`` form a *stack* (at most ``max_models`` models) whose
epochs line up step for step, so every step of a stack has one batch size
and one learning rate (all Chemical groups containing task 83 form one
stack, and so on: ten stacks for the 1023 groups). Every ``(model, task)``
pair has its own head and its own rows. A model that stops early is
frozen: its result is final at once, and it is removed from the stack when
enough models have stopped, so finished models cost nothing.

Two backends compute a step's gradients; both give the numbers above.

* ``"c"`` (default when a C compiler is available): a small C kernel,
  generated for the layer widths, compiled once with ``cc`` and loaded with
  ``ctypes``, runs the forward and backward pass one model at a time (its
  weights and gradients stay in cache) and one block of rows at a time
  (vectorised over the hidden units). Each model's arithmetic does not depend
  on the other models in the stack, so a job's result is bitwise the same
  alone or in any batch. ``threads > 1`` splits the models of a step across
  threads.
* ``"torch"``: stacked PyTorch operations (``torch.bmm``/``baddbmm`` with
  per-pair gathered weights, ``embedding_bag`` and ``index_add_`` for one-hot
  inputs) over chunks of about ``chunk_rows`` rows. No compiler needed; about
  ten times slower than the C kernel on Chemical.

The optimiser step, early stopping, best-weight copies and evaluation
bookkeeping are PyTorch operations on the stacked tensors in both cases.

One-hot inputs
--------------
When every input value is 0 or 1 and every row has the same number of ones
(Chemical: 9 positions x 20 amino acids, nine ones per row), the first layer
``x @ W1 + b1`` is a sum of nine rows of ``W1`` plus the bias: the trainer
then stores the column indices of the ones and gathers and scatter-adds
rows of ``W1`` instead of multiplying dense matrices (Chemical: 10 instead
of 181 rows per example). ``one_hot="auto"`` detects it; ``False`` forces the
dense path.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_etap.groundtruth.base import GroupOutcome

__all__ = ["BatchedMLPTrainer", "detect_one_hot"]

log = logging.getLogger(__name__)

_threshold_backward = torch.ops.aten.threshold_backward


# --------------------------------------------------------------------------- data
def detect_one_hot(tensors: Sequence[Tensor]) -> int | None:
    """The constant number of ones per row if every tensor is a 0/1 matrix with that many ones, else ``None``.

    Example:
        >>> detect_one_hot([torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])])
        2
        >>> detect_one_hot([torch.tensor([[0.0, 1.0], [1.0, 1.0]])]) is None
        True
    """
    count: int | None = None
    for x in tensors:
        if x.ndim != 2 or x.shape[0] == 0:
            continue
        if not bool(((x == 0) | (x == 1)).all()):
            return None
        ones = (x == 1).sum(1)
        if not bool((ones == ones[0]).all()):
            return None
        c = int(ones[0])
        if count is None:
            count = c
        elif c != count:
            return None
    return count if count else None


class _Tables:
    """Every task's split rows concatenated into one table per split, with offsets.

    ``x[split]`` is the dense input table (``[rows, d]`` float32), ``feat[split]``
    (one-hot datasets only) the column indices of the ones with the bias index
    ``d`` appended (``[rows, ones + 1]`` int64), ``y[split]`` the targets.
    """

    def __init__(self, dataset: Any, one_hot: bool | str) -> None:
        if dataset.layout != "per_task":
            raise NotImplementedError(
                f"BatchedMLPTrainer supports per-task-input datasets (Chemical, School, Parkinson's, "
                f"Landmine); {dataset.name!r} has the {dataset.layout!r} layout. Use "
                "LightningGroupTrainer / train_group for it."
            )
        dims = {dataset.target_dim(t) for t in dataset.task_names}
        if len(dims) != 1:
            raise NotImplementedError(f"tasks of {dataset.name!r} have different target widths {sorted(dims)}")
        self.names = tuple(dataset.task_names)
        self.index = {t: i for i, t in enumerate(self.names)}
        self.binary = torch.tensor([dataset.kind(t) == "binary" for t in self.names])
        self.d = int(dataset.feature_dim)
        self.k = dims.pop()
        splits = ("train", "val", "test")
        self.sizes = {s: torch.tensor([dataset.n_examples(t, s) for t in self.names]) for s in splits}
        self.offsets = {s: torch.cat([torch.zeros(1, dtype=torch.long), self.sizes[s].cumsum(0)])
                        for s in splits}
        self.x = {s: torch.cat([dataset.split(t, s)[0] for t in self.names]).float().contiguous()
                  for s in splits}
        self.y = {s: torch.cat([dataset.split(t, s)[1] for t in self.names]).float().contiguous()
                  for s in splits}
        ones = detect_one_hot(list(self.x.values())) if one_hot in ("auto", True) else None
        if one_hot is True and ones is None:
            raise ValueError("one_hot=True but the inputs are not 0/1 rows with a constant number of ones")
        self.ones = ones
        self.feat: dict[str, Tensor] = {}
        if ones is not None:
            for s, x in self.x.items():
                cols = torch.nonzero(x == 1)[:, 1].view(x.shape[0], ones)
                bias = torch.full((x.shape[0], 1), self.d, dtype=torch.long)
                self.feat[s] = torch.cat([cols, bias], 1).contiguous()
        self.feat32 = {s: f.to(torch.int32).contiguous() for s, f in self.feat.items()}
        self.binary_u8 = self.binary.to(torch.uint8)

    def eval_rows(self, split: str) -> tuple[Tensor, Tensor]:
        """``[tasks, longest]`` global row indices of each task's split (padded with the task's first row) and sizes."""
        sizes, offsets = self.sizes[split], self.offsets[split]
        longest = max(1, int(sizes.max()))
        ar = torch.arange(longest)
        rows = offsets[:-1, None] + torch.where(ar[None, :] < sizes[:, None], ar[None, :], 0)
        return rows, sizes


@dataclass
class _Job:
    index: int  # position in the caller's job list
    tasks: tuple[str, ...]
    seed: int
    n: int  # training rows per task after oversampling
    rows: Tensor  # [len(tasks), n] global train-row indices


def _job_rows(dataset: Any, tables: _Tables, tasks: Sequence[str], seed: int, oversample: bool) -> Tensor:
    """The training rows of every member task, exactly as ``MultiTaskDataModule.train_rows`` builds them."""
    from lightning_etap.data.datamodule import oversample_indices

    sizes = [dataset.n_examples(t, "train") for t in tasks]
    if len(tasks) > 1 and oversample:
        g = torch.Generator().manual_seed(int(seed))
        size = max(sizes)
        local = [oversample_indices(dataset.split(t, "train")[1], size, dataset.kind(t) == "binary", g)
                 for t in tasks]
    elif len(tasks) > 1:
        size = min(sizes)
        local = [torch.arange(size) for _ in tasks]
    else:
        local = [torch.arange(sizes[0])]
    offsets = tables.offsets["train"]
    return torch.stack([offsets[tables.index[t]] + idx for t, idx in zip(tasks, local)])


# --------------------------------------------------------------------------- the C kernel
_VL = 8  # floats per vector in the C kernel


def _c_source(hidden: Sequence[int], k: int, n_idx: int, d: int, block: int = 4) -> str:
    """C source of the forward and gradient kernels, specialised to the layer widths.

    ``n_idx > 0``: one-hot first layer; each row lists ``n_idx`` rows of ``W1``
    (``[d + 1, h1]``, the bias stored as row ``d`` and listed last) whose sum is
    the pre-activation. ``n_idx == 0``: a dense ``d``-wide input and a bias.
    Hidden widths must be multiples of 8 (GCC/Clang vector extensions, 8 floats
    a vector, accumulators held in registers).

    One model at a time (its weights and gradient accumulators stay in the
    core's cache), rows in blocks of ``block``. Every model's arithmetic is the
    same whatever else is in the stack, so jobs are bitwise independent of each
    other. Gradients are accumulated row by row in batch order; rows past the
    end of a batch repeat the block's first row with an output gradient of
    exactly 0, so they add exact zeros.
    """
    L = len(hidden)
    H = [d + 1 if n_idx else d, *[int(h) for h in hidden]]  # H[0]: rows of W1
    if L == 0 or any(h % _VL for h in H[1:]):
        raise ValueError(f"the C kernel needs hidden widths that are multiples of {_VL}, got {list(hidden)}")
    V = [0, *[h // _VL for h in H[1:]]]
    RB = int(block)
    out: list[str] = []
    emit = out.append

    def rows_per_group(vectors: int) -> int:
        """Rows whose accumulators fit in the registers together (at most ~12 live vectors)."""
        g = max(1, min(RB, 12 // max(1, vectors)))
        while RB % g:
            g -= 1
        return g

    emit("#include <stdint.h>\n#include <math.h>\n#include <string.h>")
    emit("typedef float vf __attribute__((vector_size(32), aligned(4)));")
    emit("typedef int32_t vi __attribute__((vector_size(32), aligned(4)));")
    emit("#define LD(p) (*(const vf*)(p))")
    emit("#define ST(p, x) (*(vf*)(p) = (x))")
    emit("#define BC(x) ((vf){(x), (x), (x), (x), (x), (x), (x), (x)})")
    emit("#define ZERO ((vf){0})")
    emit("#define RELU(x) ((vf)((vi)(x) & ~((x) < ZERO)))  /* x < 0 ? 0 : x, NaN kept */")
    emit("#define GATE(g, a) ((vf)((vi)(g) & ((a) > ZERO)))  /* a > 0 ? g : 0 */")
    emit(f"#define K {k}\n#define RB {RB}")

    def decl_acts() -> None:
        for ly in range(1, L + 1):
            emit(f"float a{ly}[RB][{H[ly]}] __attribute__((aligned(32)));")
        emit("const int32_t* fr[RB];" if n_idx else "const float* xr[RB];")
        emit("float o[RB][K];")

    def model_ptrs(grad: bool) -> None:
        for ly in range(1, L + 1):
            emit(f"const float* w{ly} = W[{ly - 1}] + m * {H[ly - 1] * H[ly]};")
            if not (ly == 1 and n_idx):
                emit(f"const float* b{ly} = B[{ly - 1}] + m * {H[ly]};")
            if grad:
                emit(f"float* gw{ly} = GW[{ly - 1}] + m * {H[ly - 1] * H[ly]}; "
                     f"memset(gw{ly}, 0, sizeof(float) * {H[ly - 1] * H[ly]});")
                if not (ly == 1 and n_idx):
                    emit(f"float* gb{ly} = GB[{ly - 1}] + m * {H[ly]}; memset(gb{ly}, 0, sizeof(float) * {H[ly]});")
        if grad:
            for ly in range(2, L + 1):
                emit(f"for (int i = 0; i < {H[ly - 1]}; i++) for (int j = 0; j < {H[ly]}; j++) "
                     f"wt{ly}[j * {H[ly - 1]} + i] = w{ly}[i * {H[ly]} + j];")

    def block_rows() -> None:
        width, table = (n_idx, "feat") if n_idx else (d, "X")
        emit("const int nb = nrows - i0 < RB ? (int)(nrows - i0) : RB;")
        emit("int64_t r[RB];")
        emit("for (int rr = 0; rr < RB; rr++) r[rr] = rows[q * row_stride + i0 + (rr < nb ? rr : 0)];")
        emit("if (i0 + RB < nrows) { const int64_t* nx = rows + q * row_stride + i0 + RB;")
        emit(f"  for (int rr = 0; rr < RB && i0 + RB + rr < nrows; rr++) __builtin_prefetch({table} + nx[rr] * {width}); }}")

    def forward_block() -> None:
        v1 = V[1]
        for rr in range(RB):
            if n_idx:
                emit(f"{{ fr[{rr}] = feat + r[{rr}] * {n_idx}; const int32_t* f = fr[{rr}];")
                emit(f"  const float* w = w1 + (int64_t)f[0] * {H[1]};")
                emit("  " + " ".join(f"vf s{v} = LD(w + {v * _VL});" for v in range(v1)))
                emit(f"  for (int c = 1; c < {n_idx}; c++) {{ w = w1 + (int64_t)f[c] * {H[1]}; "
                     + " ".join(f"s{v} += LD(w + {v * _VL});" for v in range(v1)) + " }")
            else:
                emit(f"{{ xr[{rr}] = X + r[{rr}] * {d}; const float* x = xr[{rr}];")
                emit("  " + " ".join(f"vf s{v} = LD(b1 + {v * _VL});" for v in range(v1)))
                emit(f"  for (int f = 0; f < {d}; f++) {{ const vf xf = BC(x[f]); const float* w = w1 + f * {H[1]}; "
                     + " ".join(f"s{v} += xf * LD(w + {v * _VL});" for v in range(v1)) + " }")
            emit("  " + " ".join(f"ST(a1[{rr}] + {v * _VL}, RELU(s{v}));" for v in range(v1)) + " }")
        for ly in range(2, L + 1):
            vo, G = V[ly], rows_per_group(V[ly])
            for g0 in range(0, RB, G):
                rs = range(g0, g0 + G)
                emit("{ " + " ".join(f"vf s{rr}_{v} = LD(b{ly} + {v * _VL});" for rr in rs for v in range(vo)))
                emit(f"  for (int i = 0; i < {H[ly - 1]}; i++) {{ const float* w = w{ly} + i * {H[ly]}; "
                     + " ".join(f"const vf wv{v} = LD(w + {v * _VL});" for v in range(vo)) + " "
                     + " ".join(f"{{ const vf x = BC(a{ly - 1}[{rr}][i]); "
                                + " ".join(f"s{rr}_{v} += x * wv{v};" for v in range(vo)) + " }" for rr in rs) + " }")
                emit("  " + " ".join(f"ST(a{ly}[{rr}] + {v * _VL}, RELU(s{rr}_{v}));" for rr in rs for v in range(vo))
                     + " }")
        emit("for (int rr = 0; rr < RB; rr++) for (int kk = 0; kk < K; kk++) o[rr][kk] = bhq[kk];")
        emit(f"for (int i = 0; i < {H[L]}; i++) {{ const float* w = whq + i * K; "
             f"for (int rr = 0; rr < RB; rr++) {{ const float x = a{L}[rr][i]; "
             "for (int kk = 0; kk < K; kk++) o[rr][kk] += x * w[kk]; } }")

    # ------------------------------------------------------------------ forward
    emit("void forward(int64_t m0, int64_t m1, const int64_t* ptr, const float* const* W, const float* const* B,")
    emit("             const float* Wh, const float* bh, const int64_t* rows, int64_t row_stride, int64_t nrows,")
    emit("             const int32_t* feat, const float* X, float* out) {")
    decl_acts()
    emit("for (int64_t m = m0; m < m1; m++) {")
    model_ptrs(False)
    emit("for (int64_t q = ptr[m]; q < ptr[m + 1]; q++) {")
    emit(f"const float* whq = Wh + q * {H[L]} * K; const float* bhq = bh + q * K;")
    emit("for (int64_t i0 = 0; i0 < nrows; i0 += RB) {")
    block_rows()
    forward_block()
    emit("for (int rr = 0; rr < nb; rr++) for (int kk = 0; kk < K; kk++) out[(q * nrows + i0 + rr) * K + kk] = o[rr][kk];")
    emit("}}}}")

    # ------------------------------------------------------------------ gradients
    emit("void grads(int64_t m0, int64_t m1, const int64_t* ptr, const float* const* W, const float* const* B,")
    emit("           const float* Wh, const float* bh, float* const* GW, float* const* GB, float* gWh, float* gbh,")
    emit("           const int64_t* rows, int64_t row_stride, int64_t nrows, const int32_t* feat, const float* X,")
    emit("           const float* Y, const uint8_t* binary) {")
    decl_acts()
    emit("float d_o[RB][K];")
    for ly in range(1, L + 1):
        emit(f"float da{ly}[RB][{H[ly]}] __attribute__((aligned(32))); float dz{ly}[RB][{H[ly]}] __attribute__((aligned(32)));")
    for ly in range(2, L + 1):
        emit(f"float wt{ly}[{H[ly - 1] * H[ly]}] __attribute__((aligned(32)));")
    emit("const float numel = (float)(nrows * K);")
    emit("const float two_over_n = (float)(2.0 / (double)(nrows * K));")
    emit("for (int64_t m = m0; m < m1; m++) {")
    model_ptrs(True)
    emit("for (int64_t q = ptr[m]; q < ptr[m + 1]; q++) {")
    emit(f"const float* whq = Wh + q * {H[L]} * K; const float* bhq = bh + q * K; const int bin = binary[q];")
    emit(f"float* gwq = gWh + q * {H[L]} * K; float* gbq = gbh + q * K;")
    emit(f"memset(gwq, 0, sizeof(float) * {H[L]} * K); memset(gbq, 0, sizeof(float) * K);")
    emit("for (int64_t i0 = 0; i0 < nrows; i0 += RB) {")
    block_rows()
    forward_block()
    # loss gradient: BCE-with-logits mean -> (sigmoid(o) - y) / numel; MSE mean -> (o - y) * (2 / numel)
    emit("for (int rr = 0; rr < RB; rr++) for (int kk = 0; kk < K; kk++) {")
    emit("  const float y = Y[r[rr] * K + kk];")
    emit("  const float g = bin ? (1.0f / (1.0f + expf(-o[rr][kk])) - y) / numel : (o[rr][kk] - y) * two_over_n;")
    emit("  d_o[rr][kk] = rr < nb ? g : 0.0f; }")
    emit("for (int rr = 0; rr < RB; rr++) for (int kk = 0; kk < K; kk++) gbq[kk] += d_o[rr][kk];")
    emit(f"for (int i = 0; i < {H[L]}; i++) {{ const float* w = whq + i * K; float* g = gwq + i * K;")
    emit(f"  for (int rr = 0; rr < RB; rr++) for (int kk = 0; kk < K; kk++) g[kk] += a{L}[rr][i] * d_o[rr][kk];")
    emit(f"  for (int rr = 0; rr < RB; rr++) {{ float s = 0.0f; for (int kk = 0; kk < K; kk++) s += w[kk] * d_o[rr][kk];"
         f" da{L}[rr][i] = s; }} }}")
    for ly in range(L, 0, -1):
        vo = V[ly]
        # dz = relu'(a) * da, kept in memory (broadcast later) and reused from registers below
        for rr in range(RB):
            emit(" ".join(f"ST(dz{ly}[{rr}] + {v * _VL}, GATE(LD(da{ly}[{rr}] + {v * _VL}), LD(a{ly}[{rr}] + {v * _VL})));"
                          for v in range(vo)))
        if ly == 1 and n_idx:
            # scatter-add into the rows of W1's gradient; the bias row (every row's last index) is
            # accumulated in registers over the block (same order of additions, no store-load chain)
            bias = f"gw1 + {d * H[1]}"
            emit("{ " + " ".join(f"vf bias{v} = LD({bias} + {v * _VL});" for v in range(vo)))
            emit("  for (int rr = 0; rr < RB; rr++) { "
                 + " ".join(f"const vf z{v} = LD(dz1[rr] + {v * _VL}); bias{v} += z{v};" for v in range(vo))
                 + f" for (int c = 0; c < {n_idx - 1}; c++) {{ float* g = gw1 + (int64_t)fr[rr][c] * {H[1]}; "
                 + " ".join(f"ST(g + {v * _VL}, LD(g + {v * _VL}) + z{v});" for v in range(vo)) + " } }")
            emit("  " + " ".join(f"ST({bias} + {v * _VL}, bias{v});" for v in range(vo)) + " }")
            continue
        emit("for (int rr = 0; rr < RB; rr++) { "
             + " ".join(f"ST(gb{ly} + {v * _VL}, LD(gb{ly} + {v * _VL}) + LD(dz{ly}[rr] + {v * _VL}));" for v in range(vo))
             + " }")
        G = rows_per_group(vo)
        n_in = H[ly - 1]
        prev = (lambda rr: f"xr[{rr}][i]") if ly == 1 else (lambda rr, _l=ly: f"a{_l - 1}[{rr}][i]")
        for g0 in range(0, RB, G):
            rs = range(g0, g0 + G)
            emit("{ " + " ".join(f"const vf z{rr}_{v} = LD(dz{ly}[{rr}] + {v * _VL});" for rr in rs for v in range(vo)))
            emit(f"  for (int i = 0; i < {n_in}; i++) {{ float* g = gw{ly} + i * {H[ly]}; "
                 + " ".join(f"vf g{v} = LD(g + {v * _VL});" for v in range(vo)) + " "
                 + " ".join(f"{{ const vf x = BC({prev(rr)}); " + " ".join(f"g{v} += x * z{rr}_{v};" for v in range(vo))
                            + " }" for rr in rs) + " "
                 + " ".join(f"ST(g + {v * _VL}, g{v});" for v in range(vo)) + " } }")
        if ly > 1:
            vi_, Gi = V[ly - 1], rows_per_group(V[ly - 1])
            for g0 in range(0, RB, Gi):
                rs = range(g0, g0 + Gi)
                emit("{ " + " ".join(f"vf s{rr}_{v} = ZERO;" for rr in rs for v in range(vi_)))
                emit(f"  for (int j = 0; j < {H[ly]}; j++) {{ const float* w = wt{ly} + j * {n_in}; "
                     + " ".join(f"const vf wv{v} = LD(w + {v * _VL});" for v in range(vi_)) + " "
                     + " ".join(f"{{ const vf x = BC(dz{ly}[{rr}][j]); " + " ".join(f"s{rr}_{v} += x * wv{v};" for v in range(vi_))
                                + " }" for rr in rs) + " }")
                emit("  " + " ".join(f"ST(da{ly - 1}[{rr}] + {v * _VL}, s{rr}_{v});" for rr in rs for v in range(vi_)) + " }")
    emit("}}}}")
    return "\n".join(out) + "\n"


_KERNELS: dict[str, Any] = {}


def _kernel_dir() -> Path:
    env = os.environ.get("LIGHTNING_ETAP_KERNELS", "")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "lightning-etap" / "kernels"


def _machine_key() -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("model name", "flags")):
                    cpu += line
    except OSError:
        pass
    return f"{platform.system()}-{platform.machine()}-{cpu}"


def _load_kernel(source: str) -> Any:
    """Compile ``source`` into a shared library once (cached on disk by content) and load it with ctypes.

    The compiler is ``$CC`` or ``cc``; flags ``-O3 -march=native -fPIC -shared``
    (no fast-math: IEEE semantics are kept, so only summation order and FMA
    contraction differ from PyTorch's arithmetic).

    Raises:
        RuntimeError: no compiler, or compilation failed.
    """
    compiler = os.environ.get("CC", "cc")
    flags = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c99"]
    key = hashlib.sha256("\0".join([source, compiler, *flags, _machine_key()]).encode()).hexdigest()[:24]
    if key in _KERNELS:
        return _KERNELS[key]
    folder = _kernel_dir()
    lib_path = folder / f"etap_batched_{key}.so"
    if not lib_path.exists():
        if shutil.which(compiler) is None:
            raise RuntimeError(f"no C compiler {compiler!r} on PATH (set $CC, or use backend='torch')")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src = Path(tmp) / "kernel.c"
            src.write_text(source, encoding="utf-8")
            out = Path(tmp) / "kernel.so"
            proc = subprocess.run([compiler, *flags, "-o", str(out), str(src), "-lm"],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"compiling the batched-training kernel failed:\n{proc.stderr[-2000:]}")
            os.replace(out, lib_path)  # atomic: concurrent builders race harmlessly
    lib = ctypes.CDLL(str(lib_path))
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.forward.argtypes = [i64, i64, vp, vp, vp, vp, vp, vp, i64, i64, vp, vp, vp]
    lib.forward.restype = None
    lib.grads.argtypes = [i64, i64, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, i64, i64, vp, vp, vp, vp]
    lib.grads.restype = None
    _KERNELS[key] = lib
    return lib


# --------------------------------------------------------------------------- initialisation
@contextlib.contextmanager
def _seeded_cpu_rng(seed: int):
    """torch's CPU generator seeded with ``seed`` inside, restored after.

    ``lightning.seed_everything(seed)`` calls ``torch.manual_seed(seed)``, which
    for a CPU model means this generator state; the other devices' generators
    are neither touched nor needed.
    """
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(int(seed))
    try:
        yield
    finally:
        torch.set_rng_state(state)


def _linear_layers(model: torch.nn.Module) -> list[tuple[Tensor, Tensor]]:
    """``(weight [in, out], bias [out])`` of a reference model's encoder layers, then its heads."""
    layers = [m for m in model.encoder if isinstance(m, torch.nn.Linear)] + list(model.heads)
    return [(lin.weight.detach().t(), lin.bias.detach()) for lin in layers]


def _reference_init(dataset: Any, tasks: Sequence[str], config: Any, seed: int) -> list[tuple[Tensor, Tensor]]:
    """The initial parameters ``train_group`` starts from: the reference model built under the seed."""
    from lightning_etap.training import build_model

    with _seeded_cpu_rng(seed):
        return _linear_layers(build_model(dataset, list(tasks), config))


def _fast_init(dataset: Any, tasks: Sequence[str], config: Any, seed: int) -> list[tuple[Tensor, Tensor]]:
    """The same parameters as :func:`_reference_init`, without building the LightningModule.

    ``MultiTaskMLP.__init__`` draws from torch's generator only in its
    ``nn.Linear`` layers (encoder, then one head per task) and, with
    ``init="glorot"``, in re-drawing their weights in the same order; doing the
    same draws the same numbers. :meth:`BatchedMLPTrainer.train` checks this
    against :func:`_reference_init` and falls back to it on a mismatch.
    """
    init = getattr(config, "init", "torch")
    if init not in ("torch", "glorot"):
        raise ValueError(f"no fast initialisation for init={init!r}")
    with _seeded_cpu_rng(seed):
        layers, width = [], int(dataset.feature_dim)
        for h in config.hidden:
            layers.append(torch.nn.Linear(width, int(h)))
            width = int(h)
        layers += [torch.nn.Linear(width, dataset.target_dim(t)) for t in tasks]
        if init == "glorot":
            with torch.no_grad():
                for lin in layers:
                    torch.nn.init.xavier_uniform_(lin.weight)
                    torch.nn.init.zeros_(lin.bias)
        return [(lin.weight.detach().t(), lin.bias.detach()) for lin in layers]


# --------------------------------------------------------------------------- the stack
class _Stack:
    """Parameters, optimiser state and early-stopping state of models trained together.

    Models ``0..M-1``; pairs ``0..P-1`` (one per model and member task, model-major);
    ``ptr[m]:ptr[m+1]`` are model ``m``'s pairs. Parameters (all stacked):
    ``enc[l] = (W [M, in, out], b [M, 1, out])`` (one-hot: ``W1 [M, d + 1, h1]``
    with the bias as row ``d`` and no separate bias), ``head = (W [P, h, k], b [P, 1, k])``.
    """

    def __init__(self, jobs: list[_Job], tables: _Tables, config: Any, dataset: Any, init: Any) -> None:
        self.jobs = jobs
        self.n = jobs[0].n
        counts = torch.tensor([len(j.tasks) for j in jobs])
        self.ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        self.pm = torch.repeat_interleave(torch.arange(len(jobs)), counts)
        self.task = torch.tensor([tables.index[t] for j in jobs for t in j.tasks])
        self.rows = torch.cat([j.rows for j in jobs])  # [P, n]
        seeds = sorted({j.seed for j in jobs})
        self.seeds = seeds
        self.seed_of_pair = torch.tensor([seeds.index(j.seed) for j in jobs])[self.pm]
        one_hot = tables.ones is not None and len(config.hidden) > 0
        self.one_hot = one_hot

        # initial parameters: those of the reference model built under each job's seed
        n_enc = len(config.hidden)
        enc_w: list[list[Tensor]] = [[] for _ in config.hidden]
        enc_b: list[list[Tensor]] = [[] for _ in config.hidden]
        head_w: list[Tensor] = []
        head_b: list[Tensor] = []
        for j in jobs:
            layers = init(dataset, j.tasks, config, j.seed)
            for layer, (w, b) in enumerate(layers[:n_enc]):
                if layer == 0 and one_hot:
                    enc_w[0].append(torch.cat([w, b[None, :]]))
                else:
                    enc_w[layer].append(w)
                    enc_b[layer].append(b[None, :])
            for w, b in layers[n_enc:]:
                head_w.append(w)
                head_b.append(b[None, :])
        params: list[Tensor] = []
        self.enc: list[tuple[int, int | None]] = []  # (index of W, index of b or None) in params
        for layer in range(len(config.hidden)):
            params.append(torch.stack(enc_w[layer]).contiguous())
            if enc_b[layer]:
                params.append(torch.stack(enc_b[layer]).contiguous())
                self.enc.append((len(params) - 2, len(params) - 1))
            else:
                self.enc.append((len(params) - 1, None))
        params.append(torch.stack(head_w).contiguous())
        params.append(torch.stack(head_b).contiguous())
        self.head = (len(params) - 2, len(params) - 1)
        self.params = params
        self.per_pair = [False] * (len(params) - 2) + [True, True]
        self.bufs: list[Tensor] | None = None
        self.best = [p.clone() for p in params]
        M = len(jobs)
        self.best_val = torch.full((M,), math.inf, dtype=torch.float32)
        self.best_epoch = torch.full((M,), -1, dtype=torch.long)
        self.wait = torch.zeros(M, dtype=torch.long)
        self.stopped = torch.zeros(M, dtype=torch.bool)
        self.epochs = torch.zeros(M, dtype=torch.long)
        self.reason = [""] * M
        self.binary_u8: Tensor | None = None

    @property
    def n_models(self) -> int:
        return len(self.jobs)

    @property
    def n_pairs(self) -> int:
        return int(self.ptr[-1])

    def select(self, keep: Tensor) -> _Stack:
        """A stack holding only models ``keep`` (sorted indices); tensors are copied."""
        new = object.__new__(_Stack)
        keep = keep.sort().values
        pair_keep = torch.cat([torch.arange(int(self.ptr[m]), int(self.ptr[m + 1])) for m in keep.tolist()])
        counts = (self.ptr[1:] - self.ptr[:-1])[keep]
        new.jobs = [self.jobs[m] for m in keep.tolist()]
        new.n = self.n
        new.ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        new.pm = torch.repeat_interleave(torch.arange(len(keep)), counts)
        new.task = self.task[pair_keep]
        new.rows = self.rows[pair_keep]
        new.seeds = self.seeds
        new.seed_of_pair = self.seed_of_pair[pair_keep]
        new.one_hot = self.one_hot
        new.enc, new.head, new.per_pair = self.enc, self.head, self.per_pair

        def take(ts: list[Tensor]) -> list[Tensor]:
            return [t[pair_keep if pp else keep].contiguous() for t, pp in zip(ts, self.per_pair)]

        new.params = take(self.params)
        new.bufs = None if self.bufs is None else take(self.bufs)
        new.best = take(self.best)
        new.best_val = self.best_val[keep]
        new.best_epoch = self.best_epoch[keep]
        new.wait = self.wait[keep]
        new.stopped = self.stopped[keep]
        new.epochs = self.epochs[keep]
        new.reason = [self.reason[m] for m in keep.tolist()]
        new.binary_u8 = None
        return new

    def chunks(self, rows_per_chunk: int, batch: int) -> list[tuple[int, int]]:
        """Model ranges ``[m0, m1)`` of about ``rows_per_chunk`` rows per step each."""
        out, start = [], 0
        per_model = (self.ptr[1:] - self.ptr[:-1]).tolist()
        acc = 0
        for m, c in enumerate(per_model):
            acc += c * batch
            if acc >= rows_per_chunk:
                out.append((start, m + 1))
                start, acc = m + 1, 0
        if start < len(per_model):
            out.append((start, len(per_model)))
        return out


# --------------------------------------------------------------------------- the trainer
class BatchedMLPTrainer:
    """A :class:`~lightning_etap.groundtruth.base.GroupTrainer` that trains many group models at once.

    Same seed, same training as :func:`~lightning_etap.training.train_group`
    (initialisation, oversampling, batch order, SGD with momentum, lr
    schedule, early stopping, best weights, test losses), up to floating-point
    summation order; see the module docstring.

    Args:
        dataset: a dataset name (``"chemical"``), a
            :class:`~lightning_etap.groundtruth.DatasetSpec`, or a loaded
            :class:`~lightning_etap.data.MultiTaskDataset` (per-task layout).
        config: a preset name or a :class:`~lightning_etap.training.TrainConfig`.
            Supported: SGD (momentum, Nesterov, weight decay), no dropout,
            any ``hidden`` widths (multiples of 8 for the C backend), the step
            lr schedule, ``"torch"`` or ``"glorot"`` init, oversampling on or off.
        root: data directory (with a dataset name).
        dataset_options: loader options (with a dataset name).
        max_models: models per stack (jobs with equal epoch length are
            trained together in stacks of at most this many).
        chunk_rows: rows per forward/backward chunk within a step (cache size).
        one_hot: ``"auto"`` (detect 0/1 inputs with a constant number of ones
            per row and use gathers instead of the dense first layer),
            ``True`` (require it) or ``False`` (dense).
        threads: torch intra-op threads while training (``None``: unchanged).
        compact_every: remove stopped models from a stack once this many (or
            an eighth of the stack) have stopped; until then they are computed
            but their results are already final.
        backend: ``"c"``: a small C kernel (compiled on first use with ``$CC``
            or ``cc`` and cached under ``$LIGHTNING_ETAP_KERNELS`` or
            ``~/.cache/lightning-etap/kernels``) does each step's forward and
            backward, one model at a time (needs hidden widths that are
            multiples of 8); ``"torch"``: stacked PyTorch ops
            (``bmm``, ``embedding_bag``, ``index_add_``), no compiler needed;
            ``"auto"``: C if it compiles, else torch with a warning. Both give
            the same numbers up to summation order.
        log_every: log progress every this many epochs (``logging.INFO``; 0: never).
        progress: show a progress bar on stderr (epochs of every stack: done / total,
            rate, ETA); a stack whose models all stop early skips its remaining epochs.

    Raises:
        NotImplementedError: a shared-input dataset, dropout, or an optimiser
            other than SGD.

    Example:
        >>> from lightning_etap.training import TrainConfig
        >>> trainer = BatchedMLPTrainer("chemical", TrainConfig(max_epochs=2))  # doctest: +SKIP
        >>> outcomes = trainer.train([(("83", "78"), 0), (("55",), 0)])  # doctest: +SKIP
    """

    def __init__(
        self,
        dataset: Any,
        config: Any = "chemical",
        *,
        root: str | None = None,
        dataset_options: dict[str, Any] | None = None,
        max_models: int = 1024,
        chunk_rows: int = 16384,
        one_hot: bool | str = "auto",
        threads: int | None = 1,
        compact_every: int = 8,
        backend: str = "auto",
        log_every: int = 0,
        progress: bool = False,
    ) -> None:
        from lightning_etap.data.base import MultiTaskDataset
        from lightning_etap.groundtruth.trainers import DatasetSpec
        from lightning_etap.training import get_preset

        self._dataset: MultiTaskDataset | None = None
        if isinstance(dataset, MultiTaskDataset):
            if root is not None or dataset_options:
                raise ValueError("root and dataset_options apply to a dataset name, not a loaded dataset")
            self.spec = None
            self._dataset = dataset
        elif isinstance(dataset, DatasetSpec):
            if root is not None or dataset_options:
                raise ValueError("give root and dataset_options inside the DatasetSpec, not beside it")
            self.spec = dataset
        else:
            self.spec = DatasetSpec(str(dataset), None if root is None else str(root), dict(dataset_options or {}))
        self.config = get_preset(config)
        cfg = self.config
        if cfg.optimizer != "sgd":
            raise NotImplementedError(f"BatchedMLPTrainer implements SGD only, got optimizer={cfg.optimizer!r}")
        if getattr(cfg, "gradient_surgery", None) is not None:
            raise NotImplementedError("BatchedMLPTrainer does not implement gradient surgery (PCGrad); use "
                                      "LightningGroupTrainer / train_group for it")
        if cfg.dropout > 0:
            raise NotImplementedError("BatchedMLPTrainer does not implement dropout (its random masks "
                                      "cannot be reproduced batch for batch)")
        if one_hot not in ("auto", True, False):
            raise ValueError(f"one_hot must be 'auto', True or False, got {one_hot!r}")
        if backend not in ("auto", "c", "torch"):
            raise ValueError(f"backend must be 'auto', 'c' or 'torch', got {backend!r}")
        if max_models < 1 or chunk_rows < 1 or compact_every < 1:
            raise ValueError("max_models, chunk_rows and compact_every must be >= 1")
        self.max_models = int(max_models)
        self.chunk_rows = int(chunk_rows)
        self.one_hot = one_hot
        self.threads = threads
        self.compact_every = int(compact_every)
        self.backend = backend
        self.log_every = int(log_every)
        self.progress = bool(progress)
        self._bar: Any = None
        self._tables: _Tables | None = None
        self._kernel: Any = None
        self._init: Any = None

    # ----------------------------------------------------------------- facts
    @property
    def dataset(self):
        """The dataset (loaded on first use, once per process)."""
        if self._dataset is None:
            self._dataset = self.spec.load()
        return self._dataset

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.dataset.task_names)

    @property
    def tables(self) -> _Tables:
        if self._tables is None:
            self._tables = _Tables(self.dataset, self.one_hot)
        return self._tables

    def fingerprint(self) -> dict[str, Any]:
        """Dataset identity (name, loader options, task names, metadata), the recipe and ``"trainer": "batched-mlp"``.

        Deliberately different from :class:`~lightning_etap.groundtruth.LightningGroupTrainer`'s:
        the numbers agree with it only up to floating-point summation order.
        """
        from lightning_etap.groundtruth.store import normalize_json
        from lightning_etap.groundtruth.trainers import _library_version

        ds = self.dataset
        return normalize_json({
            "trainer": "batched-mlp",
            "library_version": _library_version(),
            "dataset": {
                "name": ds.name,
                "options": self.spec.options if self.spec is not None else None,
                "task_names": list(ds.task_names),
                "metadata": ds.metadata,
            },
            "train_config": self.config.to_dict(),
        })

    def __repr__(self) -> str:
        what = self.spec if self.spec is not None else f"<dataset {self.dataset.name!r}>"
        return f"BatchedMLPTrainer({what!r}, {self.config!r}, max_models={self.max_models})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tables"] = None
        state["_kernel"] = None
        if self.spec is not None:
            state["_dataset"] = None  # workers reload by name
        return state

    # ----------------------------------------------------------------- training
    def plan(self, jobs: Sequence[tuple[Sequence[str], int]]) -> list[list[int]]:
        """How ``jobs`` would be stacked: lists of job positions (equal epoch length, at most ``max_models``)."""
        ds = self.dataset
        by_n: dict[int, list[int]] = {}
        for i, (group, _seed) in enumerate(jobs):
            tasks = ds.check_tasks(group)
            sizes = [ds.n_examples(t, "train") for t in tasks]
            n = max(sizes) if (len(tasks) == 1 or self.config.oversample) else min(sizes)
            by_n.setdefault(n, []).append(i)
        return [idx[i:i + self.max_models] for n in sorted(by_n, reverse=True)
                for idx in [by_n[n]] for i in range(0, len(idx), self.max_models)]

    def resolved_backend(self) -> str:
        """``"c"`` or ``"torch"``: what :meth:`train` uses (compiles the kernel if needed)."""
        if self.backend == "torch":
            return "torch"
        if self._kernel is None:
            t = self.tables
            try:
                source = _c_source(self.config.hidden, t.k, (t.ones + 1) if t.ones else 0, t.d)
                self._kernel = _load_kernel(source)
            except (RuntimeError, OSError, ValueError) as err:
                if self.backend == "c":
                    raise
                warnings.warn(f"BatchedMLPTrainer: C kernel unavailable ({err}); using the slower torch backend",
                              RuntimeWarning, stacklevel=2)
                self.backend = "torch"
                return "torch"
        return "c"

    def _init_function(self, job: tuple[tuple[str, ...], int]):
        """:func:`_fast_init` if it reproduces the reference model's parameters for ``job``, else :func:`_reference_init`."""
        if self._init is None:
            ref = _reference_init(self.dataset, job[0], self.config, job[1])
            try:
                fast = _fast_init(self.dataset, job[0], self.config, job[1])
            except ValueError:
                fast = []
            same = len(fast) == len(ref) and all(
                torch.equal(a, c) and torch.equal(b, e) for (a, b), (c, e) in zip(fast, ref))
            if not same:
                log.warning("BatchedMLPTrainer: the fast initialisation does not reproduce build_model's "
                            "parameters; building every reference model instead (slower)")
            self._init = _fast_init if same else _reference_init
        return self._init

    def train(self, jobs: Sequence[tuple[Sequence[str], int]]) -> list[GroupOutcome]:
        """Train every ``(group, seed)`` job; outcomes in the order of ``jobs``."""
        jobs = [(tuple(str(t) for t in g), int(s)) for g, s in jobs]
        if not jobs:
            return []
        ds, tables, cfg = self.dataset, self.tables, self.config
        self.resolved_backend()
        previous = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(int(self.threads))
        out: list[GroupOutcome | None] = [None] * len(jobs)
        if self.progress:
            import sys

            from tqdm.auto import tqdm

            self._bar = tqdm(total=len(jobs) * int(cfg.max_epochs), unit="model-epoch", unit_scale=True,
                             desc=f"training {len(jobs)} models at once", file=sys.stderr, dynamic_ncols=True)
        try:
            for stack_idx in self.plan(jobs):
                start = time.perf_counter()
                prepared = [
                    _Job(i, jobs[i][0], jobs[i][1], 0, _job_rows(ds, tables, jobs[i][0], jobs[i][1], cfg.oversample))
                    for i in stack_idx
                ]
                for j in prepared:
                    j.n = int(j.rows.shape[1])
                results = self._train_stack(_Stack(prepared, tables, cfg, ds, self._init_function(jobs[0])))
                seconds = (time.perf_counter() - start) / len(prepared)
                for job_index, outcome in results.items():
                    out[job_index] = GroupOutcome(
                        group=outcome["group"], seed=outcome["seed"], test_losses=outcome["test_losses"],
                        epochs=outcome["epochs"], best_epoch=outcome["best_epoch"], seconds=seconds,
                        extra={"val_loss": outcome["val_loss"], "stop_reason": outcome["reason"],
                               "trainer": "batched-mlp", "stack_size": len(prepared)},
                    )
        finally:
            torch.set_num_threads(previous)
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        return out  # type: ignore[return-value]

    # ----------------------------------------------------------------- one stack
    def _train_stack(self, st: _Stack) -> dict[int, dict[str, Any]]:
        from lightning_etap.data.datamodule import epoch_permutation
        from lightning_etap.models.mtl_mlp import _lr_factor

        cfg = self.config
        B, n = int(cfg.batch_size), st.n
        steps = math.ceil(n / B)
        results: dict[int, dict[str, Any]] = {}
        dead = 0
        for epoch in range(int(cfg.max_epochs)):
            lr = cfg.lr * _lr_factor(epoch, cfg.lr_decay_start, cfg.lr_decay_every, cfg.lr_decay_factor)
            perms = torch.stack([epoch_permutation(n, s, epoch) for s in st.seeds])
            if len(st.seeds) == 1:
                epoch_rows = st.rows[:, perms[0]]
            else:
                epoch_rows = st.rows.gather(1, perms[st.seed_of_pair])
            grads = [torch.empty_like(p) for p in st.params]
            chunks = st.chunks(self.chunk_rows, B)
            for s in range(steps):
                if self._kernel is not None:
                    self._c_grads(st, epoch_rows, s * B, min(B, n - s * B), grads)
                else:
                    rows = epoch_rows[:, s * B:(s + 1) * B]
                    for m0, m1 in chunks:
                        self._chunk_grads(st, m0, m1, rows, grads)
                self._sgd(st, grads, lr)
            val = self._evaluate(st, st.params, "val")  # [M] summed val loss (float32)
            running = int((~st.stopped).sum())
            st.epochs += (~st.stopped).long()
            newly = self._early_stopping(st, val, epoch)
            if self._bar is not None:  # this epoch of the running models, and what the stopped ones skip
                self._bar.update(running + int(newly.sum()) * (int(cfg.max_epochs) - epoch - 1))
            dead += int(newly.sum())
            if self.log_every and (epoch + 1) % self.log_every == 0:
                log.info("stack n=%d epoch %d: %d/%d models running", n, epoch + 1,
                         int((~st.stopped).sum()), st.n_models)
            if bool(st.stopped.all()):
                break
            if dead >= self.compact_every or 8 * dead >= st.n_models:
                finished = torch.nonzero(st.stopped).flatten()
                results.update(self._finish(st.select(finished)))
                st = st.select(torch.nonzero(~st.stopped).flatten())
                dead = 0
        for m in torch.nonzero(~st.stopped).flatten().tolist():
            st.reason[m] = "max_epochs"
        results.update(self._finish(st))
        return results

    def _early_stopping(self, st: _Stack, val: Tensor, epoch: int) -> Tensor:
        """Lightning's ``EarlyStopping`` (+ ``RestoreBestWeights``) per model; returns the models that stop now."""
        running = ~st.stopped
        finite = torch.isfinite(val)
        improved = running & finite & (val < st.best_val)
        not_improved = running & finite & ~improved
        st.wait = torch.where(improved, 0, st.wait + not_improved.long())
        st.best_val = torch.where(improved, val, st.best_val)
        st.best_epoch = torch.where(improved, epoch, st.best_epoch)
        stop = running & (~finite | (not_improved & (st.wait >= int(self.config.patience))))
        # keep the best weights; a model stopping without ever improving keeps its weights at the stop
        # (RestoreBestWeights restores nothing then), not those of later epochs before compaction
        keep = improved | (stop & (st.best_epoch < 0))
        if bool(keep.any()):
            models = torch.nonzero(keep).flatten()
            pairs = torch.nonzero(keep[st.pm]).flatten()
            for best, p, pp in zip(st.best, st.params, st.per_pair):
                idx = pairs if pp else models
                best.index_copy_(0, idx, p.index_select(0, idx))
        for m in torch.nonzero(stop).flatten().tolist():
            st.reason[m] = "non_finite" if not bool(finite[m]) else "patience"
        st.stopped |= stop
        return stop

    def _finish(self, st: _Stack) -> dict[int, dict[str, Any]]:
        """Test losses of a stack's models with their kept weights (best epoch's, else the last ones)."""
        never = (st.best_epoch < 0) & ~st.stopped  # ran to the cap without a finite improvement
        weights = []
        for best, p, pp in zip(st.best, st.params, st.per_pair):
            mask = never[st.pm] if pp else never
            shape = (-1,) + (1,) * (p.ndim - 1)
            weights.append(torch.where(mask.view(shape), p, best))
        per_pair = self._evaluate(st, weights, "test", per_pair=True)
        out = {}
        for m, job in enumerate(st.jobs):
            values = per_pair[int(st.ptr[m]):int(st.ptr[m + 1])].tolist()
            out[job.index] = {
                "group": job.tasks, "seed": job.seed,
                "test_losses": {t: float(v) for t, v in zip(job.tasks, values)},
                "epochs": int(st.epochs[m]), "best_epoch": int(st.best_epoch[m]),
                "val_loss": float(st.best_val[m]), "reason": st.reason[m],
            }
        return out

    # ----------------------------------------------------------------- numerics
    def _sgd(self, st: _Stack, grads: list[Tensor], lr: float) -> None:
        """``torch.optim.SGD.step`` (single-tensor path) applied to the stacked tensors."""
        cfg = self.config
        first = st.bufs is None
        if first and cfg.momentum != 0:
            st.bufs = [None] * len(grads)  # type: ignore[list-item]
        for i, (p, g) in enumerate(zip(st.params, grads)):
            if cfg.weight_decay != 0:
                g = g.add(p, alpha=cfg.weight_decay)
            if cfg.momentum != 0:
                if first:
                    buf = g.detach().clone()
                    st.bufs[i] = buf  # type: ignore[index]
                else:
                    buf = st.bufs[i].mul_(cfg.momentum).add_(g)  # type: ignore[index]
                g = g.add(buf, alpha=cfg.momentum) if cfg.nesterov else buf
            p.add_(g, alpha=-lr)

    # ------------------------------------------------------------- C backend
    def _model_ranges(self, st: _Stack) -> list[tuple[int, int]]:
        """Model ranges balanced by pairs, one per thread."""
        parts = max(1, min(int(self.threads or 1), st.n_models))
        if parts == 1:
            return [(0, st.n_models)]
        bounds = torch.searchsorted(st.ptr, torch.linspace(0, st.n_pairs, parts + 1)[1:-1].round().long())
        edges = [0, *sorted(set(int(b) for b in bounds.tolist())), st.n_models]
        return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]

    def _run_parallel(self, fn, ranges: list[tuple[int, int]]) -> None:
        if len(ranges) == 1:
            fn(*ranges[0])
            return
        with ThreadPoolExecutor(len(ranges)) as pool:  # ctypes releases the GIL during the call
            for f in [pool.submit(fn, a, b) for a, b in ranges]:
                f.result()

    def _c_pointers(self, st: _Stack, params: list[Tensor]):
        vp = ctypes.c_void_p
        W = (vp * len(st.enc))(*[params[wi].data_ptr() for wi, _ in st.enc])
        B = (vp * len(st.enc))(*[0 if bi is None else params[bi].data_ptr() for _, bi in st.enc])
        return W, B

    def _c_grads(self, st: _Stack, epoch_rows: Tensor, first: int, b: int, grads: list[Tensor]) -> None:
        tables, lib = self.tables, self._kernel
        W, B = self._c_pointers(st, st.params)
        GW, GB = self._c_pointers(st, grads)
        hw, hb = st.head
        binary = st.binary_u8
        if binary is None:
            binary = st.binary_u8 = tables.binary_u8[st.task].contiguous()
        feat = tables.feat32["train"] if st.one_hot else None
        x = None if st.one_hot else tables.x["train"]
        y = tables.y["train"]
        base = epoch_rows.data_ptr() + first * epoch_rows.element_size()
        stride = epoch_rows.stride(0)

        def run(m0: int, m1: int) -> None:
            lib.grads(m0, m1, st.ptr.data_ptr(), W, B, st.params[hw].data_ptr(), st.params[hb].data_ptr(),
                      GW, GB, grads[hw].data_ptr(), grads[hb].data_ptr(), base, stride, b,
                      None if feat is None else feat.data_ptr(), None if x is None else x.data_ptr(),
                      y.data_ptr(), binary.data_ptr())

        self._run_parallel(run, self._model_ranges(st))

    def _c_forward(self, st: _Stack, params: list[Tensor], split: str, rows: Tensor) -> Tensor:
        """Head outputs ``[P, L, k]`` for per-pair rows ``[P, L]`` (contiguous)."""
        tables, lib = self.tables, self._kernel
        W, B = self._c_pointers(st, params)
        hw, hb = st.head
        out = torch.empty(rows.shape[0], rows.shape[1], tables.k)
        feat = tables.feat32[split] if st.one_hot else None
        x = None if st.one_hot else tables.x[split]

        def run(m0: int, m1: int) -> None:
            lib.forward(m0, m1, st.ptr.data_ptr(), W, B, params[hw].data_ptr(), params[hb].data_ptr(),
                        rows.data_ptr(), rows.stride(0), rows.shape[1],
                        None if feat is None else feat.data_ptr(), None if x is None else x.data_ptr(),
                        out.data_ptr())

        self._run_parallel(run, self._model_ranges(st))
        return out

    # ----------------------------------------------------------- torch backend
    def _features(self, st: _Stack, split: str, rows: Tensor, p0: int, p1: int, m0: int):
        """Layer-1 input of pairs ``p0:p1`` for global rows ``rows`` ``[P, b]``: indices or dense rows."""
        tables = self.tables
        if st.one_hot:
            idx = tables.feat[split][rows]  # [P, b, c + 1]
            offset = (st.pm[p0:p1] - m0) * (tables.d + 1)
            return idx.add_(offset.view(-1, 1, 1))
        return tables.x[split][rows]

    def _forward(self, st: _Stack, params: list[Tensor], m0: int, m1: int, inputs: Tensor):
        """Activations (after ReLU) of every encoder layer and the head outputs, for models ``m0:m1``."""
        p0, p1 = int(st.ptr[m0]), int(st.ptr[m1])
        pm = st.pm[p0:p1] - m0
        P, b = inputs.shape[0], inputs.shape[1]
        acts: list[Tensor] = []
        gathered: list[Tensor] = []
        a = inputs
        for layer, (wi, bi) in enumerate(st.enc):
            W = params[wi][m0:m1]
            if layer == 0 and st.one_hot:
                z = F.embedding_bag(inputs.view(P * b, -1), W.reshape(-1, W.shape[-1]), mode="sum")
                a = torch.relu_(z).view(P, b, -1)
                gathered.append(W)
            else:
                Wp = W.index_select(0, pm)
                bp = params[bi][m0:m1].index_select(0, pm)
                a = torch.baddbmm(bp, a, Wp).relu_()
                gathered.append(Wp)
            acts.append(a)
        hw, hb = st.head
        out = torch.baddbmm(params[hb][p0:p1], a, params[hw][p0:p1])
        return acts, gathered, out

    def _chunk_grads(self, st: _Stack, m0: int, m1: int, rows_all: Tensor, grads: list[Tensor]) -> None:
        """Gradients of models ``m0:m1`` for one training step, written into ``grads``."""
        tables = self.tables
        p0, p1 = int(st.ptr[m0]), int(st.ptr[m1])
        pm = st.pm[p0:p1] - m0
        rows = rows_all[p0:p1]
        P, b = rows.shape
        inputs = self._features(st, "train", rows, p0, p1, m0)
        acts, gathered, out = self._forward(st, st.params, m0, m1, inputs)
        y = tables.y["train"][rows]  # [P, b, k]
        numel = b * tables.k
        binary = tables.binary[st.task[p0:p1]]
        if bool(binary.all()):
            d_out = (torch.sigmoid(out) - y).div_(numel)
        elif not bool(binary.any()):
            d_out = (out - y).mul_(2.0 / numel)
        else:
            d_out = torch.where(binary.view(-1, 1, 1), (torch.sigmoid(out) - y).div_(numel),
                                (out - y).mul_(2.0 / numel))
        hw, hb = st.head
        a = acts[-1]
        torch.bmm(a.transpose(1, 2), d_out, out=grads[hw][p0:p1])
        torch.sum(d_out, 1, keepdim=True, out=grads[hb][p0:p1])
        W_head = st.params[hw][p0:p1]
        if tables.k == 1:
            da = d_out * W_head.transpose(1, 2)
        else:
            da = torch.bmm(d_out, W_head.transpose(1, 2))
        for layer in range(len(st.enc) - 1, -1, -1):
            wi, bi = st.enc[layer]
            dz = _threshold_backward(da, acts[layer], 0)
            if layer == 0 and st.one_hot:
                g = grads[wi][m0:m1].view(-1, dz.shape[-1])
                g.zero_()
                dz2 = dz.reshape(P * b, -1)
                idx = inputs.view(P * b, -1)
                cols = idx.t().contiguous()
                for c in range(cols.shape[0]):
                    g.index_add_(0, cols[c], dz2)
                break
            prev = acts[layer - 1] if layer > 0 else inputs
            gw = grads[wi][m0:m1]
            gb = grads[bi][m0:m1]
            gw.zero_()
            gb.zero_()
            gw.index_add_(0, pm, torch.bmm(prev.transpose(1, 2), dz))
            gb.index_add_(0, pm, dz.sum(1, keepdim=True))
            if layer > 0:
                da = torch.bmm(dz, gathered[layer].transpose(1, 2))

    def _evaluate(self, st: _Stack, params: list[Tensor], split: str, per_pair: bool = False) -> Tensor:
        """Mean loss of every pair over the full split, as ``MeanMetric`` over ``eval_batch_size`` chunks.

        Returns the per-model sum over member tasks (``[M]``), or per pair with ``per_pair``.
        """
        tables = self.tables
        E = int(self.config.eval_batch_size)
        task_rows, sizes = tables.eval_rows(split)
        values = torch.empty(st.n_pairs, dtype=torch.float32)
        longest = task_rows.shape[1]
        rows_per_chunk = max(self.chunk_rows, longest)
        ranges = ([(0, st.n_models)] if self._kernel is not None
                  else st.chunks(rows_per_chunk, longest))
        with torch.no_grad():
            for m0, m1 in ranges:
                p0, p1 = int(st.ptr[m0]), int(st.ptr[m1])
                tasks = st.task[p0:p1]
                rows = task_rows[tasks]  # [P, L]
                n = sizes[tasks]  # [P]
                if self._kernel is not None:
                    out = self._c_forward(st, params, split, rows)
                else:
                    inputs = self._features(st, split, rows, p0, p1, m0)
                    _, _, out = self._forward(st, params, m0, m1, inputs)
                y = tables.y[split][rows]
                binary = tables.binary[tasks].view(-1, 1, 1)
                if bool(binary.all()):
                    loss = F.binary_cross_entropy_with_logits(out, y, reduction="none")
                elif not bool(binary.any()):
                    loss = (out - y).square()
                else:
                    loss = torch.where(binary, F.binary_cross_entropy_with_logits(out, y, reduction="none"),
                                       (out - y).square())
                loss = loss.sum(2)  # [P, L]
                pos = torch.arange(longest)
                total = torch.zeros(p1 - p0, dtype=torch.float32)
                for c0 in range(0, longest, E):
                    in_chunk = (pos[None, c0:c0 + E] < n[:, None])
                    count = in_chunk.sum(1)
                    chunk_sum = torch.where(in_chunk, loss[:, c0:c0 + E], 0).sum(1)
                    mean = chunk_sum / (count * tables.k).clamp_min(1)
                    total += torch.where(count > 0, mean * count, 0)  # MeanMetric: value * weight
                values[p0:p1] = total / n.clamp_min(1)
        if per_pair:
            return values
        return torch.zeros(st.n_models, dtype=torch.float32).index_add_(0, st.pm, values)
