"""The one exception type the command line turns into a one-line message."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A mistake in the command line, the configuration or the run directory.

    The ``lightning-etap`` command prints it as ``lightning-etap: error: <message>``
    (one line, no traceback) and exits with status 2. The message says what is
    wrong and, where there is one, how to fix it.
    """
