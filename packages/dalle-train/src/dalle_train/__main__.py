"""``python -m dalle_train --config FILE|RECIPE [--set a.b=v ...] [--fresh] --output DIR``: the same as
``dalle train``, without the CLI package (handy under ``torchrun ... -m dalle_train``)."""

from __future__ import annotations

import argparse
import sys

from dalle_core.allocator import keep_large_buffers
from dalle_core.errors import DalleError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dalle_train", description=__doc__)
    parser.add_argument("--config", required=True, help="a YAML/JSON file or a recipe name")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", required=True)
    parser.add_argument("--fresh", action="store_true", help="delete OUTPUT first instead of resuming")
    args = parser.parse_args(argv)
    keep_large_buffers()
    from dalle_train.run import run_training
    from dalle_train.run_config import load_run_config

    try:
        config = load_run_config(args.config, args.overrides)
        result = run_training(config, args.output, resume=not args.fresh)
    except DalleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if result.bundle_dir is not None:
        print(f"model: {result.bundle_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
