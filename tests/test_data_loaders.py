"""The real-dataset loaders against independent readings of the shared source files.

Every reference here is computed straight from the raw file with different
code (line-by-line parsing, ``numpy.genfromtxt``, ``csv``), not with the
loaders' own helpers.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import shutil
from collections import Counter

import numpy as np
import pytest
import scipy.io
import torch

from lightning_etap.data._download import ENV_DATA, ENV_MIRROR, ChecksumError
from lightning_etap.data.base import SPLITS
from lightning_etap.data.chemical import SHA256 as CHEMICAL_SHA256
from lightning_etap.data.chemical import TASKS as CHEMICAL_TASKS
from lightning_etap.data.chemical import _parse_npy, _parse_task, load_chemical
from lightning_etap.data.digits import load_digits
from lightning_etap.data.ettm1 import _parse as parse_ettm1
from lightning_etap.data.ettm1 import load_ettm1
from lightning_etap.data.landmine import _parse as parse_landmine
from lightning_etap.data.landmine import load_landmine
from lightning_etap.data.parkinsons import _parse as parse_parkinsons
from lightning_etap.data.parkinsons import load_parkinsons
from lightning_etap.data.registry import load_dataset
from lightning_etap.data.school import FEATURE_NAMES, load_school
from lightning_etap.data.school import _parse as parse_school

# sha256 of the stored files, as published in ../shared/data/README.md
README_SHA256 = {
    "school/ILEA567.DAT": "57bbbfd28db39a1383661fdce8719fa8f5b29ec6d0881292ade5f2d8c3774a68",
    "parkinsons/parkinsons_updrs.data": "f2c7d5025dec4e92e7feae367a5f7ccf58789a10ac6b54bdf15976c599f9dd39",
    "landmine/LandmineData.mat": "2163ab20a80e33a8b65593c48cf283c540599dcb291105e63fa4af2ce24c2bea",
    "ettm1/ETTm1.csv.gz": "05b083c9817b620c9b8771d26ca4a9f70eec0fb32e7a4d5c8f4553e20aaf2e33",
}
ETTM1_CSV_SHA256 = "6ce1759b1a18e3328421d5d75fadcb316c449fcd7cec32820c8dafda71986c9e"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(ENV_DATA, raising=False)
    monkeypatch.delenv(ENV_MIRROR, raising=False)


# one load per module: the loaders are fast, but six datasets add up
@pytest.fixture(scope="module")
def chemical(shared_data):
    return load_chemical(shared_data, download=False)


@pytest.fixture(scope="module")
def school(shared_data):
    return load_school(shared_data, download=False)


@pytest.fixture(scope="module")
def parkinsons(shared_data):
    return load_parkinsons(shared_data, download=False)


@pytest.fixture(scope="module")
def landmine(shared_data):
    return load_landmine(shared_data, download=False)


@pytest.fixture(scope="module")
def ettm1(shared_data):
    return load_ettm1(shared_data, download=False, train_stride=1)


@pytest.fixture(scope="module")
def all_datasets(chemical, school, parkinsons, landmine, ettm1):
    return {"chemical": chemical, "school": school, "parkinsons": parkinsons, "landmine": landmine,
            "ettm1": ettm1, "digits": load_digits()}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rows_of(ds, task, split):
    x, y = ds.split(task, split)
    return {tuple(r) for r in torch.cat([x, y], 1).tolist()}


# ----------------------------------------------------------------------------- shape facts
EXPECTED = {  # name: (n tasks, layout, kind, feature dim, target dim)
    "chemical": (10, "per_task", "binary", 180, 1),
    "school": (139, "per_task", "regression", 27, 1),
    "parkinsons": (42, "per_task", "regression", 19, 1),
    "landmine": (29, "per_task", "binary", 9, 1),
    "ettm1": (7, "shared", "regression", 48 * 7, 24),
    "digits": (10, "shared", "binary", 16, 1),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts_shapes_and_label_ranges(all_datasets, name):
    ds = all_datasets[name]
    n_tasks, layout, kind, dim, target_dim = EXPECTED[name]
    assert ds.name == name and ds.n_tasks == n_tasks and ds.layout == layout
    assert set(ds.task_kinds) == {kind}
    assert ds.feature_dim == dim
    checked: set[int] = set()  # shared-layout inputs are one tensor per split: check it once
    for task in ds.task_names:
        for split in SPLITS:
            x, y = ds.split(task, split)
            assert x.dtype == torch.float32 and y.dtype == torch.float32
            assert x.shape[0] == y.shape[0] > 0, (task, split)
            assert x.shape[1] == dim and y.shape[1] == target_dim
            assert torch.isfinite(y).all()
            if id(x) not in checked:
                checked.add(id(x))
                assert torch.isfinite(x).all()
            if kind == "binary":
                assert set(torch.unique(y).tolist()) <= {0.0, 1.0}
        if kind == "binary" and name != "digits":
            for split in SPLITS:  # stratified: both classes in every split
                assert set(torch.unique(ds.split(task, split)[1]).tolist()) == {0.0, 1.0}, (task, split)


def test_task_names_and_order(chemical, school, parkinsons, landmine, ettm1):
    assert chemical.task_names == ("83", "78", "84", "85", "76", "86", "81", "80", "87", "55")
    assert school.task_names[0] == "school_001" and school.task_names[-1] == "school_139"
    assert parkinsons.task_names[0] == "subject_01" and parkinsons.task_names[-1] == "subject_42"
    assert landmine.task_names[0] == "field_01" and landmine.task_names[-1] == "field_29"
    assert ettm1.task_names == ("HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT")


def test_registry_names_the_loaders(shared_data):
    ds = load_dataset("Landmine", root=str(shared_data), download=False, seed=3)
    assert ds.name == "landmine" and ds.metadata["seed"] == 3


# ----------------------------------------------------------------------------- checksums
def test_source_checksums_match_readme_and_files(shared_data, chemical, school, parkinsons, landmine, ettm1):
    for rel, digest in README_SHA256.items():
        assert sha256(shared_data / rel) == digest, rel
    assert school.metadata["source_sha256"] == {"school/ILEA567.DAT": README_SHA256["school/ILEA567.DAT"]}
    assert parkinsons.metadata["source_sha256"]["parkinsons/parkinsons_updrs.data"] == README_SHA256[
        "parkinsons/parkinsons_updrs.data"]
    assert landmine.metadata["source_sha256"]["landmine/LandmineData.mat"] == README_SHA256[
        "landmine/LandmineData.mat"]
    csv_bytes = gzip.decompress((shared_data / "ettm1" / "ETTm1.csv.gz").read_bytes())
    assert hashlib.sha256(csv_bytes).hexdigest() == ETTM1_CSV_SHA256
    assert ettm1.metadata["source_sha256"] == {"ettm1/ETTm1.csv": ETTM1_CSV_SHA256}
    files = sorted(p.name for p in (shared_data / "chemical").glob("*.npy"))
    assert files == sorted(CHEMICAL_SHA256) and len(files) == 40
    for name in files:
        assert sha256(shared_data / "chemical" / name) == CHEMICAL_SHA256[name], name
    assert len(chemical.metadata["source_sha256"]) == 40


def test_loader_refuses_a_corrupted_copy(shared_data, tmp_path):
    (tmp_path / "landmine").mkdir()
    data = bytearray((shared_data / "landmine" / "LandmineData.mat").read_bytes())
    data[-100] ^= 0x01
    (tmp_path / "landmine" / "LandmineData.mat").write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as info:
        load_landmine(tmp_path, download=False)
    msg = str(info.value)
    assert "LandmineData.mat" in msg and README_SHA256["landmine/LandmineData.mat"] in msg
    assert hashlib.sha256(bytes(data)).hexdigest() in msg and "Delete" in msg


def test_loader_missing_file_error(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_school(tmp_path, download=False)
    msg = str(info.value)
    assert str(tmp_path / "school" / "ILEA567.DAT") in msg
    assert "`root`" in msg and ENV_DATA in msg and "download=True" in msg


def test_loader_downloads_from_a_file_mirror(shared_data, tmp_path, monkeypatch, parkinsons):
    mirror = tmp_path / "mirror"
    (mirror / "parkinsons").mkdir(parents=True)
    shutil.copy(shared_data / "parkinsons" / "parkinsons_updrs.data", mirror / "parkinsons")
    monkeypatch.setenv(ENV_MIRROR, mirror.as_uri() + "/")
    root = tmp_path / "root"
    ds = load_parkinsons(root)
    landed = root / "parkinsons" / "parkinsons_updrs.data"
    assert sorted(p.name for p in landed.parent.iterdir()) == [landed.name]
    assert sha256(landed) == README_SHA256["parkinsons/parkinsons_updrs.data"]
    for task in ds.task_names:
        for split in SPLITS:
            got, ref = ds.split(task, split), parkinsons.split(task, split)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_shared_folder_works_as_a_mirror(shared_data, tmp_path, monkeypatch, chemical):
    monkeypatch.setenv(ENV_MIRROR, str(shared_data))  # a data root doubles as a mirror
    ds = load_chemical(tmp_path)
    assert sorted(p.name for p in (tmp_path / "chemical").iterdir()) == sorted(CHEMICAL_SHA256)
    for task in ds.task_names:
        assert torch.equal(ds.split(task, "val")[0], chemical.split(task, "val")[0])


def test_ettm1_mirror_serving_gzip_and_wrong_bytes(shared_data, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror" / "ettm1"
    mirror.mkdir(parents=True)
    (mirror / "ETTm1.csv").write_bytes(b"date,HUFL\n")  # wrong bytes under the preferred name
    monkeypatch.setenv(ENV_MIRROR, str(tmp_path / "mirror"))
    with pytest.raises(ChecksumError, match="ETTm1.csv"):
        load_ettm1(tmp_path / "root")
    assert list((tmp_path / "root" / "ettm1").iterdir()) == []
    (mirror / "ETTm1.csv").unlink()
    shutil.copy(shared_data / "ettm1" / "ETTm1.csv.gz", mirror)
    ds = load_ettm1(tmp_path / "root", input_len=8, horizon=4, stride=50, train_stride=50)
    assert (tmp_path / "root" / "ettm1" / "ETTm1.csv.gz").is_file() and ds.n_tasks == 7


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("loader", [load_chemical, load_school, load_parkinsons, load_landmine])
def test_splits_are_deterministic_in_the_seed(shared_data, loader):
    a, b, c = (loader(shared_data, seed=s, download=False) for s in (7, 7, 8))
    assert a.metadata == b.metadata and a.metadata["seed"] == 7
    differs = False
    for task in a.task_names:
        for split in SPLITS:
            xa, ya = a.split(task, split)
            xb, yb = b.split(task, split)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
            xc, yc = c.split(task, split)
            differs |= xa.shape != xc.shape or not torch.equal(xa, xc) or not torch.equal(ya, yc)
    assert differs


# ----------------------------------------------------------------------------- Chemical
def test_chemical_uses_the_released_files(shared_data, chemical):
    for task in CHEMICAL_TASKS:
        x_test = np.load(shared_data / "chemical" / f"{task}_X_test.npy")
        y_test = np.load(shared_data / "chemical" / f"{task}_y_test.npy")
        xt, yt = chemical.split(task, "test")
        assert np.array_equal(xt.numpy(), x_test) and np.array_equal(yt.numpy()[:, 0], y_test)
        x_train = np.load(shared_data / "chemical" / f"{task}_X_train.npy")
        y_train = np.load(shared_data / "chemical" / f"{task}_y_train.npy")
        both = np.concatenate([np.column_stack([x.numpy(), y.numpy()])
                               for x, y in (chemical.split(task, "train"), chemical.split(task, "val"))])
        ref = np.column_stack([x_train, y_train])
        assert both.shape == ref.shape
        assert Counter(map(tuple, both.tolist())) == Counter(map(tuple, ref.tolist()))
        n_val = chemical.n_examples(task, "val")
        assert abs(n_val - 0.1 * len(y_train)) <= 2  # 10 % stratified, rounded per class
        pos = chemical.split(task, "val")[1].mean().item()
        assert abs(pos - y_train.mean()) < 0.05
    assert chemical.metadata["val_fraction"] == 0.1


# ----------------------------------------------------------------------------- School
def reference_school(path):
    """Line-by-line reading of ILEA567.DAT.

    Returns school -> list of (year, score, fsm, vr1, gender, band, eth, school gender, denomination).
    """
    out: dict[int, list[tuple[int, ...]]] = {}
    with open(path, "rb") as fh:
        for raw in fh:
            line = raw.decode("ascii", errors="replace").rstrip("\r\n")
            if not line[:1].isdigit():
                continue
            rec = (int(line[0]), int(line[4:6]), int(line[6:8]), int(line[8:10]), int(line[10]),
                   int(line[11]), int(line[12:14]), int(line[14]), int(line[15]))
            out.setdefault(int(line[1:4]), []).append(rec)
    return out


def test_school_matches_a_line_by_line_reading(shared_data):
    ref = reference_school(shared_data / "school" / "ILEA567.DAT")
    assert sum(map(len, ref.values())) == 15362 and sorted(ref) == list(range(1, 140))
    ds = load_school(shared_data, download=False, standardize_target=False)
    assert ds.metadata["target_mean"] == 0.0 and ds.metadata["target_std"] == 1.0
    col = {n: i for i, n in enumerate(FEATURE_NAMES)}
    total = 0
    for code, recs in ref.items():
        task = f"school_{code:03d}"
        x = torch.cat([ds.split(task, s)[0] for s in SPLITS]).numpy()
        y = torch.cat([ds.split(task, s)[1] for s in SPLITS]).numpy()[:, 0]
        total += len(y)
        assert sorted(y.tolist()) == sorted(float(r[1]) for r in recs)
        assert np.allclose(x.sum(0)[col["female"]], sum(r[4] for r in recs))
        assert np.allclose(x.sum(0)[col["year_1987"]], sum(r[0] == 3 for r in recs))
        assert np.allclose(x.sum(0)[col["vr_band_1"]], sum(r[5] == 2 for r in recs))  # file code 2 = VR1
        assert np.allclose(x.sum(0)[col["eth_caribbean"]], sum(r[6] == 5 for r in recs))
        assert np.allclose(x.sum(0)[col["denom_roman_catholic"]], sum(r[8] == 3 for r in recs))
        # every categorical group is one-hot (VR band: all zero when unknown, code 0)
        for group, size in (("year_", 3), ("eth_", 11), ("school_", 3), ("denom_", 3)):
            cols = [i for n, i in col.items() if n.startswith(group)]
            assert len(cols) == size and np.all(x[:, cols].sum(1) == 1)
        bands = x[:, [col["vr_band_1"], col["vr_band_2"], col["vr_band_3"]]].sum(1)
        assert np.sum(bands == 0) == sum(r[5] == 0 for r in recs)
    assert total == 15362 and ds.metadata["n_students"] == 15362


def test_school_standardisation_uses_pooled_training_rows(school):
    x = torch.cat([school.split(t, "train")[0] for t in school.task_names]).double()
    y = torch.cat([school.split(t, "train")[1] for t in school.task_names]).double()
    for name in ("fsm_pct", "vr1_pct"):
        c = FEATURE_NAMES.index(name)
        assert abs(x[:, c].mean().item()) < 1e-5 and abs(x[:, c].std(unbiased=False).item() - 1) < 1e-5
    assert abs(y.mean().item()) < 1e-5 and abs(y.std(unbiased=False).item() - 1) < 1e-5
    assert 15 < school.metadata["target_mean"] < 30 and school.metadata["target_std"] > 5
    binary = [i for i, n in enumerate(FEATURE_NAMES) if n not in ("fsm_pct", "vr1_pct")]
    assert set(torch.unique(x[:, binary]).tolist()) == {0.0, 1.0}


def test_school_split_sizes(school):
    for task in school.task_names:
        n = sum(school.n_examples(task, s) for s in SPLITS)
        assert school.n_examples(task, "test") == max(1, round(0.2 * n))


# ----------------------------------------------------------------------------- Parkinson's
def test_parkinsons_matches_genfromtxt(shared_data):
    path = shared_data / "parkinsons" / "parkinsons_updrs.data"
    header = path.read_text().splitlines()[0].split(",")
    raw = np.genfromtxt(path, delimiter=",", skip_header=1)
    assert raw.shape == (5875, 22)
    cols = ["age", "sex", "test_time", *header[6:]]
    ds = load_parkinsons(shared_data, download=False, target="total_UPDRS", standardize_target=False)
    mean, std = np.array(ds.metadata["feature_mean"]), np.array(ds.metadata["feature_std"])
    assert ds.metadata["feature_names"] == cols
    for s in range(1, 43):
        mine = raw[raw[:, 0] == s]
        features = mine[:, [header.index(c) for c in cols]]
        ref = np.column_stack([features, mine[:, header.index("total_UPDRS")]])
        task = f"subject_{s:02d}"
        x = torch.cat([ds.split(task, sp)[0] for sp in SPLITS]).double().numpy() * std + mean
        y = torch.cat([ds.split(task, sp)[1] for sp in SPLITS]).double().numpy()
        got = np.column_stack([x, y])
        order_ref = np.lexsort(ref.T[::-1])
        order_got = np.lexsort(got.T[::-1])
        assert np.allclose(got[order_got], ref[order_ref], rtol=1e-5, atol=1e-5), task


def test_parkinsons_standardised_and_disjoint(parkinsons):
    x = torch.cat([parkinsons.split(t, "train")[0] for t in parkinsons.task_names]).double()
    y = torch.cat([parkinsons.split(t, "train")[1] for t in parkinsons.task_names]).double()
    assert x.mean(0).abs().max() < 1e-5 and (x.std(0, unbiased=False) - 1).abs().max() < 1e-4
    assert abs(y.mean().item()) < 1e-5 and parkinsons.metadata["target"] == "motor_UPDRS"
    for task in parkinsons.task_names:  # recordings are unique rows, so splits must not share any
        tr, va, te = (rows_of(parkinsons, task, s) for s in SPLITS)
        assert not (tr & va) and not (tr & te) and not (va & te)


def test_parkinsons_unknown_target(shared_data):
    with pytest.raises(ValueError, match="motor_UPDRS"):
        load_parkinsons(shared_data, target="UPDRS", download=False)


# ----------------------------------------------------------------------------- Landmine
def test_landmine_matches_loadmat(shared_data, landmine):
    mat = scipy.io.loadmat(shared_data / "landmine" / "LandmineData.mat")
    mean, std = np.array(landmine.metadata["feature_mean"]), np.array(landmine.metadata["feature_std"])
    for m in range(29):
        feats, labels = mat["feature"][0, m], mat["label"][0, m].ravel()
        task = f"field_{m + 1:02d}"
        x = torch.cat([landmine.split(task, s)[0] for s in SPLITS]).double().numpy() * std + mean
        y = torch.cat([landmine.split(task, s)[1] for s in SPLITS]).numpy()[:, 0]
        assert len(y) == len(labels) and y.sum() == labels.sum()
        assert np.allclose(np.sort(x, axis=0), np.sort(feats, axis=0), atol=1e-5)
        n_unique = len({tuple(r) for r in feats.tolist()})
        if n_unique == len(feats):
            tr, va, te = (rows_of(landmine, task, s) for s in SPLITS)
            assert not (tr & va) and not (tr & te) and not (va & te)
    x = torch.cat([landmine.split(t, "train")[0] for t in landmine.task_names]).double()
    assert x.mean(0).abs().max() < 1e-5 and (x.std(0, unbiased=False) - 1).abs().max() < 1e-4


# ----------------------------------------------------------------------------- ETTm1
def reference_ettm1(shared_data):
    with gzip.open(shared_data / "ettm1" / "ETTm1.csv.gz", "rt") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["date", "HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    values = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    train = values[:34560]
    return (values - train.mean(0)) / train.std(0)


def test_ettm1_windows_follow_the_standard_split(shared_data, ettm1):
    z = reference_ettm1(shared_data)
    assert z.shape == (69680, 7)
    L, H = 48, 24
    counts = {"train": 34560 - L - H + 1, "val": 11520 - H + 1, "test": 11520 - H + 1}
    assert ettm1.metadata["n_windows"] == counts
    target_start = {"train": L, "val": 34560, "test": 46080}  # first target row of each split
    for split, first in target_start.items():
        x, _ = ettm1.split("OT", split)
        assert x.shape == (counts[split], L * 7)
        for k in (0, 1, counts[split] // 2, counts[split] - 1):
            s = first + k
            assert np.allclose(x[k].numpy(), z[s - L:s].ravel(), atol=1e-5)
            for j, task in enumerate(ettm1.task_names):
                assert np.allclose(ettm1.split(task, split)[1][k].numpy(), z[s:s + H, j], atol=1e-5)
    # the last test target is the last row of month 20; val targets never reach into test
    assert target_start["val"] + counts["val"] - 1 + H == 46080
    assert target_start["test"] + counts["test"] - 1 + H == 57600


def test_ettm1_shares_inputs_and_standardises(ettm1):
    for split in SPLITS:
        first = ettm1.split("HUFL", split)[0]
        assert all(ettm1.split(t, split)[0] is first for t in ettm1.task_names)
    x = ettm1.split("HUFL", "train")[0].double().reshape(-1, 48, 7)[:, -1, :]  # every train row once...
    assert x.mean(0).abs().max() < 0.01 and (x.std(0) - 1).abs().max() < 0.01  # ...but the first 48
    assert ettm1.metadata["train_stride"] == 1 and ettm1.metadata["stride"] == 1


def test_ettm1_default_and_custom_strides(shared_data, ettm1):
    ds = load_ettm1(shared_data, download=False)
    assert ds.metadata["train_stride"] == 4 and ds.metadata["stride"] == 1
    assert torch.equal(ds.split("OT", "train")[0], ettm1.split("OT", "train")[0][::4])
    assert torch.equal(ds.split("LULL", "train")[1], ettm1.split("LULL", "train")[1][::4])
    assert torch.equal(ds.split("OT", "test")[0], ettm1.split("OT", "test")[0])
    thin = load_ettm1(shared_data, download=False, input_len=96, horizon=12, stride=10, train_stride=7)
    assert thin.feature_dim == 96 * 7 and thin.target_dim("OT") == 12
    assert thin.metadata["n_windows"] == {"train": (34560 - 96 - 12) // 7 + 1, "val": (11520 - 12) // 10 + 1,
                                          "test": (11520 - 12) // 10 + 1}
    with pytest.raises(ValueError, match="stride"):
        load_ettm1(shared_data, download=False, stride=0)


def test_ettm1_reads_plain_csv_too(shared_data, tmp_path, ettm1):
    (tmp_path / "ettm1").mkdir()
    (tmp_path / "ettm1" / "ETTm1.csv").write_bytes(gzip.decompress((shared_data / "ettm1" / "ETTm1.csv.gz")
                                                                   .read_bytes()))
    ds = load_ettm1(tmp_path, download=False, train_stride=1)
    for split in SPLITS:
        assert torch.equal(ds.split("OT", split)[0], ettm1.split("OT", split)[0])
        assert torch.equal(ds.split("HULL", split)[1], ettm1.split("HULL", split)[1])
    assert ds.metadata == ettm1.metadata


# ----------------------------------------------------------------------------- malformed files
def test_malformed_school_file():
    good = b"1  117241803 111\r\n"
    with pytest.raises(ValueError, match=r"bad\.DAT: line 2 has 15 characters"):
        parse_school(good + b"1  11724180 111\r\n\x1a", "bad.DAT")
    with pytest.raises(ValueError, match=r"bad\.DAT: line 1 .*neither a digit"):
        parse_school(b"1  1172418x3 111\r\n", "bad.DAT")
    with pytest.raises(ValueError, match=r"bad\.DAT: line 1: field 'ethnic' = 12"):
        parse_school(b"1  1172418031211\r\n", "bad.DAT")
    with pytest.raises(ValueError, match=r"bad\.DAT: no records"):
        parse_school(b"\x1a", "bad.DAT")
    fields = parse_school(good + b"\x1a", "ok.DAT")
    assert fields["school"].tolist() == [1] and fields["score"].tolist() == [17]
    assert fields["vr_band"].tolist() == [3] and fields["ethnic"].tolist() == [1]


def test_malformed_parkinsons_file():
    header = "subject#,age,sex,test_time,motor_UPDRS,total_UPDRS"
    with pytest.raises(ValueError, match=r"p\.data: missing column\(s\) \['Jitter\(%\)'"):
        parse_parkinsons((header + "\n1,2,3,4,5,6\n").encode(), "p.data")
    voice = ",".join(["Jitter(%)", "Jitter(Abs)", "Jitter:RAP", "Jitter:PPQ5", "Jitter:DDP", "Shimmer",
                      "Shimmer(dB)", "Shimmer:APQ3", "Shimmer:APQ5", "Shimmer:APQ11", "Shimmer:DDA",
                      "NHR", "HNR", "RPDE", "DFA", "PPE"])
    full = f"{header},{voice}\n"
    row = ",".join(["1"] * 22)
    with pytest.raises(ValueError, match=r"p\.data: a field is not a number"):
        parse_parkinsons((full + row.replace("1", "x", 1)[::-1] + "\n").encode(), "p.data")
    with pytest.raises(ValueError, match=r"p\.data: line 2 has 21 fields"):
        parse_parkinsons((full + row[2:] + "\n").encode(), "p.data")


def test_malformed_landmine_file():
    with pytest.raises(ValueError, match=r"m\.mat: not a readable MATLAB"):
        parse_landmine(b"garbage", "m.mat")
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"feature": np.zeros((3, 9))})
    with pytest.raises(ValueError, match=r"m\.mat: missing variable\(s\) \['label'\]"):
        parse_landmine(buf.getvalue(), "m.mat")
    cells_f = np.empty((1, 29), dtype=object)
    cells_l = np.empty((1, 29), dtype=object)
    for m in range(29):
        cells_f[0, m] = np.zeros((4, 9))
        cells_l[0, m] = np.array([[0], [1], [0], [1]], dtype=np.uint8)
    cells_f[0, 5] = np.zeros((4, 8))
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"feature": cells_f, "label": cells_l})
    with pytest.raises(ValueError, match=r"m\.mat: feature cell 6 has shape \(4, 8\)"):
        parse_landmine(buf.getvalue(), "m.mat")


def test_malformed_ettm1_and_chemical_files():
    with pytest.raises(ValueError, match=r"e\.csv: expected the header date,HUFL"):
        parse_ettm1(b"date,A,B\n2016,1,2\n", "e.csv")
    head = b"date,HUFL,HULL,MUFL,MULL,LUFL,LULL,OT\n"
    with pytest.raises(ValueError, match=r"e\.csv: could not parse"):
        parse_ettm1(head + b"2016-07-01 00:00:00,1,2,3,4,5,6,x\n", "e.csv")
    with pytest.raises(ValueError, match=r"c\.npy: not a readable \.npy"):
        _parse_npy(b"nope", "c.npy")
    with pytest.raises(ValueError, match=r"x\.npy: expected a 2-D array with 180 columns"):
        _parse_task(np.zeros((3, 10)), np.zeros(3), "x.npy", "y.npy")
    with pytest.raises(ValueError, match=r"y\.npy: labels must be 0 or 1"):
        _parse_task(np.zeros((3, 180)), np.array([0, 1, 2]), "x.npy", "y.npy")
    with pytest.raises(ValueError, match=r"y\.npy: expected 3 labels"):
        _parse_task(np.zeros((3, 180)), np.zeros(4), "x.npy", "y.npy")


def test_bad_fractions_are_refused(shared_data):
    with pytest.raises(ValueError, match="val_fraction"):
        load_school(shared_data, val_fraction=0.0, download=False)
    with pytest.raises(ValueError, match="test_fraction"):
        load_landmine(shared_data, test_fraction=1.0, download=False)
    with pytest.raises(ValueError, match="too few"):
        load_school(shared_data, val_fraction=0.95, test_fraction=0.95, download=False)
