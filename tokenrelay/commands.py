"""How one tokenrelay process starts another."""

from __future__ import annotations

import sys


def tokenrelay_argv(*argv: str) -> list[str]:
    """The command line that runs ``tokenrelay ARGV...`` with this interpreter.

    ``-P`` keeps the working directory off ``sys.path``: run from a checkout after a plain
    ``pip install .``, ``python -m tokenrelay`` would otherwise import the checkout's own
    ``tokenrelay/`` folder, which lacks the ``api``, ``workers``, ... subpackages that the
    installed package maps in from the top-level folders.
    """
    return [sys.executable, "-P", "-m", "tokenrelay", *argv]
