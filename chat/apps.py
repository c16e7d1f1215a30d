from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"

    def ready(self) -> None:
        from ssechat.streams.handler import STARTUP_HOOKS, on_startup

        from .recovery import on_server_start

        # Answers left `streaming` by a process that died are failed when a server starts.
        if on_server_start not in STARTUP_HOOKS:
            on_startup(on_server_start)
