"""The `neuronserve` command's dispatcher."""

import sys

import pytest

from neuronserve import cli


def test_a_subcommand_that_fails_to_import_is_an_error_naming_the_import(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "neuronserve.deploy.cli", None)  # its import now fails
    with pytest.raises(cli.CommandImportError, match=r"importing neuronserve\.deploy\.cli failed"):
        cli.build_parser()
    assert cli.main(["deploy", "--help"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "neuronserve.deploy.cli" in err


def test_every_subcommand_is_registered():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"compile", "infer", "bench", "serve", "metrics-exporter", "deploy", "loadtest"} <= set(sub.choices)


def test_bounded_waits_at_most_its_timeout_and_passes_errors_on():
    import threading

    import pytest

    from neuronserve.serve.serve_cli import _bounded

    never = threading.Event()
    assert _bounded(never.wait, 0.2) == "timeout"
    assert _bounded(lambda: None, 5) == "done"
    assert _bounded(never.wait, 5, abort=lambda: True) == "aborted"
    with pytest.raises(KeyError):
        _bounded(lambda: {}["x"], 5)
