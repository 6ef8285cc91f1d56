"""What every command does around its body: logging set-up, and bad input as one line on stderr with exit code 2
(the full traceback with -v/--verbose)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from emsedit_fast.config import ConfigError

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, ValueError, FileNotFoundError, ImportError, RuntimeError)


def run_command(args, body: Callable[[object], int], errors: tuple[type[BaseException], ...] = USER_ERRORS,
                level: int = logging.INFO) -> int:
    """Configure logging, run body(args), turn `errors` into `error: ...` and exit code 2."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return body(args)
    except errors as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
