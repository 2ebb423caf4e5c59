"""RayExecutor on a local Ray instance (2 CPUs). Skipped when Ray is not installed (``pip install lightning-etap[ray]``)."""

from __future__ import annotations

import os
import sys
from collections import Counter

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install lightning-etap[ray]")

from test_groundtruth import FAKES, TINY  # noqa: E402

from lightning_etap.groundtruth import (  # noqa: E402
    CollectionError,
    GainStore,
    InProcessExecutor,
    LightningGroupTrainer,
    RayExecutor,
    collect_gains,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray_fakes")
    (folder / "gt_fakes_ray.py").write_text(FAKES)
    sys.path.insert(0, str(folder))
    path = os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


def test_ray_matches_in_process_on_real_training(tmp_path, ray_session):
    trainer = LightningGroupTrainer("digits", TINY)
    groups = [("digit_0", "digit_1"), ("digit_1", "digit_2", "digit_3"), ("digit_0", "digit_3")]
    local = collect_gains(trainer, groups, seeds=[0], store=tmp_path / "local.sqlite",
                          executor=InProcessExecutor(), progress=False)
    remote = collect_gains(trainer, groups, seeds=[0], store=tmp_path / "ray.sqlite", chunk_size=2,
                           executor=RayExecutor(), progress=False)
    np.testing.assert_array_equal(local.masks, remote.masks)
    np.testing.assert_allclose(local.test_losses, remote.test_losses, rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(local.gains, remote.gains, rtol=1e-5, equal_nan=True)


def test_ray_records_failures_and_dead_workers(tmp_path, ray_session):
    import gt_fakes_ray

    trainer = gt_fakes_ray.FakeTrainer(fail_once=[("a", "b")], die_on=[("c", "d")], state_dir=str(tmp_path))
    with pytest.raises(CollectionError) as err:
        collect_gains(trainer, [("a", "b"), ("b", "c"), ("c", "d")], seeds=[0], store=tmp_path / "g.sqlite",
                      executor=RayExecutor(max_in_flight=2), retries=1, progress=False)
    assert list(err.value.failed) == [(("c", "d"), 0)]
    rows = {r["group"]: r for r in GainStore(tmp_path / "g.sqlite").rows()}
    assert rows["c|d"]["status"] == "failed" and rows["c|d"]["attempts"] == 2
    assert rows["a|b"]["status"] == "done" and rows["a|b"]["attempts"] == 2
    assert Counter(r["status"] for r in rows.values()) == Counter({"done": 6, "failed": 1})



def test_an_address_where_nothing_answers_is_refused_in_seconds_with_one_line(tmp_path):
    """ray.init retried a dead host:port for minutes (the CLI hung); a malformed address gave Ray's traceback."""
    import socket
    import subprocess
    import time

    from lightning_etap.groundtruth.executors import RayClusterError, _check_ray_address

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RayClusterError, match=rf"no Ray cluster answers at '127.0.0.1:{port}'.*ray start --head"):
        _check_ray_address(f"127.0.0.1:{port}")
    with pytest.raises(RayClusterError, match="'not an address' is not a Ray address: use 'auto'"):
        _check_ray_address("not an address")
    for fine in (None, "auto"):
        _check_ray_address(fine)
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "lightning_etap.cli", "gains", "--dataset", "digits", "--executor",
                          "ray", "--ray-address", f"127.0.0.1:{port}", "--train-groups", "2", "--measure-all",
                          "false", "--max-epochs", "2", "--no-progress", "-o", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and time.monotonic() - start < 120, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert f"lightning-etap: error: no Ray cluster answers at '127.0.0.1:{port}'" in res.stderr


def test_a_cluster_without_the_cpus_a_job_asks_for_is_said(tmp_path, ray_session, monkeypatch):
    """Jobs that no node can run waited forever in silence (only Ray's autoscaler lines)."""
    import gt_fakes_ray

    # a head started with --num-cpus=0 and a 1-CPU node (the cluster's total would be enough for num_cpus=1)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 0.0}},
                                               {"Alive": True, "Resources": {"CPU": 0.5}},
                                               {"Alive": False, "Resources": {"CPU": 8.0}}])
    with pytest.warns(RuntimeWarning, match=r"no node of the Ray cluster has num_cpus=1 CPU\(s\) for a job now \(the "
                                            r"largest has 0.5\)"):
        collect_gains(gt_fakes_ray.FakeTrainer(), [("a", "b")], seeds=[0], store=tmp_path / "g.sqlite",
                      executor=RayExecutor(), progress=False)


def test_sigterm_during_a_ray_collection_stops_like_ctrl_c(tmp_path):
    """ray.init put its own SIGTERM handler (sys.exit) in place of the command's: a scheduler's stop during a Ray
    collection exited 15 with Ray's C++ noise instead of the clean 'terminated' line and 143."""
    import signal
    import subprocess
    import time

    log = tmp_path / "err.log"
    argv = [sys.executable, "-m", "lightning_etap.cli", "gains", "--dataset", "digits", "--executor", "ray",
            "--train-groups", "20", "--measure-all", "false", "-o", str(tmp_path / "run")]
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "RAY_ADDRESS": ""})
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and " 1/" not in log.read_text():
            time.sleep(0.05)  # the first job is back: Ray is up, the others run
        assert proc.poll() is None, log.read_text()[-2000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    text = log.read_text()
    assert proc.returncode == 143, text[-2000:]
    assert f"lightning-etap: terminated (SIGTERM); finished work is kept in {tmp_path / 'run'}" in text
