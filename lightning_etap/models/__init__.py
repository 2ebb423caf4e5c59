"""Reference multi-task models."""

from lightning_etap.models.mtl_mlp import MultiTaskMLP

__all__ = ["MultiTaskMLP"]
