"""Django's SQLite backend, with writers of one process queueing on a lock (see base.py)."""
