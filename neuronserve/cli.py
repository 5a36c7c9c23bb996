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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuronserve",
        description="Serve transformer encoders on AWS Inferentia2/Trainium (and CPU) with Ray Serve.",
    )
    parser.add_argument("--version", action="version", version=f"neuronserve {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
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
