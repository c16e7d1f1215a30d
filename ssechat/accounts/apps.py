from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "ssechat.accounts"
    label = "accounts"
    verbose_name = "Accounts and API tokens"

    def ready(self) -> None:
        from . import signals

        signals.connect()
