"""The ``mscn`` launcher: re-executes under tcmalloc (see allocator.py) before torch loads,
and exits quietly when the reader of stdout goes away (``mscn … | head``)."""

from __future__ import annotations

import os
import sys

SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a program killed by a closed pipe reports


def console() -> None:
    """Entry point of the ``mscn`` script and of ``python -m mscn_core``."""
    from .allocator import reexec_with_tcmalloc

    reexec_with_tcmalloc(["-m", "mscn_core", *sys.argv[1:]])
    from .cli import main

    try:
        try:
            code = main()
        except SystemExit as done:  # --help, --version, usage errors
            code = done.code
        sys.stdout.flush()  # here, not at interpreter exit, where a closed pipe is noisy
    except BrokenPipeError:
        # The reader left: send what is still buffered to /dev/null and stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        code = SIGPIPE_EXIT
    sys.exit(code)
