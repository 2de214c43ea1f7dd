"""In-process stand-ins for the supervisor drivers' collaborators (``supervisor/ports.py``), for the fast tier."""
