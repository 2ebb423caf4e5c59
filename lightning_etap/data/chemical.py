"""Chemical (MHC-I peptide binding): the ETAP paper's ten binary tasks, with its exact splits.

Every task is one MHC-I allele; an example is a 9-residue peptide, one-hot
encoded as 9 positions x 20 amino acids = 180 binary features (exactly nine
ones per row), and the label says whether the peptide binds (1) or not (0).
Every task has its own peptides (``per_task`` layout).

Train and test rows are the released ``{task}_X_train.npy`` / ``_test.npy``
files of aronlaszka/ETAP (``Dataset/CHEMICAL/Task_Splits/``), unchanged. The
validation split is drawn from each task's train file, stratified by label,
``val_fraction`` (default 10 %, as in the released code) of the rows,
deterministic given ``seed``. Inputs are left as 0/1 (no standardisation).
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch

from lightning_etap.data._download import RemoteFile, read_verified
from lightning_etap.data._tabular import check_fractions, split_rows, take_rows
from lightning_etap.data.base import MultiTaskDataset, TaskSplits

#: Task names in the paper's order.
TASKS: tuple[str, ...] = ("83", "78", "84", "85", "76", "86", "81", "80", "87", "55")
FOLDER = "chemical"
N_FEATURES = 180
_BASE_URL = "https://raw.githubusercontent.com/aronlaszka/ETAP/main/Dataset/CHEMICAL/Task_Splits/"

#: sha256 of the released files (computed from the copies of commit ea7ce07).
SHA256: dict[str, str] = {
    "55_X_test.npy": "2afa435c6e6ea55e3ab95081dbd272b82fa9214eef06961841cb81ddc4ea4467",
    "55_X_train.npy": "84bfb71f99805c5c6bf009a2cd1aca09a8fd8774c33d108ce4875371773be7f5",
    "55_y_test.npy": "c7d8a430efb11671cc55f59c6152a099b42238751c655fbb5c53783c5e9588a7",
    "55_y_train.npy": "04199e871ccfb468caef561999d64bfc5bc7e8abde1e2e41a68cdb5daff94768",
    "76_X_test.npy": "0298414a36d663a674233ee24e5236862e90396458a52aecfcc58033dc713995",
    "76_X_train.npy": "f254749b798d93e3f1b24f4c7dea650ba7b232ae9c6e3230e97c63e57dfd808f",
    "76_y_test.npy": "0c4f70e48ca966a52e3de475755c18db978a9c0896b5075a22ded2cc75fc402c",
    "76_y_train.npy": "a9fb8adda584e99be5d57f1adc62ffe1a0b5611372944f46aef6a432e83c3eda",
    "78_X_test.npy": "011b6241ff0669a0783d33e957e08c4de9509227519f105b35980461a2fc0df4",
    "78_X_train.npy": "054be0e293c53094369c12d2b0371ff07d32b57f39679ea697da9fbc255c2e2e",
    "78_y_test.npy": "0935c39d0a51c4251fb1ba745125ff55b5fafc4abe3abb1084238502a8824bfd",
    "78_y_train.npy": "07d2a5daca4882e6fd08e7aa6bca79592d037eefdf9c105cbb28a184159b5cfe",
    "80_X_test.npy": "40d31d642a1242f37264ce0a809f0d765dc4f5c0d01973fb8ac8d79ea8851a29",
    "80_X_train.npy": "be3e19f155c198cca1b629b9d53c233ea2f75c13c73a59e8a26668b1418657ef",
    "80_y_test.npy": "bd403b6beaa0a08e719c2ea3cdc40748cf115efadbd2050a2133fd5b752ae69e",
    "80_y_train.npy": "ede8666ed54f3d84702bd142197318cc9145581bba03d50395a7006b74d9c839",
    "81_X_test.npy": "ba554d60dfab9d3623fea32f8eb3716f4fe72ff0e141d26c00d3017534e8089d",
    "81_X_train.npy": "8cd0450098217220445337051e1442fa00b03b20fafe01b6667b9229e6cfecb4",
    "81_y_test.npy": "36fcdc8f03b1f0603bdb4f05fd9baab4742bdd65dd5ad7d20ac425632f4e8e33",
    "81_y_train.npy": "115e44b38f5db5b6a7f4bb5425665b15b250c4323b6235cf7609d5a071c56212",
    "83_X_test.npy": "906b0d5b1a43d126fc1f3403036b1c7dbd6c062083fd8700e98dc2f8e9e7a905",
    "83_X_train.npy": "dc9ac85ac6ee45fa1d2785441556753f9127a28d0e40bb1156395d066e551f4c",
    "83_y_test.npy": "1852b2f08aca9adba0632751f8e803fd04e6893428e491158406ccfb69cb104b",
    "83_y_train.npy": "ee084a0e90f2833871f05b002f91573f9d7caef0e253dca5a9938845148ada0f",
    "84_X_test.npy": "1bd682a6497eb70dc019fc58b208666c0365a58c26a4eb9dee719e1f49704642",
    "84_X_train.npy": "f6753208dddbfe76a42e7cdaa4f6af9b310f73997db714ffb19a371c61355aa3",
    "84_y_test.npy": "842e10246da26b083f33c83c8e1e8d848cc6a162139107f55c3b44b53811b547",
    "84_y_train.npy": "9a5244930714bea6fc3608d49d3affb0bb9d1739d8732b07ea20494e8fbd8131",
    "85_X_test.npy": "9b3130689696b669e2f8a02e5f623ed748f8b59db0e7bf898918f0e2a1c3f6f2",
    "85_X_train.npy": "7f207b807333755960087c6539a5bce087cbef04640f7d156c1247483143eb74",
    "85_y_test.npy": "49770164338f4a6e915dc6f57ba8fa3ae20fc1216bb46e32d57fbf83fd2119e2",
    "85_y_train.npy": "9b61391c1b9e024e7601a87522ee0a2ba06610cf839910bbf58e3f7d94e2cb73",
    "86_X_test.npy": "0f3db6805b809356eae64e71eb404cd1f89e729dc3229d8ec25e301c1f3968c9",
    "86_X_train.npy": "d8824a1900a880757c480a6c8f2ae13ca86f552f6f0b01d1f43c008925f2d6aa",
    "86_y_test.npy": "cc0457b6829f98c942bcb269b987511664a1d2b4d35f1c5d3aaeb58792d5b493",
    "86_y_train.npy": "741439040da48377272d517702537c7bf30ae07cc28e5dee02bc429bb8dbde99",
    "87_X_test.npy": "c47d12b6d3672d15e913ccc8478e49989315484a9074e8a1315ba0ab89a276f9",
    "87_X_train.npy": "d01ced9bf88620b42ca8cde83f9ddf1174a4fa2d3d6386e63438c49d36a1db3b",
    "87_y_test.npy": "3eed09c905f91539ea37459a80f61e9c13d93af6ced6e7658d563c5b188ccc58",
    "87_y_train.npy": "91fddc19a125ac00f58c38b66253d3a3262ecae7913eb7e9ac9fa1fe470f4107",
}


def _remote(name: str) -> RemoteFile:
    return RemoteFile(folder=FOLDER, name=name, url=_BASE_URL + name, sha256=SHA256[name])


def _parse_npy(content: bytes, source: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(content), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{source}: not a readable .npy array ({err})") from err


def _parse_task(x: np.ndarray, y: np.ndarray, x_source: str, y_source: str) -> tuple[np.ndarray, np.ndarray]:
    """Check one task's ``(X, y)`` arrays; return float64 ``X (N, 180)`` and ``y (N, 1)`` in {0, 1}."""
    if x.ndim != 2 or x.shape[1] != N_FEATURES:
        raise ValueError(f"{x_source}: expected a 2-D array with {N_FEATURES} columns, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
        raise ValueError(f"{x_source}: inputs must be finite numbers (dtype {x.dtype})")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"{y_source}: expected {x.shape[0]} labels (one per row of {x_source}), got shape {y.shape}"
        )
    if not np.issubdtype(y.dtype, np.number) or not np.all(np.isin(y, (0, 1))):
        raise ValueError(f"{y_source}: labels must be 0 or 1, found {np.unique(y)[:10].tolist()}")
    return x.astype(np.float64, copy=False), y.astype(np.float64).reshape(-1, 1)


