"""The ``mscn`` launcher: re-executes under tcmalloc (see allocator.py) before torch loads."""

from __future__ import annotations

import sys


def console() -> None:
    from .allocator import reexec_with_tcmalloc

    reexec_with_tcmalloc(["-m", "mscn_core", *sys.argv[1:]])
    from .cli import main

    sys.exit(main())
