"""A tree's symbolic links stay inside it: the rule for what is packed (``baton-package``) and installed
(``supervisor install-self``).

A link out of the tree would pack or install what it names (a build host's /etc/passwd, a key); links to
something inside it are fine and are kept as links. Links are checked where they are, never followed down.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from baton.errors import BatonError


class LinkOutsideTree(BatonError):
    """A symbolic link in a tree leads out of it; the message names the link and its target."""


def walk_tree(root: Path, rel_dir: str = "") -> Iterator[str]:
    """Every path under ``root``, relative and sorted, parents before children."""
    with os.scandir(root / rel_dir if rel_dir else root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
        yield rel
        if entry.is_dir(follow_symlinks=False):
            yield from walk_tree(root, rel)


def check_link_inside(root: Path, rel: str, target: str) -> None:
    """Refuse the link ``rel`` (relative to ``root``) to ``target`` when it leads out of ``root``.

    Raises:
        LinkOutsideTree: naming the link and its target.
    """
    if os.path.isabs(target):
        raise LinkOutsideTree(f"{root / rel}: symlink to absolute path {target!r} points outside {root}")
    lexical = os.path.normpath(os.path.join(os.path.dirname(rel), target))
    real = os.path.realpath(root / rel)
    real_root = os.path.realpath(root)
    if lexical == ".." or lexical.startswith("../") or os.path.commonpath([real, real_root]) != real_root:
        raise LinkOutsideTree(f"{root / rel}: symlink to {target!r} points outside {root}")


def check_links_inside(root: Path) -> None:
    """Refuse a tree with a symbolic link that leads out of it.

    Raises:
        LinkOutsideTree: naming the first such link (in sorted order) and its target.
    """
    for rel in walk_tree(root):
        if (root / rel).is_symlink():
            check_link_inside(root, rel, os.readlink(root / rel))
