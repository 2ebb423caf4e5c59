"""Atomic writes: a failed write leaves the old file whole and no temporary file behind."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lightning_etap._atomic import atomic_file, atomic_write_bytes, atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_write_replaces_the_file_with_the_permissions_open_would_give(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_text(target, "one")
    assert target.read_text() == "one"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()  # mkstemp alone gives 0o600
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two" and os.listdir(target.parent) == ["a.json"]


def test_an_exception_while_writing_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="half-way"), atomic_file(target, "w") as f:
        f.write("new, but only half")
        raise RuntimeError("half-way")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["table.csv"]
    with pytest.raises(ValueError, match="mode"), atomic_file(target, "a"):
        pass


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="RLIMIT_FSIZE on Linux")
def test_a_full_disk_while_saving_over_a_saved_predictor_keeps_the_old_copy(tmp_path):
    # a write that fails part-way, as a full disk or a size limit makes it, while re-saving over the old files
    script = textwrap.dedent(f"""
        import os, resource, signal
        import numpy as np
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        from lightning_etap.affinity import AffinityResult
        from lightning_etap.groundtruth import GroupGains
        from lightning_etap.predictors import ETAPPredictor
        rng = np.random.default_rng(0)
        n = 6
        m = rng.normal(size=(n, n))
        masks = rng.random((40, n)) < 0.5
        masks[:, 0] = True
        masks = masks[masks.sum(1) >= 2]
        gains = rng.normal(size=masks.shape) * masks
        pred = ETAPPredictor(m).fit(masks, gains)
        res = AffinityResult(tuple("abcdef"), m, m[None], [0], measured_steps=1)
        folder = {str(tmp_path)!r}
        pred.save(folder + "/predictor.json")
        res.save(folder + "/affinity")
        before = open(folder + "/predictor.json").read()
        resource.setrlimit(resource.RLIMIT_FSIZE, (1500, resource.RLIM_INFINITY))
        for save in (lambda: ETAPPredictor(m * 2).fit(masks, gains).save(folder + "/predictor.json"),
                     lambda: AffinityResult(tuple("abcdef"), m * 2, np.repeat(m[None], 40, 0), list(range(40)),
                                            measured_steps=40).save(folder + "/affinity")):
            try:
                save()
                raise SystemExit("the write did not fail: the test's size limit is too high")
            except OSError:
                pass
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert open(folder + "/predictor.json").read() == before
        ETAPPredictor.load(folder + "/predictor.json")
        assert np.array_equal(AffinityResult.load(folder + "/affinity").matrix, m)
        left = sorted(os.listdir(folder)) + sorted(os.listdir(folder + "/affinity"))
        assert left == ["affinity", "predictor.json", "affinity.json", "affinity.npz"], left
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-2000:] + res.stderr[-3000:]


def test_table_and_npz_writers_go_through_it(tmp_path, monkeypatch):
    # every writer of the run directory and the saved objects uses atomic_file: a failure keeps the old file
    import lightning_etap._atomic as atomic
    from lightning_etap.predictors._persist import write_npz_document

    path = write_npz_document(tmp_path / "p.npz", "kind", {}, {}, {"a": np.arange(3)}, "0")
    old = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_npz_document(path, "kind", {}, {}, {"a": np.arange(5)}, "0")
    assert path.read_bytes() == old and sorted(os.listdir(tmp_path)) == ["p.npz"]
