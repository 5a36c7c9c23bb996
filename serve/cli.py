"""The `neuronserve` command. Each feature registers its own subcommand; heavy imports stay inside
the command functions so `neuronserve --help` is instant."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# (module, attribute): each exposes add_subcommand(subparsers).
SUBCOMMANDS = (
    "compile.cli",
    "serve.infer_cli",
    "serve.serve_cli",
    "serve.exporter",
    "deploy.cli",
    "deploy.loadtest.cli",
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
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                continue  # feature not installed in this build
            raise
        module.add_subcommand(sub)
    return parser


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("neuronserve")
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
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
