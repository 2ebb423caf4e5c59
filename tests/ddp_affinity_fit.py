"""One affinity fit, for tests/test_affinity_ddp.py: run as a script (Lightning's DDP re-launches it per rank).

    python tests/ddp_affinity_fit.py OUT_DIR --devices 2 --batch 8
    python tests/ddp_affinity_fit.py OUT_DIR --devices 1 --batch 16 --force-k 3

Every rank writes ``OUT_DIR/rank<r>.json``: each callback's matrix, measured
steps and chosen interval, the final parameters, and how many times the
rank's logger received affinity curves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_etap.affinity import AffinityCallback  # noqa: E402

TASKS = ("a", "b", "c")


class SharedInputs(L.LightningModule):
    """Shared inputs; its loader gives rank r the examples r, r + world, ... of each global batch, in order."""

    def __init__(self, data=None, batch=8, absent=()):
        super().__init__()
        self.data, self.batch, self.absent = data, batch, set(absent)
        self.encoder = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in TASKS])

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.encoder(x)
        losses = {t: F.mse_loss(head(h).squeeze(-1), y[:, k]) for k, (t, head) in enumerate(zip(TASKS, self.heads))}
        reported = dict(losses)
        last = self.trainer.global_rank == self.trainer.world_size - 1
        if self.trainer.global_step in self.absent and last:  # no labels for b in this rank's share of the batch
            reported["b"] = losses["b"] * float("nan")
        return {"loss": sum(losses.values()), "task_losses": reported}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(self.data, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(self.data, batch_size=self.batch, sampler=sampler)


class CountingLogger(Logger):
    """Counts the affinity curves it receives (one instance per rank)."""

    def __init__(self):
        super().__init__()
        self.affinity_calls = 0

    @property
    def name(self):
        return "counting"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        if any(k.startswith("affinity/") for k in metrics):
            self.affinity_calls += 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="per-rank batch size")
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--force-k", type=int, default=None, help="the auto schedule's interval (reference run)")
    ap.add_argument("--no-callbacks", action="store_true", help="plain training (to compare the trajectories)")
    ap.add_argument("--absent", type=int, nargs="*", default=(),
                    help="global steps at which task b's reported loss is NaN on the last rank only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    y = torch.stack([x[:, 0] + x[:, 1], x[:, 0] - x[:, 2], torch.sin(x[:, 3])], 1)
    callbacks = {
        "default": AffinityCallback("encoder", overhead=0.5),
        "every_step": AffinityCallback("encoder", every_n_steps=1, update="optimizer", log_every_n_steps=2),
        "autograd": AffinityCallback("encoder", every_n_steps=2, engine="autograd"),
        "tag": AffinityCallback("encoder", every_n_steps=1, method="tag"),
        "control_variate": AffinityCallback("encoder", every_n_steps=3, control_variate=True),
    }
    if args.no_callbacks:
        callbacks = {}
    if args.force_k is not None and "default" in callbacks:
        callbacks["default"]._choose_interval = lambda trainer: args.force_k
    L.seed_everything(0, verbose=False)
    model = SharedInputs(TensorDataset(x, y), args.batch, args.absent)
    logger = CountingLogger()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=args.devices, strategy=args.strategy if args.devices > 1 else "auto",
        logger=logger, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[*callbacks.values(), Dump(args.out, callbacks, logger)], log_every_n_steps=1, deterministic=True, use_distributed_sampler=False,
    )
    trainer.fit(model)


class Dump(L.Callback):
    """Writes this rank's figures at the end of training (inside the worker, also under ddp_spawn)."""

    def __init__(self, out, callbacks, logger):
        self.out, self.callbacks, self.logger = out, callbacks, logger

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        out = {
            "rank": rank,
            "world_size": trainer.world_size,
            "results": {k: {"matrix": cb.result.matrix.tolist(), "measured": cb.result.measured_steps,
                            "chosen": cb.result.settings["every_n_steps_chosen"],
                            "absent": cb.result.absent_steps,
                            "halves": None if cb.result.half_matrices is None else cb.result.half_matrices.tolist()}
                        for k, cb in self.callbacks.items()},
            "params": [p.detach().flatten().tolist() for p in pl_module.parameters()],
            "affinity_log_calls": trainer.logger.affinity_calls,
        }
        Path(self.out).mkdir(parents=True, exist_ok=True)
        tmp = Path(self.out) / f".rank{rank}.json"
        tmp.write_text(json.dumps(out))
        os.replace(tmp, Path(self.out) / f"rank{rank}.json")


if __name__ == "__main__":
    main()
