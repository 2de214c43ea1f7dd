"""The operator's ``supervisor`` command: everything but ``supervisor run`` (the daemon, in ``supervisor/``).

``main.py`` builds the parser and dispatches; each command's module is imported when it runs, so that
``supervisor run`` keeps none of them resident. Nothing here is imported by the daemon.
"""
