"""The `dspark` command."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .cli_bench import add_bench_parser
from .cli_common import cli_error
from .cli_generate import add_generate_parser
from .cli_profile import add_profile_parser
from .cli_profile_step import add_profile_step_parser
from .cli_train import add_train_parsers
from .demo import add_demo_parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dspark", description="DSpark speculative decoding")
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(sub)
    add_generate_parser(sub)
    add_bench_parser(sub)
    add_profile_parser(sub)
    add_profile_step_parser(sub)
    add_train_parsers(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except OSError as exc:  # a file the subcommand did not expect to fail: still one line
        return cli_error(args.command, exc)


if __name__ == "__main__":
    sys.exit(main())
