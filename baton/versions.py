"""Version strings: their order (for the downgrade check) and their safety as directory names.

A version is dotted numbers with an optional pre-release suffix, compared the
way semver does with two deliberate differences so that real-world version
strings order the way people expect:

* the release part may have any number of components, missing ones count as
  zero (``1.2 == 1.2.0``), and leading zeros are allowed (``2024.01.15``);
* inside a pre-release identifier, digit runs compare as numbers, so
  ``1.0.0-rc2 < 1.0.0-rc10`` (plain semver would order them the other way).

A pre-release sorts before its release (``1.0.0-rc1 < 1.0.0``); build metadata
after ``+`` is allowed and ignored for ordering. Every version also becomes the
name of a directory under the install root, so :func:`validate_version` refuses
anything that could escape it or be hidden.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from baton.errors import BatonError, clip

MAX_VERSION_CHARS = 64

_VERSION_RE = re.compile(
    r"^(?P<release>[0-9]+(?:\.[0-9]+)*)"
    r"(?:-(?P<pre>[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?"
    r"(?:\+(?P<build>[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$"
)
_RUN_RE = re.compile(r"[0-9]+|[^0-9]+")

# One pre-release identifier as a sort key: numeric identifiers first (as semver),
# then alphanumeric ones compared run by run (digits as numbers, text as ASCII).
_IdentKey = tuple[int, int, tuple[tuple[int, int, str], ...]]


class InvalidVersion(BatonError):
    """A version string Baton cannot order or cannot use as a directory name."""

    def __init__(self, version: str, problem: str) -> None:
        super().__init__(f"invalid version {clip(version)!r}: {problem}")
        self.version = version
        self.problem = problem


@dataclass(frozen=True, eq=False)
class Version:
    """A parsed version; the operators compare precedence (``1.2 == 1.2.0``)."""

    text: str
    release: tuple[int, ...]
    pre: tuple[str, ...]
    build: str

    def _key(self) -> tuple[tuple[int, ...], int, tuple[_IdentKey, ...]]:
        release = list(self.release)
        while len(release) > 1 and release[-1] == 0:
            release.pop()
        # A release without pre-release sorts after every pre-release of it.
        return (tuple(release), 0 if self.pre else 1, tuple(_ident_key(p) for p in self.pre))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Version) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __lt__(self, other: Version) -> bool:
        return self._key() < other._key()

    def __le__(self, other: Version) -> bool:
        return self._key() <= other._key()

    def __gt__(self, other: Version) -> bool:
        return self._key() > other._key()

    def __ge__(self, other: Version) -> bool:
        return self._key() >= other._key()


def _ident_key(ident: str) -> _IdentKey:
    if ident.isdigit():
        return (0, int(ident), ())
    runs = tuple((0, int(r), "") if r.isdigit() else (1, 0, r) for r in _RUN_RE.findall(ident))
    return (1, 0, runs)


def parse_version(s: str) -> Version:
    """Parse ``s`` for ordering.

    Raises:
        InvalidVersion: ``s`` is not dotted numbers with an optional ``-pre`` and
            ``+build``, or is not a safe directory name.
    """
    validate_version(s)
    m = _VERSION_RE.match(s)
    if m is None:
        raise InvalidVersion(s, "expected dotted numbers with an optional pre-release suffix, like 1.2.0 or 1.0.0-rc1")
    pre = m.group("pre")
    return Version(
        text=s,
        release=tuple(int(c) for c in m.group("release").split(".")),
        pre=tuple(pre.split(".")) if pre else (),
        build=m.group("build") or "",
    )


def compare_versions(a: str, b: str) -> int:
    """Return -1, 0 or 1 as ``a`` is older than, the same as, or newer than ``b``.

    Raises:
        InvalidVersion: either string does not parse.
    """
    ka, kb = parse_version(a)._key(), parse_version(b)._key()
    return (ka > kb) - (ka < kb)


def validate_version(s: str) -> str:
    """Return ``s`` if it is safe as one directory name under the install root.

    Raises:
        InvalidVersion: empty, longer than 64 characters, containing ``/``, ``\\``,
            ``..``, whitespace or control characters, or starting with ``.``.
    """
    if not s:
        raise InvalidVersion(s, "it is empty")
    if len(s) > MAX_VERSION_CHARS:
        raise InvalidVersion(s, f"longer than {MAX_VERSION_CHARS} characters")
    if "/" in s or "\\" in s:
        raise InvalidVersion(s, "it contains a path separator")
    if ".." in s:
        raise InvalidVersion(s, "it contains '..'")
    if s.startswith("."):
        raise InvalidVersion(s, "it starts with '.'")
    if any(c.isspace() or not c.isprintable() for c in s):
        raise InvalidVersion(s, "it contains whitespace or control characters")
    return s


def previous_good(installed: list[str], current: str | None, failed: list[str]) -> str | None:
    """The version a rollback goes to: the highest installed one below ``current`` that never failed.

    Never a version above ``current`` and never one marked failed, so a second
    rollback does not move forward again to the version the first one left.
    """
    bad = set(failed)
    below = [v for v in installed if v != current and v not in bad
             and (current is None or compare_versions(v, current) < 0)]
    return max(below, key=parse_version) if below else None