def load_chemical(
    root: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    download: bool = True,
) -> MultiTaskDataset:
    """The ten Chemical tasks ``"83", "78", ..., "55"`` (per-task inputs, binary).

    Args:
        root: data root holding ``chemical/{task}_{X,y}_{train,test}.npy``;
            ``None`` means ``$LIGHTNING_ETAP_DATA`` or the per-user cache dir.
        seed: seed of the validation split drawn from each train file.
        val_fraction: fraction of each task's train file used for validation
            (stratified by label).
        download: fetch missing files from the origin (or the mirror) with a
            sha256 check.

    Returns:
        A :class:`MultiTaskDataset`; every split of every task is
        ``(inputs float32 (N, 180) of 0/1, targets float32 (N, 1) of 0/1)``.

    Raises:
        FileNotFoundError, ChecksumError, DownloadError: see
            :func:`lightning_etap.data._download.read_verified`.
        ValueError: a bad fraction, or a file that is not the expected array.
    """
    check_fractions(val_fraction)
    generator = torch.Generator().manual_seed(int(seed))
    splits: dict[str, TaskSplits] = {}
    for task in TASKS:
        arrays: dict[str, np.ndarray] = {}
        paths: dict[str, str] = {}
        for kind in ("X_train", "y_train", "X_test", "y_test"):
            path, content = read_verified(root, _remote(f"{task}_{kind}.npy"), download=download)
            paths[kind] = str(path)
            arrays[kind] = _parse_npy(content, str(path))
        x_train, y_train = _parse_task(
            arrays["X_train"], arrays["y_train"], paths["X_train"], paths["y_train"]
        )
        x_test, y_test = _parse_task(arrays["X_test"], arrays["y_test"], paths["X_test"], paths["y_test"])
        index = split_rows(
            torch.from_numpy(y_train), task=task, generator=generator,
            val_fraction=val_fraction, test_fraction=None, stratify=True,
        )
        parts = take_rows(x_train, y_train, index)
        parts.update(take_rows(x_test, y_test, {"test": torch.arange(len(y_test))}))
        splits[task] = TaskSplits(**parts)
    return MultiTaskDataset(
        name="chemical",
        task_names=TASKS,
        task_kinds=("binary",) * len(TASKS),
        layout="per_task",
        splits=splits,
        metadata={
            "seed": int(seed),
            "val_fraction": float(val_fraction),
            "val_split": "stratified fraction of each task's released train file",
            "source": _BASE_URL,
            "source_sha256": {f"{FOLDER}/{name}": digest for name, digest in sorted(SHA256.items())},
        },
    )
