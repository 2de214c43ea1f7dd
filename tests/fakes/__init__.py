"""Fakes behind the drivers' seams (``helper/ports.py``, ``supervisor/ports.py``), for the fast tier's state x
failure matrix.

They never replace the end-to-end test of a behaviour: each behaviour keeps one test with real processes.
"""
