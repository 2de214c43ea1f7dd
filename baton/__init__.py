"""Baton: code shared by the supervisor, the helper and the Manager.

Everything that crosses a process boundary (wire formats, the journal, the
on-disk layout, the state vocabulary) lives here once, so both sides of a
boundary import the same definition.
"""

__version__ = "0.1.0"
