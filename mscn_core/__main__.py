"""``python -m mscn_core …`` is the ``mscn`` command."""

from .entry import console

console()
