"""``python -m manager``: the same as ``baton-manager``."""

from manager.cli import main

raise SystemExit(main())
