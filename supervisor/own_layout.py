"""Where the running supervisor's own versioned install is (``<install_root>/supervisor/``), as the daemon needs
it: the launcher a self-update or a restart execs, whether this process runs from that layout, and how it starts
a helper. Installing one is the operator CLI's (``supervisor/cli/install_self.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from baton.config import SUPERVISOR_COMPONENT, Config
from baton.layout import ComponentLayout


def source_root() -> Path:
    """Where Baton's packages are: the checkout, or a version's ``lib/``."""
    return Path(__file__).resolve().parent.parent


def layout(cfg: Config) -> ComponentLayout:
    return ComponentLayout(cfg.node.install_root, SUPERVISOR_COMPONENT)


def launcher(cfg: Config) -> Path:
    return layout(cfg).current_link / "bin" / "supervisor"


def running_from_layout(cfg: Config) -> bool:
    """True when this process runs code from the installed layout, so an exec of ``current`` replaces it."""
    here = Path(__file__).resolve()
    versions = layout(cfg).versions_dir.resolve()
    return versions in here.parents


def python_for_launcher() -> str:
    return sys.executable


def helper_command() -> list[str]:
    """How this supervisor starts a helper: its own release's ``bin/helper`` (by its real path, not ``current``).

    The running release's helper carries out every update, a self-update included,
    so a broken new release cannot break the helper that must roll it back.
    """
    from baton.release import release_root_of_running_code

    root = release_root_of_running_code()
    if root is not None:
        return [str(root / "bin" / "helper")]
    return [sys.executable, "-m", "helper"]


def helper_argv(cfg: Config, job: list[str]) -> list[str]:
    """``helper apply`` for a job (``--update-id ID``, or ``--standby``), with this supervisor's config file and
    control socket."""
    if cfg.source is None:
        raise RuntimeError("a helper reads the supervisor's config file; this configuration has none")
    return [*helper_command(), "apply", "--config", str(cfg.source), *job, "--socket", str(cfg.control_socket)]
