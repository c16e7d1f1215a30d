"""The servers the benchmark starts: the bare ASGI reference and the Django peers."""
