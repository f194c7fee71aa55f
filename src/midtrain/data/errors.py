"""Errors raised for bad data input.

Every message names the offending file (and line, where there is one) so a user can fix the input without reading a
traceback from deep inside the loader.
"""

from __future__ import annotations


class DataError(Exception):
    """Bad or missing input data; the message names the file (and line) at fault."""
