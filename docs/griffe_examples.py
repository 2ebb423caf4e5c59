"""Griffe extension for the docs build: the library's ``Example:`` docstring sections render as examples.

Google style (as griffe reads it) knows an ``Examples:`` section, whose ``>>>``
lines become code blocks; this library's docstrings say ``Example:``, which
griffe would render as prose. This renames the heading while the API pages are
built; the docstrings themselves are unchanged.
"""

from __future__ import annotations

import re

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", flags=re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_object(self, *, obj, loader, **kwargs) -> None:
        if obj.docstring is not None and "Example:" in obj.docstring.value:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
