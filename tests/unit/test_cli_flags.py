"""Every command's flags: each has help, says its default once and truly (never "(default: None)"
for a setting that has one), and `serve`'s flags are the settings' own, each naming its
NEURONSERVE_* variable. A wrong flag shows the subcommand's usage."""

from __future__ import annotations

import argparse
import re

import pytest

from neuronserve import cli
from neuronserve.serve import serve_cli
from neuronserve.serve.settings import AppArgs, ServeCommand, env_name

PARSER = cli.build_parser()
COMMANDS = {c.prog: c for c in [PARSER, *cli._commands(PARSER)]}


def flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    skip = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
    return [a for a in parser._actions if not isinstance(a, skip)]


def help_blocks(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each flag's formatted help, keyed by its first option string."""
    text = parser.format_help()
    blocks = {}
    for block in re.split(r"\n(?=  -)|\n\n", text):
        m = re.match(r"  (-[-\w]+)", block)
        if m:
            blocks[m.group(1)] = " ".join(block.split())
    return blocks


def test_the_commands_are_all_walked():
    assert {"neuronserve serve", "neuronserve compile", "neuronserve bench", "neuronserve infer",
            "neuronserve deploy render"} <= set(COMMANDS)


@pytest.mark.parametrize("prog", sorted(COMMANDS))
def test_every_flag_has_help(prog):
    missing = [a.option_strings or a.dest for a in flags(COMMANDS[prog]) if not (a.help or "").strip()]
    assert not missing, f"{prog}: flags without help: {missing}"


@pytest.mark.parametrize("prog", sorted(COMMANDS))
def test_defaults_are_said_once_and_never_as_none(prog):
    for flag, block in help_blocks(COMMANDS[prog]).items():
        assert "(default: None)" not in block, f"{prog} {flag}: {block}"
        assert block.count("default:") <= 1, f"{prog} {flag} says its default twice: {block}"


SERVE = COMMANDS["neuronserve serve"]
SERVE_FIELDS = {**{n: AppArgs for n in serve_cli.app_flag_names()}, **{n: ServeCommand for n in serve_cli.COMMAND_FLAGS}}


def test_serve_has_a_flag_for_every_setting():
    dests = {a.dest for a in flags(SERVE)}
    settings = (set(AppArgs.model_fields) - serve_cli.NOT_FLAGS) | set(ServeCommand.model_fields)
    assert settings <= dests, f"settings without a serve flag: {sorted(settings - dests)}"


@pytest.mark.parametrize("name", sorted(SERVE_FIELDS))
def test_serve_flag_help_says_the_true_default_and_the_variable(name):
    model = SERVE_FIELDS[name]
    field = model.model_fields[name]
    flag = "--" + name.replace("_", "-")
    block = help_blocks(SERVE)[flag]
    assert block.startswith(flag)
    assert f"env {env_name(name)}" in block, block
    assert field.description.split(";")[0].split()[0] in block
    said = (field.json_schema_extra or {}).get("default_help")
    if said:
        assert f"(default: {said};" in block, block
    elif field.default is not None and not field.is_required():
        shown = str(field.default).lower() if isinstance(field.default, bool) else f"{field.default:g}" if isinstance(field.default, float) else str(field.default)
        assert f"(default: {shown};" in block, block


def test_the_papercut_flags_have_help():
    for prog, flag in [("neuronserve compile", "--task"), ("neuronserve compile", "--target"),
                       ("neuronserve serve", "--host"), ("neuronserve serve", "--port"),
                       ("neuronserve serve", "--backend"), ("neuronserve serve", "--request-timeout-s"),
                       ("neuronserve bench", "--artifacts"), ("neuronserve bench", "--threads")]:
        block = help_blocks(COMMANDS[prog])[flag]
        assert len(block.split()) > 3, f"{prog} {flag}: {block}"
    assert "(default: 2048;" in help_blocks(SERVE)["--max-batch-tokens"]
    assert "(default: 9400;" in help_blocks(SERVE)["--metrics-port"]


def test_booleans_are_pairs():
    assert "--packing" in help_blocks(SERVE) and "--no-packing" in SERVE.format_usage()
    args = PARSER.parse_args(["serve", "--no-packing", "--truncate"])
    assert args.packing is False and args.truncate is True and args.access_log is None


def test_render_shares_the_declaration_without_variables():
    render = help_blocks(COMMANDS["neuronserve deploy render"])
    serve = help_blocks(SERVE)
    for flag in ("--threads-per-replica", "--max-concurrent-batches", "--batch-wait-ms", "--packing"):
        assert render[flag] == re.sub(r"; env NEURONSERVE_\w+", "", serve[flag])
    assert "default 4" not in render["--threads-per-replica"]


def test_a_wrong_flag_shows_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["compile", "--output", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: neuronserve compile" in err and "--target" in err
    assert "neuronserve compile: error: unrecognized arguments: --output x" in err


def test_a_wrong_flag_of_a_nested_command_shows_its_usage(capsys):
    with pytest.raises(SystemExit):
        cli.main(["deploy", "render", "--artifacts", "a", "--instance-type", "inf2.xlarge", "--image", "i", "--bogus"])
    err = capsys.readouterr().err
    assert "usage: neuronserve deploy render" in err and "unrecognized arguments: --bogus" in err


def test_flags_then_environment_then_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("NEURONSERVE_MAX_BATCH_TOKENS", "512")
    monkeypatch.setenv("NEURONSERVE_BATCH_WAIT_MS", "3")
    args = PARSER.parse_args(["serve", "--batch-wait-ms", "1.5"])
    app = serve_cli._app_args(args, tmp_path, None)
    assert (app.max_batch_tokens, app.batch_wait_ms, app.max_queued_rows) == (512, 1.5, 2048)


@pytest.mark.parametrize("argv", [["--log-level", "debug", "compile"], ["compile", "--log-level", "debug"]])
def test_log_flags_on_every_command(argv):
    args = PARSER.parse_args(argv)
    assert args.log_level == "debug" and args.log_format is None
    for prog, parser in COMMANDS.items():
        assert {"--log-level", "--log-format"} <= set(help_blocks(parser)), prog


def test_logs_are_configured_once_with_module_names(capsys, monkeypatch):
    import json
    import logging

    from neuronserve.common import logs

    monkeypatch.setenv(logs.LEVEL_ENV, "warning")  # restored afterwards: configure() exports its choice
    monkeypatch.setenv(logs.FORMAT_ENV, "text")
    try:
        logs.configure("info", "json")
        logs.configure("info", "json")  # again: still one handler
        logging.getLogger("neuronserve.serve.batcher").info("hello")
        logging.getLogger("neuronserve.serve.batcher").debug("hidden")
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1
        assert json.loads(lines[0])["logger"] == "neuronserve.serve.batcher"
        assert json.loads(lines[0])["level"] == "info"
        import os

        assert os.environ[logs.LEVEL_ENV] == "info" and os.environ[logs.FORMAT_ENV] == "json"
    finally:
        logs.reset()


def test_module_loggers_are_named_after_their_module():
    import importlib

    for name in ("neuronserve.serve.batcher", "neuronserve.serve.exporter", "neuronserve.serve.metrics"):
        module = importlib.import_module(name)
        assert module.log.name == name


def test_a_started_process_logs_as_the_command_said(monkeypatch, capsys):
    import json
    import logging

    from neuronserve.common import logs

    monkeypatch.delenv(logs.LEVEL_ENV, raising=False)
    monkeypatch.delenv(logs.FORMAT_ENV, raising=False)
    assert logs.configure_from_env() is False  # nothing said: Ray's own logging stays as it is
    monkeypatch.setenv(logs.LEVEL_ENV, "info")
    monkeypatch.setenv(logs.FORMAT_ENV, "json")
    try:
        assert logs.configure_from_env() is True
        logging.getLogger("neuronserve.serve.replica").info("warm")
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert line["logger"] == "neuronserve.serve.replica" and line["message"] == "warm"
        assert logging.getLogger("neuronserve").propagate is False
    finally:
        logs.reset()
    assert logging.getLogger("neuronserve").propagate is True
