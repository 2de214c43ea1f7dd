"""Untrusted text made safe to print on an operator's terminal.

Much of what the operator CLI prints was written by someone else: an agent's output and exit notes, a pushed
version or URL quoted in an error, a caller's arguments in an audit record, a server's message. Printed raw,
an escape sequence in it runs in root's terminal (sets the title, erases lines, moves the cursor to fake a
row). :func:`printable` is the one place that decides what may reach a terminal: every control character
(C0, DEL, C1: Unicode category Cc) and every bidirectional override is shown escaped, as Python writes it
(``\\x1b``, ``\\n``, ``\\u202e``), and everything else is left as it is. A backslash already in the text is
not doubled, so a message that quotes with ``repr`` reads as before.
"""

from __future__ import annotations

import codecs
import re

# Cc is exactly U+0000-001F and U+007F-009F; the bidirectional marks, embeddings, overrides and isolates
# (category Cf) reorder what follows them on screen, so a name can be made to read as another.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escaped(m: re.Match[str]) -> str:
    return repr(m.group())[1:-1]


def printable(text: str) -> str:
    """``text`` with every control character and bidirectional override escaped: one line, safe on a terminal."""
    return _UNPRINTABLE.sub(_escaped, text)


def printable_lines(text: str) -> list[str]:
    """A log's ``text`` split at each newline (one ``\\r`` before it dropped), each line made :func:`printable`:
    a ``\\r`` or form feed inside a line shows escaped instead of starting another."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [printable(line.removesuffix("\r")) for line in lines]


class PrintableStream:
    """A byte stream (an agent's output, followed) made printable piece by piece: newlines kept, every other
    control character escaped. Each control character is escaped alone, so a sequence cut between two pieces
    is caught as well; a UTF-8 character cut between two is put together first."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        text = self._decoder.decode(data).replace("\r\n", "\n")
        return "\n".join(printable(part) for part in text.split("\n"))
