"""The `lightning-etap` command: the main job and one-line user errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lightning_etap.cli import main


def test_run_digits_prints_losses_and_gains(tmp_path, capsys):
    out = tmp_path / "res.json"
    code = main(["run", "--dataset", "digits", "--tasks", "digit_3", "digit_8",
                 "--max-epochs", "3", "--output", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "digit_3" in text and "digit_8" in text and "total" in text
    payload = json.loads(out.read_text())
    rows = {r["task"]: r for r in payload["tasks"]}
    assert set(rows) == {"digit_3", "digit_8"}
    for r in rows.values():  # the printed gain is eq. 1 of the printed losses
        assert r["gain"] == pytest.approx((r["stl_loss"] - r["mtl_loss"]) / r["stl_loss"])


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "--dataset", "imagenet"], "unknown dataset"),
        (["run", "--dataset", "digits", "--tasks", "digit_42"], "unknown task"),
        (["run", "--dataset", "digits", "--preset", "nope"], "unknown preset"),
        (["run", "--dataset", "digits", "--max-epochs", "0"], "--max-epochs"),
        (["run", "--dataset", "digits", "--output", "/nonexistent/dir/x.json"], "does not exist"),
    ],
)
def test_user_errors_are_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_console_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "lightning_etap.cli", "--version"],
                         capture_output=True, text=True, check=True)
    assert "lightning-etap" in res.stdout
