"""An agent's environment file (``env_file``): ``KEY=VALUE`` lines, ``#`` comments and blank lines.

As systemd's ``EnvironmentFile=``: its values override the agent's ``env`` table. A value may be quoted
(``KEY="a b"``), which keeps its spaces; nothing is expanded. The file usually holds secrets, so no error
ever shows a value or a line: only the file, the key name when it is valid, and the line number.
The file is read by root for every start (a changed secret applies at the next restart), so its path is on
:func:`baton.strict_modes.trusted_paths`' list whatever user the agent runs as.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from baton.errors import KeyedError

MAX_ENV_FILE_BYTES = 1 << 20  # a megabyte of variables is already far more than an environment should carry
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class EnvFileError(KeyedError):
    """An ``env_file`` that cannot be read or parsed, naming its key (never its values)."""


def read_env_file(path: Path, key: str) -> dict[str, str]:
    """The variables of ``path``; EnvFileError naming ``key`` (the config key) and the line, never a value."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise EnvFileError(key, f"cannot read {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise EnvFileError(key, f"{path} is not a regular file")
        if st.st_size > MAX_ENV_FILE_BYTES:
            raise EnvFileError(key, f"{path} is larger than {MAX_ENV_FILE_BYTES} bytes")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_ENV_FILE_BYTES + 1)
    finally:
        os.close(fd)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise EnvFileError(key, f"{path} is not UTF-8 text") from None
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not _KEY_RE.match(name):
            raise EnvFileError(key, f"{path} line {n}: not KEY=VALUE (a KEY is letters, digits and _)")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        if "\0" in value:
            raise EnvFileError(key, f"{path} line {n}: the value of {name} contains a NUL character")
        out[name] = value
    return out
