"""django-eventstream 5.3 set up as its README says (storage on, Django's ASGI app).

Streams at ``/events/`` (channel ``broadcast``, readable by logged-in users);
``POST /publish`` calls ``send_event`` (``?count=N`` sends N events, for the resume figure).
"""
