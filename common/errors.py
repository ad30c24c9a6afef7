"""The one base of moestream's own errors.

Every error raised on purpose (a damaged bundle, an unreadable checkpoint, a budget too small, a
repo that cannot be fetched ...) is a `MoestreamError` whose message says what is wrong and
where, so that callers (the CLI first) catch one type and print one line. Each specific error
also keeps the builtin type it always had (ValueError, OSError ...), so existing handlers work.
"""

from __future__ import annotations


class MoestreamError(Exception):
    """Base of every error moestream raises on purpose; the message says what and where."""


class OptionsError(MoestreamError, ValueError):
    """An option or argument that cannot work: a bad value, or options that exclude each other."""


class OutputExistsError(MoestreamError, FileExistsError):
    """The output folder exists and replacing it was not asked for."""
