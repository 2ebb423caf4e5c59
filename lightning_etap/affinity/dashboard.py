"""Affinity curves and an end-of-fit heatmap in every logger the Trainer has.

:class:`AffinityDashboard` is the thin logging layer of the affinity callback:
:meth:`~AffinityDashboard.log_step` sends the running matrix as scalars
``affinity/<source>-><target>`` straight to each logger's ``log_metrics``
(100 scalars cost about 0.3 ms a step there, 19.5 ms through
``LightningModule.log_dict`` from a callback),
and :meth:`~AffinityDashboard.log_final` logs the finished
:class:`~lightning_etap.affinity.result.AffinityResult`: a ``wandb.Table`` and
a heatmap ``wandb.Image`` for W&B, and ``affinity_heatmap.png``,
``affinity_matrix.csv`` and ``affinity_curves.csv`` in the log directory of
every other logger. Only global rank zero logs.

:func:`plot_affinity_heatmap` draws the heatmap to a file on its own (for
reports). Matplotlib (the ``plot`` extra) and wandb + pillow (the ``wandb``
extra) are imported only when used.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from lightning_etap._atomic import atomic_write_bytes
from lightning_etap.affinity.result import AffinityResult

if TYPE_CHECKING:
    import lightning as L
    from matplotlib.figure import Figure

__all__ = ["AffinityDashboard", "plot_affinity_heatmap"]

#: heatmaps of at most this many tasks get every cell's value written in it
ANNOTATE_MAX_TASKS = 12


class AffinityDashboard:
    """Logs affinity curves during fit and the final matrix as a heatmap, on global rank zero.

    Curves: :meth:`log_step` logs the ``n·(n-1)`` off-diagonal entries of the
    running matrix as ``<prefix>/<source>-><target>`` (``matrix[source,
    target]``, the affinity of the source task's update onto the target task's
    loss) through ``logger.log_metrics(metrics, step=step)`` of **every**
    logger in ``trainer.loggers``. Non-finite entries are left out. It logs on
    the steps where Lightning logs its own training metrics, ``(step + 1) %
    log_every_n_steps == 0``; when the affinity is measured on a subset of
    steps, the first measured step of each window of ``log_every_n_steps``
    steps is logged instead, so sparse measurement still gives curves. A step
    lower than the previous call's (a new fit) starts the count afresh.

    TensorBoard renames ``>`` in a tag to ``_``, so there the curves appear as
    ``affinity/a-_b``.

    End of fit: :meth:`log_final` logs, for each logger:

    * :class:`~lightning.pytorch.loggers.WandbLogger`: ``<prefix>/matrix``, a
      ``wandb.Table`` (a ``source`` column, then one column per target task),
      and ``<prefix>/heatmap``, a ``wandb.Image`` of the heatmap;
    * any other logger with a ``log_dir`` (CSV, TensorBoard, ...): the files
      :attr:`HEATMAP_FILE`, :attr:`MATRIX_FILE` (header ``source,<targets>``,
      one row per source task, full float precision, ``nan`` where there is
      no value) and :attr:`CURVES_FILE` (long format ``epoch,source,target,
      value``, every entry of every epoch's mean step matrix) in that
      directory, each written atomically;
    * a logger with neither is skipped with a warning;
    * every logger, also: ``<prefix>/split_half`` and
      ``<prefix>/split_half_pairs``, the result's split-half reproducibility
      (:attr:`AffinityResult.split_half
      <lightning_etap.affinity.result.AffinityResult.split_half>`), as
      scalars, when they are defined.

    Without matplotlib the heatmap is left out (one warning) and the rest is
    still logged.

    Args:
        log_every_n_steps: log the curves every this many optimizer steps;
            ``0`` logs no curves; ``None`` follows the Trainer's
            ``log_every_n_steps``.
        heatmap: log the finished matrix at the end of fit (:meth:`log_final`);
            ``False`` makes :meth:`log_final` do nothing.
        prefix: the first part of every key (``"affinity"`` gives
            ``affinity/a->b``, ``affinity/matrix``, ``affinity/heatmap``).

    Raises:
        ValueError: ``log_every_n_steps`` is negative or not an integer, or
            ``prefix`` is empty.

    Example:
        >>> from types import SimpleNamespace
        >>> import numpy as np
        >>> class Printer:
        ...     def log_metrics(self, metrics, step):
        ...         print(step, metrics)
        >>> trainer = SimpleNamespace(is_global_zero=True, loggers=[Printer()])
        >>> dashboard = AffinityDashboard(log_every_n_steps=2)
        >>> m = np.array([[np.nan, 0.5], [-0.25, np.nan]])
        >>> for step in range(4):
        ...     dashboard.log_step(trainer, ["a", "b"], m, step=step)
        1 {'affinity/a->b': 0.5, 'affinity/b->a': -0.25}
        3 {'affinity/a->b': 0.5, 'affinity/b->a': -0.25}
    """

    HEATMAP_FILE = "affinity_heatmap.png"
    MATRIX_FILE = "affinity_matrix.csv"
    CURVES_FILE = "affinity_curves.csv"

    def __init__(self, log_every_n_steps: int | None = None, heatmap: bool = True, prefix: str = "affinity") -> None:
        if log_every_n_steps is not None:
            if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int | np.integer):
                raise ValueError(f"log_every_n_steps must be an int >= 0 or None, got {log_every_n_steps!r}")
            if log_every_n_steps < 0:
                raise ValueError(f"log_every_n_steps must be >= 0 (0: no curves), got {log_every_n_steps}")
            log_every_n_steps = int(log_every_n_steps)
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        self.log_every_n_steps = log_every_n_steps
        self.heatmap = bool(heatmap)
        self.prefix = prefix
        self._window = 0  # the last logged window, (step + 1) // log_every_n_steps
        self._last_step = -1
        self._keys: tuple[tuple[str, ...], np.ndarray, np.ndarray, list[str]] | None = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ curves
    def is_due(self, trainer: L.Trainer, step: int) -> bool:
        """Whether :meth:`log_step` would log at ``step`` (so callers compute the matrix only then)."""
        every = trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
        if not every or not trainer.is_global_zero or not trainer.loggers:
            return False
        window = (int(step) + 1) // every
        return window > (0 if int(step) < self._last_step else self._window)

    def log_step(self, trainer: L.Trainer, task_names: Sequence[str], running_matrix: np.ndarray,
                 step: int) -> None:
        """Log the running matrix's off-diagonal entries if ``step`` is due (see the class docstring).

        Args:
            trainer: the Trainer; its ``loggers`` and ``is_global_zero`` are used
                (and ``log_every_n_steps`` when this dashboard's is ``None``).
            task_names: the ``n`` tasks, in the matrix's order.
            running_matrix: ``(n, n)`` array (NumPy, or anything ``np.asarray``
                accepts such as a CPU tensor), the current time-averaged
                matrix, ``matrix[source, target]``; the diagonal is ignored.
            step: the optimizer step the values belong to, passed to the
                loggers as is (pass ``trainer.global_step`` read in
                ``on_before_optimizer_step`` to line up with Lightning's own
                training metrics).

        Raises:
            ValueError: the matrix is not ``n x n`` for the ``n`` task names.
        """
        every = trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
        if not every or not trainer.is_global_zero or not trainer.loggers:
            return
        step = int(step)
        if step < self._last_step:  # a new fit, or a resume from an earlier checkpoint
            self._window = 0
        self._last_step = step
        window = (step + 1) // every
        if window <= self._window:
            return
        matrix = np.asarray(running_matrix, dtype=np.float64)
        if matrix.shape != (len(task_names),) * 2:
            raise ValueError(f"running_matrix must be {len(task_names)}x{len(task_names)} for tasks "
                             f"{list(task_names)}, got shape {matrix.shape}")
        self._window = window
        rows, cols, keys = self._pair_keys(task_names)
        values = matrix[rows, cols]
        finite = np.isfinite(values)
        metrics = {k: v for k, v, ok in zip(keys, values.tolist(), finite.tolist()) if ok}
        if not metrics:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _pair_keys(self, task_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Row indices, column indices and keys of the off-diagonal entries (cached per task list)."""
        names = tuple(str(t) for t in task_names)
        if self._keys is None or self._keys[0] != names:
            n = len(names)
            rows, cols = (ix.ravel() for ix in np.indices((n, n)))
            off = rows != cols
            rows, cols = rows[off], cols[off]
            keys = [f"{self.prefix}/{names[i]}->{names[j]}" for i, j in zip(rows.tolist(), cols.tolist())]
            self._keys = (names, rows, cols, keys)
        return self._keys[1], self._keys[2], self._keys[3]

    # ------------------------------------------------------------------ end of fit
    def log_final(self, trainer: L.Trainer, result: AffinityResult) -> None:
        """Log the finished result to every logger (see the class docstring); rank zero only.

        Args:
            trainer: the Trainer; its ``loggers``, ``is_global_zero`` and
                ``global_step`` are used.
            result: the measurement to log.
        """
        if not self.heatmap or not trainer.is_global_zero or not trainer.loggers:
            return
        png = self._heatmap_png(result)
        written: set[str] = set()
        half = {f"{self.prefix}/{key}": value for key in ("split_half", "split_half_pairs")
                if (value := getattr(result, key)) is not None}
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._log_wandb(logger, result, png, step=int(trainer.global_step), extra=half)
                continue
            if half:
                logger.log_metrics(half, step=int(trainer.global_step))
            log_dir = getattr(logger, "log_dir", None)
            if log_dir is None:
                self._warn_once(f"no-dir-{type(logger).__name__}",
                                f"AffinityDashboard: {type(logger).__name__} is not a WandbLogger and has no "
                                "log_dir, so the affinity heatmap and matrix were not saved for it")
                continue
            folder = os.path.realpath(os.fspath(log_dir))
            if folder in written:  # two loggers sharing one directory
                continue
            written.add(folder)
            os.makedirs(folder, exist_ok=True)
            if png is not None:
                _atomic_write(Path(folder) / self.HEATMAP_FILE, png)
            _atomic_write(Path(folder) / self.MATRIX_FILE, _matrix_csv(result).encode())
            _atomic_write(Path(folder) / self.CURVES_FILE, _curves_csv(result).encode())

    def _heatmap_png(self, result: AffinityResult) -> bytes | None:
        try:
            return _heatmap_png_bytes(result.matrix, result.task_names)
        except ModuleNotFoundError as err:
            self._warn_once("matplotlib", f"AffinityDashboard: the affinity heatmap was not drawn: {err}")
            return None

    def _log_wandb(self, logger: WandbLogger, result: AffinityResult, png: bytes | None, step: int,
                   extra: dict[str, float]) -> None:
        import wandb

        names = list(result.task_names)
        rows = [[src, *(_json_float(v) for v in row)] for src, row in zip(names, result.matrix.tolist())]
        metrics: dict[str, Any] = {f"{self.prefix}/matrix": wandb.Table(columns=["source", *names], data=rows),
                                   **extra}
        if png is not None:
            try:
                from PIL import Image
            except ModuleNotFoundError:
                self._warn_once("pillow", "AffinityDashboard: the heatmap was not logged to W&B: wandb.Image needs "
                                "pillow; install it with `pip install 'lightning-etap[wandb]'`")
            else:
                image = Image.open(io.BytesIO(png))
                metrics[f"{self.prefix}/heatmap"] = wandb.Image(image, caption=_CAPTION)
        logger.log_metrics(metrics, step=step)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


# ---------------------------------------------------------------------- the heatmap
_CAPTION = "task affinity: row = source task (its update), column = target task (its loss)"


def plot_affinity_heatmap(affinity: AffinityResult | np.ndarray, task_names: Sequence[str] | None,
                          path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Draw the affinity matrix as a heatmap and write it to ``path`` (atomically).

    Rows are source tasks, columns target tasks; a diverging colormap centred
    at 0 (blue: the source's update lowers the target's loss, red: it raises
    it), symmetric limits ``±max|value|``, grey for non-finite cells, and
    every value written in its cell when there are at most
    ``ANNOTATE_MAX_TASKS`` (12) tasks. Drawn with matplotlib's Agg renderer;
    pyplot and the global backend are not touched.

    Args:
        affinity: an :class:`AffinityResult` (its ``matrix``) or an ``(n, n)``
            array, ``matrix[source, target]``.
        task_names: the ``n`` task names in the matrix's order; ``None`` for a
            result (its own names) or for an array (``0 … n-1``).
        path: the image file; its suffix picks the format (``.png``, ``.svg``,
            ``.pdf``, ...). The folder must exist.
        title: the figure title (default: none).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ModuleNotFoundError: matplotlib is not installed (the ``plot`` extra).
        ValueError: the matrix is not square, or ``task_names`` do not match it.
    """
    if isinstance(affinity, AffinityResult):
        if task_names is not None and tuple(str(t) for t in task_names) != affinity.task_names:
            raise ValueError(f"task_names {list(task_names)} differ from the result's {list(affinity.task_names)}")
        matrix, names = affinity.matrix, affinity.task_names
    else:
        matrix = np.asarray(affinity, dtype=np.float64)
        names = tuple(str(t) for t in task_names) if task_names is not None else tuple(map(str, range(len(matrix))))
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    _atomic_write(path, _render(_heatmap_figure(matrix, names, title=title), fmt))
    return path


def _heatmap_png_bytes(matrix: np.ndarray, names: Sequence[str]) -> bytes:
    return _render(_heatmap_figure(matrix, names), "png")


def _render(fig: Figure, fmt: str) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def _heatmap_figure(matrix: np.ndarray, names: Sequence[str], title: str | None = None) -> Figure:
    """The heatmap as a matplotlib ``Figure`` on an Agg canvas."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "drawing the affinity heatmap needs matplotlib; install it with `pip install 'lightning-etap[plot]'`"
        ) from None
    import matplotlib

    matrix = np.asarray(matrix, dtype=np.float64)
    n = len(names)
    if matrix.shape != (n, n):
        raise ValueError(f"the matrix must be {n}x{n} for tasks {list(names)}, got shape {matrix.shape}")
    # colours span the off-diagonal entries, the pairs that matter: a task's effect on itself (the diagonal) is
    # typically far larger and would wash them all out, so the diagonal is drawn grey, its values written in it
    diagonal = np.eye(n, dtype=bool)
    finite = np.isfinite(matrix) & ~diagonal
    limit = float(np.abs(matrix[finite]).max()) if finite.any() else 0.0
    limit = limit if limit > 0 else 1.0
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="0.85")
    norm = Normalize(vmin=-limit, vmax=limit)

    side = min(max(4.0, 0.55 * n + 2.5), 24.0)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_where(diagonal | ~np.isfinite(matrix), matrix), cmap=cmap, norm=norm,
                      interpolation="nearest")
    ax.set_xticks(range(n), labels=list(names), rotation=45 if max(map(len, names), default=0) > 3 else 0,
                  ha="right" if max(map(len, names), default=0) > 3 else "center")
    ax.set_yticks(range(n), labels=list(names))
    ax.set_xlabel("target task (whose loss changes)")
    ax.set_ylabel("source task (whose update)")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, label="affinity z[source → target] (diagonal: grey)", shrink=0.85)
    if n <= ANNOTATE_MAX_TASKS:
        for i in range(n):
            for j in range(n):
                value = matrix[i, j]
                if not math.isfinite(value):
                    continue
                dark = i != j and abs(value) / limit > 0.6
                ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black", style="italic" if i == j else "normal")
    return fig


# ---------------------------------------------------------------------- files
def _matrix_csv(result: AffinityResult) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["source", *result.task_names])
    for name, row in zip(result.task_names, result.matrix.tolist()):
        writer.writerow([name, *(repr(float(v)) for v in row)])
    return out.getvalue()


def _curves_csv(result: AffinityResult) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["epoch", "source", "target", "value"])
    names = result.task_names
    for epoch, mat in zip(result.epochs.tolist(), result.epoch_matrices.tolist()):
        for src, row in zip(names, mat):
            for dst, value in zip(names, row):
                writer.writerow([epoch, src, dst, repr(float(value))])
    return out.getvalue()


def _json_float(value: float) -> float | None:
    """W&B tables are JSON: non-finite values become empty cells."""
    return value if math.isfinite(value) else None


_atomic_write = atomic_write_bytes
