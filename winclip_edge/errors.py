"""The one error base of the library: every typed error derives from it, so a face (the CLI, the service)
turns any of them into a one-line message without keeping a list of classes."""
from __future__ import annotations


class WinclipError(Exception):
    """A problem the user can fix (bad bundle, missing product, unreadable image, unavailable engine ...).

    The message says what is wrong and, where there is one, the command that fixes it."""
