"""The `lightning-etap` command's plumbing (the pipeline itself: tests/test_pipeline.py)."""

from __future__ import annotations

import subprocess
import sys

from lightning_etap.cli import main


def test_console_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "lightning_etap.cli", "--version"],
                         capture_output=True, text=True, check=True)
    assert "lightning-etap" in res.stdout


def test_datasets_lists_every_dataset(capsys, tmp_path):
    assert main(["datasets", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out
    for name in ("chemical", "digits", "ettm1", "landmine", "parkinsons", "school"):
        assert f"  {name}" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


def test_unknown_command_is_one_line(capsys):
    assert main(["fly"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightning-etap: error: argument COMMAND: invalid choice: 'fly'") and "\n" not in err


def test_a_ray_address_without_the_ray_executor_is_said_not_to_be_used(capsys, tmp_path):
    """--ray-address with the default executor trained locally in silence (the config recorded both)."""
    assert main(["select", "--dataset", "digits", "--ray-address", "auto", "-o", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "ray_address 'auto' is not used: the executor is 'processes' (add --executor ray" in err


def test_dataset_options_with_an_own_model_are_said_not_to_be_used(capsys, tmp_path):
    """They were ignored in silence (the reference model's recipe and preset are refused with a clear line)."""
    config = tmp_path / "own.yaml"
    config.write_text("model: own_module:build_model\ndatamodule: own_module:build_datamodule\ntasks: [a, b, c]\n"
                      "shared: encoder\ndataset_options: {foo: 1}\n")
    assert main(["select", "-c", str(config), "-o", str(tmp_path / "run")]) == 2
    assert "dataset_options {'foo': 1} are not used: they configure the built-in datasets' loaders" in \
        capsys.readouterr().err
