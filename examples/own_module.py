"""Your own LightningModule and DataModule: the affinity callback in your Trainer, then the whole pipeline.

    python examples/own_module.py            # affinity of 4 synthetic tasks in an ordinary fit
    python examples/own_module.py --tiny     # the same in a few seconds (what CI runs)
    python examples/own_module.py --devices 2 --save runs/sine-affinity   # under DDP (2 CPU processes), saved

The module below is plain Lightning. It needs two things for lightning-etap:

* ``training_step`` returns the per-task losses beside the total:
  ``{"loss": total, "task_losses": {task: loss}}`` (for the ``AffinityCallback``);
* after ``trainer.test`` it holds ``self.test_losses = {task: loss}`` (for ground truth).

``build_model`` and ``build_datamodule`` are what the pipeline's config points at
(``examples/own_module.yaml``), so the same code also runs the whole job::

    cd examples && lightning-etap run --config own_module.yaml

and, with the affinity your own (DDP) training saved, without an all-task fit of its own::

    cd examples && lightning-etap run --config own_module.yaml --affinity-from ../runs/sine-affinity
"""

from __future__ import annotations

import argparse
import math

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_etap.affinity import AffinityCallback

TASKS = ("a", "b", "c", "d")


class SineTasks(L.LightningDataModule):
    """Four regression tasks on the same 8 inputs: ``y_t = sin(w_t · x)``.

    ``a`` and ``b`` use nearly the same direction ``w`` (they should help each
    other), ``c`` the opposite one, ``d`` an unrelated one. The data are fixed
    (seed 0); ``seed`` only orders the training batches.
    """

    def __init__(self, tasks=TASKS, seed: int = 0, n_train: int = 1024, batch_size: int = 64) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.seed = seed
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(0)
        base = torch.randn(8, generator=g)
        directions = {"a": base, "b": base + 0.2 * torch.randn(8, generator=g), "c": -base,
                      "d": torch.randn(8, generator=g)}
        x = torch.randn(n_train + 1024, 8, generator=g)
        y = torch.stack([torch.sin(x @ directions[t] / math.sqrt(8) * 2) for t in self.tasks], dim=1)
        y = y + 0.1 * torch.randn(y.shape, generator=g)
        self.parts = {"train": (x[:n_train], y[:n_train]), "val": (x[n_train:n_train + 512], y[n_train:n_train + 512]),
                      "test": (x[n_train + 512:], y[n_train + 512:])}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        x, y = self.parts[split]
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size if shuffle else 512, shuffle=shuffle,
                          generator=gen if shuffle else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


class TinyMultiTask(L.LightningModule):
    """A shared encoder with one linear head per task, trained with SGD."""

    def __init__(self, tasks=TASKS, lr: float = 0.05) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.lr = lr
        self.encoder = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Linear(16, 1) for t in self.tasks})
        self.test_losses: dict[str, float] = {}
        self._test_sums: dict[str, list[float]] = {}

    def _losses(self, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        h = self.encoder(x)
        return {t: nn.functional.mse_loss(self.heads[t](h).squeeze(1), y[:, i]) for i, t in enumerate(self.tasks)}

    def training_step(self, batch, batch_idx):
        losses = self._losses(batch)
        return {"loss": sum(losses.values()), "task_losses": losses}  # the one line lightning-etap needs

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", sum(self._losses(batch).values()))

    def on_test_epoch_start(self) -> None:
        self._test_sums = {t: [0.0, 0] for t in self.tasks}

    def test_step(self, batch, batch_idx):
        n = batch[0].shape[0]
        for t, loss in self._losses(batch).items():
            self._test_sums[t][0] += float(loss) * n
            self._test_sums[t][1] += n

    def on_test_epoch_end(self) -> None:
        self.test_losses = {t: s / max(c, 1) for t, (s, c) in self._test_sums.items()}  # for ground truth

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def build_model(tasks):
    """The pipeline's ``model:`` factory: ``tasks -> LightningModule``."""
    return TinyMultiTask(tasks)


def build_datamodule(tasks, seed):
    """The pipeline's ``datamodule:`` factory: ``(tasks, seed) -> LightningDataModule``."""
    return SineTasks(tasks, seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="two epochs (for CI)")
    ap.add_argument("--devices", type=int, default=1, help="more than 1: that many CPU processes under DDP")
    ap.add_argument("--save", default=None, metavar="DIR",
                    help="save the affinity there (for the pipeline's --affinity-from)")
    args = ap.parse_args()

    L.seed_everything(0, verbose=False)
    affinity = AffinityCallback(shared="encoder")          # 1. the callback
    trainer = L.Trainer(max_epochs=2 if args.tiny else 20, callbacks=[affinity], logger=False,
                        accelerator="cpu" if args.devices > 1 else "auto", devices=args.devices,
                        strategy="ddp" if args.devices > 1 else "auto",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyMultiTask(), datamodule=SineTasks())   # 2. an ordinary fit
    result = affinity.result                               # 3. the labelled matrix (the same on every rank)
    if not trainer.is_global_zero:
        return
    if args.save:
        print(f"saved to {result.save(args.save)}")
    print(result)
    # the matrix, row = source task (its update), column = target task (its loss); result.to_pandas() gives it
    # as a labelled DataFrame when pandas is installed (it is not a dependency of lightning-etap)
    print("source \\ target " + "".join(f"{t:>8}" for t in result.task_names))
    for source, row in zip(result.task_names, result.matrix):
        print(f"{source:<16}" + "".join(f"{v:8.3f}" for v in row))
    for (a, b), score in sorted(result.pairwise().items(), key=lambda kv: -kv[1]):
        print(f"pair {a}+{b}: {score:+.4f}")
    print(f"group a+b+c: {result.group_score(['a', 'b', 'c']):+.4f}")


if __name__ == "__main__":
    main()
