"""Commands stop on the project's errors with one ``error:`` message and its exit status, not a traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO, clear_world, subprocess_env
from mapsage_ds import cli
from mapsage_ds.cli import convert, evaluate
from mapsage_ds.errors import ConfigError, DataError, FailedOnAnotherRank, MissingFileError, StorageError
from mapsage_ds.models import load_exported, read_state_dict

UNKNOWN_KEY = ["--set", "train.no_such_key=1"]


def run_script(script: str, args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], env={**subprocess_env(), **env},
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:") or line.startswith("[rank ")]


@pytest.fixture
def plain_world(monkeypatch):
    """No launcher variables and no MAPSAGE_DEBUG, whatever the environment of the test run."""
    clear_world(monkeypatch, "MAPSAGE_DEBUG")
    return monkeypatch


def raising(error: BaseException):
    """A command's ``main`` that stops on ``error``."""
    def main(argv: list[str]) -> None:
        raise error

    return main


def run_console(console, argv: list[str], monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", ["command", *argv])
    return console()


# -- the real console scripts ------------------------------------------------------------------


def test_config_error_is_one_line_with_exit_status_2():
    result = run_script("finetune.py", UNKNOWN_KEY)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = error_lines(result.stderr)
    assert "'train.no_such_key'" in line and "valid keys here" in line


def test_mapsage_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "no_report"  # leaderboard.py: the quickest command to start
    assert run_script("leaderboard.py", [str(missing)]).returncode == 2
    debugged = run_script("leaderboard.py", [str(missing)], MAPSAGE_DEBUG="1")
    assert debugged.returncode == 1  # the uncaught exception's status
    assert "Traceback (most recent call last)" in debugged.stderr
    assert f"mapsage_ds.errors.MissingFileError: no evaluation report at {missing}" in debugged.stderr
    assert not error_lines(debugged.stderr)


@pytest.mark.slow
def test_config_error_under_torchrun_is_printed_once_by_rank_zero():
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "scripts" / "finetune.py"), *UNKNOWN_KEY]
    result = subprocess.run(command, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert [line for line in output.splitlines() if "train.no_such_key" in line] == error_lines(output), output
    [line] = error_lines(output)
    assert line.startswith("error: unknown config key 'train.no_such_key'")
    # torchrun prints its own ChildFailedError summary; no rank printed a traceback of ours.
    assert "mapsage_ds/" not in output and "ConfigError" not in output, output[-4000:]


# -- console() in this process ---------------------------------------------------------------


def test_missing_model_names_the_path_and_debug_flag_lets_the_exception_through(tiny_tree, tmp_path, plain_world,
                                                                                  capsys):
    argv = ["--model", str(tmp_path / "no_such_export"), "--data-root", str(tiny_tree), "--accelerator", "cpu"]
    assert run_console(evaluate.console, argv, plain_world) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line == f"error: --model {tmp_path / 'no_such_export'}: no such directory"

    # --debug is taken off the command line (the parser does not know it) and the error propagates.
    with pytest.raises(MissingFileError, match="no_such_export"):
        run_console(evaluate.console, [*argv, "--debug"], plain_world)
    assert not error_lines(capsys.readouterr().err)


def test_garbage_safetensors_is_a_data_error_naming_the_file(tmp_path, plain_world, capsys):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors header" * 8)
    assert run_console(convert.console, [str(garbage), str(tmp_path / "out")], plain_world) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith(f"error: {garbage}: not a valid safetensors file (") and "header" in line

    # Truncated: the header promises more bytes than the file holds.
    truncated = tmp_path / "truncated.safetensors"
    save_file({"weight": torch.zeros(64)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-32])
    with pytest.raises(DataError, match=re.escape(f"{truncated}: not a valid safetensors file")):
        read_state_dict(truncated)

    # An export directory goes through transformers' from_pretrained, which names no file: checked first.
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"model_type": "segformer"}))
    (export / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    garbage.rename(export / "model.safetensors")
    with pytest.raises(DataError, match=re.escape(f"{export / 'model.safetensors'}: not a valid safetensors file")):
        load_exported(export)


def test_each_error_is_printed_once_across_ranks(plain_world, capsys):
    plain_world.setattr(cli, "SILENT_RANK_EXIT_DELAY_S", 0.2)
    local = StorageError("/runs/a/checkpoints: disk full")
    shared = ConfigError("unknown config key 'x'")
    shared.same_on_every_rank = True
    for error in (local, shared, FailedOnAnotherRank(0, exit_status=2)):
        for rank in (0, 1):
            plain_world.setenv("RANK", str(rank))
            plain_world.setenv("WORLD_SIZE", "2")
            start = time.monotonic()
            assert run_console(cli.as_console(raising(error)), [], plain_world) == error.exit_status
            printed, waited = capsys.readouterr().err, time.monotonic() - start
            if error is local:
                assert printed == f"[rank {rank}] error: /runs/a/checkpoints: disk full\n"
            elif error is shared and rank == 0:
                assert printed == "error: unknown config key 'x'\n"
            else:  # a silent rank waits so that the launcher does not stop the printing one first
                assert printed == "" and waited >= 0.2

    plain_world.setenv("RANK", "0")
    plain_world.setenv("WORLD_SIZE", "1")
    assert run_console(cli.as_console(raising(local)), [], plain_world) == 1
    assert capsys.readouterr().err == "error: /runs/a/checkpoints: disk full\n"


def test_unexpected_exceptions_keep_their_traceback_and_argparse_errors_exit_2(plain_world, capsys):
    with pytest.raises(KeyError):
        run_console(cli.as_console(raising(KeyError("a bug"))), [], plain_world)
    with pytest.raises(SystemExit) as exited:
        run_console(evaluate.console, ["--no-such-flag"], plain_world)
    assert exited.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
