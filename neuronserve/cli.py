"""The `neuronserve` command. Each feature registers its own subcommand; heavy imports stay inside
the command functions so `neuronserve --help` is instant."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Each module exposes add_subcommand(subparsers).
SUBCOMMANDS = (
    "neuronserve.compile.cli",
    "neuronserve.serve.infer_cli",
    "neuronserve.serve.serve_cli",
    "neuronserve.serve.exporter",
    "neuronserve.deploy.cli",
    "neuronserve.deploy.loadtest.cli",
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The one help formatter of every command: a flag's default is appended once, and only when
    its help does not already say it and there is one to say."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if "(default" in help or "%(default)" in help or action.default in (None, False, [], argparse.SUPPRESS):
            return help
        return super()._get_help_string(action)


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """HelpFormatter, for commands whose description is laid out by hand."""


class CommandParser(argparse.ArgumentParser):
    """The parser of a (sub)command: the shared help formatter, and an unknown flag is reported
    with this command's usage, not the top-level one."""

    def __init__(self, *args, **kwargs):
        asked = kwargs.get("formatter_class")
        raw = isinstance(asked, type) and issubclass(asked, argparse.RawDescriptionHelpFormatter)
        kwargs["formatter_class"] = RawDescriptionHelpFormatter if raw else HelpFormatter
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self.prog != "neuronserve":
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def _add_logging_flags(parser: argparse.ArgumentParser, *, top: bool) -> None:
    from neuronserve.common import logs

    group = parser.add_argument_group("logging")
    # A subcommand's flags leave unset what they are not given, so `neuronserve --log-level debug
    # serve` and `neuronserve serve --log-level debug` both work.
    unset = {} if top else {"default": argparse.SUPPRESS}
    group.add_argument("--log-level", choices=logs.LEVELS, type=str.lower, **({"default": None} | unset),
                       help=f"the neuronserve loggers' level (default: {logs.DEFAULT_LEVEL}; env {logs.LEVEL_ENV})")
    group.add_argument("--log-format", choices=logs.FORMATS, type=str.lower, **({"default": None} | unset),
                       help=f"text lines, or one JSON object per line (default: {logs.DEFAULT_FORMAT}; env {logs.FORMAT_ENV})")


def _commands(parser: argparse.ArgumentParser):
    """Every parser below `parser` that runs something (has no subcommands of its own)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                if any(isinstance(a, argparse._SubParsersAction) for a in child._actions):
                    yield from _commands(child)
                yield child


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="neuronserve",
        description="Serve transformer encoders on AWS Inferentia2/Trainium (and CPU) with Ray Serve.",
    )
    parser.add_argument("--version", action="version", version=f"neuronserve {_version()}")
    _add_logging_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except Exception as e:  # never a silent skip: a missing command would look like a typo
            raise CommandImportError(
                f"cannot load a neuronserve command: importing {name} failed with "
                f"{type(e).__name__}: {e}; reinstall neuronserve (pip install -e .) or check for a package "
                f"or PYTHONPATH entry that shadows one it needs"
            ) from e
        module.add_subcommand(sub)
    for command in _commands(parser):
        _add_logging_flags(command, top=False)
    return parser


class CommandImportError(RuntimeError):
    """A subcommand's module failed to import; the message names it."""


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("neuronserve")
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        parser = build_parser()
    except CommandImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    from neuronserve.common import logs

    try:
        logs.configure(args.log_level, args.log_format)
    except ValueError as e:  # a bad NEURONSERVE_LOG_LEVEL / NEURONSERVE_LOG_FORMAT
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
