"""What every command does around its body: logging set-up, and bad input as one line on stderr with exit code 2
(the full traceback with -v/--verbose)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from emsedit_fast.config import ConfigError

# Bad input and refused operations (config, data, checkpoint and journal errors are ValueError / RuntimeError
# subclasses; KeyError: an unknown edit id). Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, ValueError, FileNotFoundError, ImportError, RuntimeError,
                                                KeyError)


def run_command(args, body: Callable[[object], int], errors: tuple[type[BaseException], ...] = USER_ERRORS,
                level: int = logging.INFO, prefix: str = "") -> int:
    """Configure logging, run body(args), turn `errors` into `error: ...` and exit code 2. prefix: put before every
    log line (the data-parallel command's rank)."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else level,
                        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s")
    try:
        return body(args)
    except errors as err:
        if args.verbose:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2
