"""What the administrator's commands share."""

from __future__ import annotations

import argparse
import sys

from msa import config, sysexits


def args_and_config(parser: argparse.ArgumentParser, argv: list[str],
                    prog: str) -> tuple[argparse.Namespace, config.Config] | int:
    """Parse ``argv`` (its ``--config``) and load the configuration: the
    arguments and the config, or the exit status once the reason is on
    stderr (64 usage, 0 after --help, 78 configuration)."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help is 0, a usage error 2
        return sysexits.EX_OK if exc.code == 0 else sysexits.EX_USAGE
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return sysexits.EX_CONFIG
    return args, cfg
