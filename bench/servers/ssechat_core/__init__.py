"""ssechat with a bench-only stream and publish view over the core (no notifications app).

Used only when the notifications feed is not in the project yet (``--ssechat-feed core``):
the final figures use the real ``/api/notifications/`` feed and API.
"""
