from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"

    def ready(self) -> None:
        from ssechat.streams.handler import on_shutdown, on_startup

        from .generation import abort_all
        from .recovery import on_server_start

        # Answers left `streaming` by a process that died are failed when a server starts.
        on_startup(on_server_start)
        # A server told to stop ends its own answers as failed (their `done` published) first.
        on_shutdown(abort_all)
