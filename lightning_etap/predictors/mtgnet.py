"""MTG-Net: meta-learning on task combinations (Song et al. 2022, "Efficient and Effective Multi-task
Grouping via Meta Learning on Task Combinations"), in plain torch on the CPU.

A group is the set of its members' learnable task-ID embeddings; transformer
blocks whose attention is masked to the members let every member's embedding
take in its group, and one linear head per task reads that task's gain.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from sklearn.utils.validation import check_random_state

from ._baseline import BaselinePredictor
from ._persist import read_npz_document, write_npz_document

__all__ = ["MTGNetPredictor"]

_FORMAT = "lightning_etap.MTGNetPredictor"
_BLOCK_SHAPES = (  # per transformer block: name -> shape in units of (hidden, hidden) or (hidden,)
    ("query.weight", 2), ("query.bias", 1), ("key.weight", 2), ("key.bias", 1),
    ("value.weight", 2), ("value.bias", 1), ("out.weight", 2), ("out.bias", 1),
    ("norm1.weight", 1), ("norm1.bias", 1), ("ff1.weight", 2), ("ff1.bias", 1),
    ("ff2.weight", 2), ("ff2.bias", 1), ("norm2.weight", 1), ("norm2.bias", 1),
)


@contextmanager
def _torch_threads(n_threads: int | None) -> Iterator[None]:
    """Run with ``n_threads`` torch intra-op threads, restoring the previous setting (None: unchanged)."""
    if n_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(n_threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _init_parameters(n_tasks: int, hidden: int, n_layers: int, generator: torch.Generator) -> dict:
    """Freshly initialised float32 parameters, drawn from ``generator`` only (the global RNG is untouched).

    Task embeddings ~ N(0, 1); attention and feed-forward weights Xavier-uniform;
    head weights ~ U(-1/sqrt(hidden), 1/sqrt(hidden)); biases 0; layer norms (1, 0).
    """
    params = {"embedding": torch.empty(n_tasks, hidden).normal_(0.0, 1.0, generator=generator)}
    for i in range(n_layers):
        for name, rank in _BLOCK_SHAPES:
            key = f"block{i}.{name}"
            if rank == 2:
                params[key] = torch.nn.init.xavier_uniform_(torch.empty(hidden, hidden), generator=generator)
            elif name.startswith("norm") and name.endswith("weight"):
                params[key] = torch.ones(hidden)
            else:
                params[key] = torch.zeros(hidden)
    bound = 1.0 / math.sqrt(hidden)
    params["head.weight"] = torch.empty(n_tasks, hidden).uniform_(-bound, bound, generator=generator)
    params["head.bias"] = torch.zeros(n_tasks)
    return params


def _dropout(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None or p == 0.0:
        return x
    keep = torch.rand(x.shape, generator=generator) >= p  # ~3x faster than bernoulli_ with a generator
    return x * keep / (1.0 - p)


def _forward(params: dict, members: torch.Tensor, n_layers: int, temperature: float, dropout: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """``(m, n)`` outputs for ``(m, n)`` bool ``members``; dropout only when a ``generator`` is given.

    Every task of every group is a token; attention keys are restricted to the
    group's members, so a non-member's token (and embedding) can never reach a
    member's output. Non-member outputs are computed and ignored by callers.
    """
    m, n = members.shape
    embedding = params["embedding"]
    x = embedding.unsqueeze(0).expand(m, n, -1)
    hidden = x.shape[-1]
    blocked = ~members.unsqueeze(1)  # (m, 1, n): key s is not a member of the group
    scale = 1.0 / (math.sqrt(hidden) * temperature)
    for i in range(n_layers):
        p = {name: params[f"block{i}.{name}"] for name, _ in _BLOCK_SHAPES}

        def linear(v, name, p=p):
            return torch.nn.functional.linear(v, p[f"{name}.weight"], p[f"{name}.bias"])

        if i == 0:  # every group starts from the same embeddings: project them once, then broadcast
            q, k, v = (linear(embedding, name).unsqueeze(0).expand(m, n, -1) for name in ("query", "key", "value"))
        else:
            q, k, v = (linear(x, name) for name in ("query", "key", "value"))
        scores = (q @ k.transpose(1, 2)) * scale
        attention = torch.softmax(scores.masked_fill(blocked, float("-inf")), dim=-1)
        h = linear(attention @ v, "out")
        x = torch.nn.functional.layer_norm(x + _dropout(h, dropout, generator), (hidden,),
                                           p["norm1.weight"], p["norm1.bias"])
        h = linear(torch.relu(linear(x, "ff1")), "ff2")
        x = torch.nn.functional.layer_norm(x + _dropout(h, dropout, generator), (hidden,),
                                           p["norm2.weight"], p["norm2.bias"])
    return (x * params["head.weight"]).sum(dim=-1) + params["head.bias"]


class MTGNetPredictor(BaselinePredictor):
    """Transformer over the members' task embeddings, one linear head per task (MTG-Net).

    Architecture: a learnable embedding per task (width ``hidden_dim``);
    ``n_layers`` post-norm transformer blocks, each single-head attention
    ``softmax(q k^T / (sqrt(hidden_dim) * temperature))`` with keys masked to
    the group's members, followed by a ReLU feed-forward layer of width
    ``hidden_dim``, each with residual connection, dropout and layer norm; then
    ``gain[G -> t] = head_t(x_t)``, a linear head per task applied to task
    ``t``'s final token.

    Training (full batch over the training groups with two or more tasks):
    the L1 loss over member entries, Adam (``lr``, ``weight_decay`` as L2),
    at most ``max_epochs`` steps. The ETAP paper's protocol has no validation
    groups, so early stopping and snapshot choice **monitor the training
    loss**: after every step the L1 error on the training groups is measured
    without dropout (``loss_history_``); training stops when it has not
    improved for ``patience`` consecutive epochs. The ``n_snapshots``
    parameter sets with the lowest monitored loss (ties: the earlier epoch)
    are kept and their predictions averaged.

    With ``standardize=True`` (default) the network learns the gains
    standardised by their training mean and standard deviation, and
    predictions are mapped back; Adam is scale-free, but the heads' initial
    outputs are then on the right scale whatever the gains' units.

    Deterministic on the CPU for a given ``random_state``: initialisation and
    dropout draw from a local ``torch.Generator`` (the global torch RNG is
    neither used nor changed). Results may differ in the last bits across
    thread counts or machines.

    Defaults are the MTG-Net settings this project adopted (hidden 128,
    2 layers, dropout 0.5, temperature 0.2, Adam lr 7e-3, weight decay 5e-4,
    patience 5, 2 snapshots); the ETAP paper instead tuned the number of
    layers and the width in 4-64 per training set (appendix B.2). With
    patience 5 on the training loss, fits typically stop after 10-30 epochs.
    On a simulated 8-task problem (pairwise-affinity gains plus noise, 6
    seeds) a longer patience helped a little: held-out R^2 -0.11 / 0.34 /
    0.42 with 10 / 25 / 50 training groups at patience 5, -0.02 / 0.36 / 0.45
    at 20 and -0.03 / 0.35 / 0.52 at 100 (Pearson within the seed spread of
    about 0.1), for 2-30x the fit time.

    Args:
        hidden_dim: embedding / token width (default 128).
        n_layers: transformer blocks (default 2).
        temperature: attention softmax temperature (default 0.2).
        dropout: dropout rate on both residual branches during training (default 0.5).
        lr: Adam learning rate (default 7e-3).
        weight_decay: Adam weight decay (default 5e-4).
        max_epochs: maximum number of full-batch steps (default 1000).
        patience: epochs without improvement of the monitored training loss
            before stopping (default 5).
        n_snapshots: number of lowest-loss parameter snapshots averaged (default 2).
        standardize: learn standardised gains (default True).
        num_threads: torch intra-op threads during ``fit`` and ``predict``
            (default 1; the previous setting is restored afterwards; None
            leaves torch's setting alone). The network is tiny: on a loaded
            2-core machine two threads made fitting 5-50x slower than one.
        task_names: optional ``n`` task names.
        random_state: seed (int), ``numpy.random.RandomState`` or None (fresh
            randomness); default 0.

    Attributes:
        n_tasks_: number of tasks.
        task_names_: list of task names, or None.
        loss_history_: ``(n_epochs_,)`` monitored training L1 error per epoch
            (no dropout, in gain units).
        n_epochs_: epochs run; ``stopped_early_``: whether patience ran out.
        snapshot_epochs_: epochs (0-based) of the averaged snapshots, best first.
        snapshot_losses_: their monitored losses.
        snapshots_: list of parameter dicts (name -> float32 numpy array).
        target_mean_, target_scale_: the standardisation of the gains.

    Raises:
        ValueError: (in ``fit``) invalid options or masks/gains, or fewer than
            2 training groups with two or more tasks.

    Example:
        >>> import numpy as np
        >>> from lightning_etap.groups import all_groups
        >>> groups = all_groups(4, min_size=2)
        >>> gains = np.where(groups, 0.1 * groups.sum(axis=1, keepdims=True), np.nan)
        >>> model = MTGNetPredictor(hidden_dim=16, max_epochs=50).fit(groups, gains)
        >>> model.predict(groups).shape, len(model.snapshot_epochs_)
        ((11, 4), 2)
    """

    _FORMAT = _FORMAT
    _CHUNK = 2048  # groups per forward pass in predict: (chunk, n, hidden) float32 activations
    _SCALARS = ("n_tasks_", "task_names_", "loss_history_", "n_epochs_", "stopped_early_", "snapshot_epochs_",
                "snapshot_losses_", "target_mean_", "target_scale_")

    def __init__(
        self,
        *,
        hidden_dim: int = 128,
        n_layers: int = 2,
        temperature: float = 0.2,
        dropout: float = 0.5,
        lr: float = 7e-3,
        weight_decay: float = 5e-4,
        max_epochs: int = 1000,
        patience: int = 5,
        n_snapshots: int = 2,
        standardize: bool = True,
        num_threads: int | None = 1,
        task_names: Sequence[str] | None = None,
        random_state=0,
    ):
        self.hidden_dim = hidden_dim
        self.n_layers = n_layers
        self.temperature = temperature
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.patience = patience
        self.n_snapshots = n_snapshots
        self.standardize = standardize
        self.num_threads = num_threads
        self.task_names = task_names
        self.random_state = random_state

    def _check_options(self) -> None:
        for name in ("hidden_dim", "n_layers", "max_epochs", "patience", "n_snapshots"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        for name, low, high in (("temperature", 0.0, math.inf), ("lr", 0.0, math.inf)):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.number)) or not low < value < high:
                raise ValueError(f"{name} must be a positive finite float; got {value!r}")
        if not isinstance(self.dropout, (int, float, np.number)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout!r}")
        if not isinstance(self.weight_decay, (int, float, np.number)) or not (
            np.isfinite(self.weight_decay) and self.weight_decay >= 0
        ):
            raise ValueError(f"weight_decay must be a finite float >= 0; got {self.weight_decay!r}")
        if not isinstance(self.standardize, (bool, np.bool_)):
            raise ValueError(f"standardize must be True or False; got {self.standardize!r}")
        threads = self.num_threads
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1
        ):
            raise ValueError(f"num_threads must be None or an integer >= 1; got {threads!r}")

    def fit(self, masks, gains=None) -> MTGNetPredictor:
        """Train the network on the training groups with two or more tasks.

        Args:
            masks: ``(m, n)`` bool training masks (singletons ignored).
            gains: ``(m, n)`` measured relative gains; non-member entries ignored. Or pass a
                :class:`~lightning_etap.groundtruth.GroupGains` (``store.gains()``)
                alone as ``masks``: its columns are matched to the tasks by name.

        Returns:
            self
        """
        self._check_options()
        masks, gains, columns = self._training_groups(masks, gains, minimum=2)
        with _torch_threads(self.num_threads):
            return self._fit(masks, gains, columns)

    def _fit(self, masks: np.ndarray, gains: np.ndarray, columns: list[str] | None = None) -> MTGNetPredictor:
        n = masks.shape[1]
        y = gains[masks]
        mean, scale = (float(y.mean()), float(y.std())) if self.standardize else (0.0, 1.0)
        if not scale > 0:
            scale = 1.0
        target = torch.from_numpy(np.where(masks, (gains - mean) / scale, 0.0).astype(np.float32))
        weight = torch.from_numpy(masks.astype(np.float32))
        count = float(masks.sum())
        members = torch.from_numpy(masks)

        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        generator = torch.Generator().manual_seed(seed)
        params = _init_parameters(n, int(self.hidden_dim), int(self.n_layers), generator)
        for tensor in params.values():
            tensor.requires_grad_(True)
        optimizer = torch.optim.Adam(list(params.values()), lr=float(self.lr),
                                     weight_decay=float(self.weight_decay))
        layers, temperature, p = int(self.n_layers), float(self.temperature), float(self.dropout)

        history: list[float] = []
        kept: list[tuple[float, int, dict]] = []  # (loss, epoch, parameters), best first
        best, wait, stopped = math.inf, 0, False
        for epoch in range(int(self.max_epochs)):
            optimizer.zero_grad()
            out = _forward(params, members, layers, temperature, p, generator)
            loss = ((out - target).abs() * weight).sum() / count
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                out = _forward(params, members, layers, temperature)
                monitored = float(((out - target).abs() * weight).sum() / count) * scale
            history.append(monitored)
            if len(kept) < self.n_snapshots or monitored < kept[-1][0]:
                state = {k: v.detach().numpy().copy() for k, v in params.items()}
                kept = sorted([*kept, (monitored, epoch, state)], key=lambda s: (s[0], s[1]))
                kept = kept[: self.n_snapshots]
            if monitored < best:
                best, wait = monitored, 0
            else:
                wait += 1
                if wait >= self.patience:
                    stopped = True
                    break

        self.n_tasks_ = n
        self.task_names_ = self._resolve_names(n) or columns
        self.loss_history_ = np.asarray(history)
        self.n_epochs_ = len(history)
        self.stopped_early_ = stopped
        self.snapshot_epochs_ = [int(e) for _, e, _ in kept]
        self.snapshot_losses_ = [float(v) for v, _, _ in kept]
        self.snapshots_ = [s for _, _, s in kept]
        self.target_mean_ = mean
        self.target_scale_ = scale
        return self

    def _member_gains(self, masks: np.ndarray) -> np.ndarray:
        members = torch.from_numpy(np.ascontiguousarray(masks))
        total = np.zeros(masks.shape)
        with torch.no_grad(), _torch_threads(self.num_threads):
            for snapshot in self.snapshots_:
                params = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in snapshot.items()}
                total += _forward(params, members, int(self.n_layers), float(self.temperature)).double().numpy()
        return total / len(self.snapshots_) * self.target_scale_ + self.target_mean_

    # ------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write the fitted predictor to one ``.npz`` file (no pickle).

        The file holds a JSON header (format, version, hyper-parameters, scalar
        fitted state) and every snapshot's float32 parameters; :meth:`load`
        reads it with ``allow_pickle=False`` and reproduces predictions exactly.
        The file is written at ``path`` as given (no suffix is added).

        Raises:
            sklearn.exceptions.NotFittedError: before ``fit``.
        """
        self._check_fitted()
        from lightning_etap import __version__

        fitted = {name: getattr(self, name) for name in self._SCALARS}
        arrays = {f"snapshot{k}/{name}": value for k, snap in enumerate(self.snapshots_)
                  for name, value in snap.items()}
        return write_npz_document(path, _FORMAT, self._saved_params(), fitted, arrays, __version__,
                                  n_snapshots=len(self.snapshots_))

    @classmethod
    def load(cls, path: str | Path) -> MTGNetPredictor:
        """Rebuild a predictor written by :meth:`save`.

        Raises:
            ValueError: the file is not a saved MTGNetPredictor of this format version.
        """
        header, arrays = read_npz_document(path, _FORMAT)
        model = cls(**cls._restored_params(header["params"]))
        for name in cls._SCALARS:
            setattr(model, name, header["fitted"][name])
        model.loss_history_ = np.asarray(model.loss_history_, dtype=np.float64)
        model.snapshots_ = []
        for k in range(header["n_snapshots"]):
            prefix = f"snapshot{k}/"
            model.snapshots_.append({key[len(prefix):]: arrays[key] for key in arrays if key.startswith(prefix)})
        return model
