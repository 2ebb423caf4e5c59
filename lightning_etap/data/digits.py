"""scikit-learn's bundled handwritten digits as 10 one-vs-rest binary tasks.

Needs no data directory and no network: the images ship inside scikit-learn.
It is meant for tests, offline demos and ``lightning-etap run --dataset digits``.

On the full 8x8 images the easy tasks (``digit_0``, ``digit_6``) reach a test
loss near 0.002, and a relative gain computed against such a loss is noise
divided by almost nothing. The default setting therefore makes the tasks harder
on purpose: images are average-pooled to 4x4 and only ``train_size`` examples
are used for training, which keeps every task's single-task test loss in the
0.05-0.3 range where relative gains mean something. Pass ``pool=1`` and
``train_size=None`` for the classic full-resolution version.
"""

from __future__ import annotations

import torch

from lightning_etap.data.base import MultiTaskDataset, TaskSplits, stratified_split


def load_digits(
    root: str | None = None,
    *,
    seed: int = 0,
    pool: int = 2,
    train_size: int | None = 300,
    val_fraction: float = 0.15,
    test_fraction: float = 0.4,
) -> MultiTaskDataset:
    """Digits 0-9 as tasks ``digit_0`` ... ``digit_9`` (shared inputs, binary).

    Args:
        root: ignored (the data ships with scikit-learn); accepted so every
            loader has the same signature.
        seed: seed of the deterministic train / val / test split.
        pool: average-pool factor of the 8x8 images (1, 2 or 4).
        train_size: number of training examples kept (``None``: all that remain
            after the test and validation splits).
        val_fraction: fraction of the non-test examples used for validation.
        test_fraction: fraction of all examples used for testing.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    if pool not in (1, 2, 4):
        raise ValueError(f"pool must be 1, 2 or 4 (the images are 8x8), got {pool}")
    data = _sk_load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0  # (N, 8, 8) in [0, 1]
    if pool > 1:
        images = torch.nn.functional.avg_pool2d(images.unsqueeze(1), pool).squeeze(1)
    x = images.reshape(images.shape[0], -1).contiguous()
    labels = torch.tensor(data.target, dtype=torch.long)

    g = torch.Generator().manual_seed(seed)
    rest, test = stratified_split(labels[:, None].float(), test_fraction, g)
    rest_labels = labels[rest][:, None].float()
    train_rel, val_rel = stratified_split(rest_labels, val_fraction, g)
    train, val = rest[train_rel], rest[val_rel]
    if train_size is not None:
        if not 10 <= train_size <= train.numel():
            raise ValueError(f"train_size must be between 10 and {train.numel()}, got {train_size}")
        keep = torch.randperm(train.numel(), generator=g)[:train_size]
        train = train[keep.sort().values]

    idx = {"train": train, "val": val, "test": test}
    xs = {s: x[i] for s, i in idx.items()}  # one input tensor per split, shared by every task
    names = tuple(f"digit_{d}" for d in range(10))
    splits = {
        name: TaskSplits(
            **{s: (xs[s], (labels[idx[s]] == d).float()[:, None]) for s in idx}
        )
        for d, name in enumerate(names)
    }
    return MultiTaskDataset(
        name="digits",
        task_names=names,
        task_kinds=("binary",) * 10,
        layout="shared",
        splits=splits,
        metadata={"seed": seed, "pool": pool, "train_size": train_size,
                  "val_fraction": val_fraction, "test_fraction": test_fraction},
    )
