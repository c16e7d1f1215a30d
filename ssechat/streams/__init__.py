"""The streaming core: wire format, event log, broker, resume and responses.

It knows nothing of chat or notifications. Apps publish with
:func:`ssechat.streams.publish` and serve with :class:`EventStreamResponse`
over an :class:`EventStream` (backlog after ``Last-Event-ID``, then live).
Import from the submodules; this package stays import-light so that models
can be loaded by Django's app registry first.
"""
