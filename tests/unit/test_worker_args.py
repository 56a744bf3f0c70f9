"""The worker's command line: the quick reading of a local worker's options agrees with
argparse's, and leaves every other command line to argparse."""

from __future__ import annotations

import pytest

from distexec import worker

# LocalManager.launch starts each worker with these (see distexec/managers/local.py).
LOCAL = ["--bind", "127.0.0.1", "--parent-death", "--unix"]

quick_cases = [
    [],
    LOCAL,
    ["--unix", "--bind", "0.0.0.0", "--parent-death"],
    ["--bind", "::1"],
    ["--bind", ""],
    ["--parent-death"],
]

argparse_cases = [
    ["--help"],
    ["-h"],
    ["--bind=127.0.0.1"],
    ["--bind"],
    ["--bind", "--unix"],
    ["--bind", "-1"],
    ["--unix", "--unix"],
    ["--bind", "a", "--bind", "b"],
    ["--parent"],  # argparse takes abbreviations
    ["--port", "9000"],
    ["--join", "10.0.0.1:9000"],
    ["--cookie-file", "/tmp/c"],
    ["--tls-ca", "ca.pem"],
    ["--allow-insecure-network"],
    [*LOCAL, "--"],
    [*LOCAL, "extra"],
]


def test_the_defaults_are_argparse_defaults() -> None:
    assert vars(worker.parse_args([])) == worker._DEFAULTS


@pytest.mark.parametrize("argv", quick_cases)
def test_a_local_command_line_is_read_as_argparse_reads_it(argv: list[str]) -> None:
    quick = worker._quick_args(argv)
    assert quick is not None
    assert vars(quick) == vars(worker.parse_args(argv))


@pytest.mark.parametrize("argv", argparse_cases)
def test_any_other_command_line_is_left_to_argparse(argv: list[str]) -> None:
    assert worker._quick_args(argv) is None
