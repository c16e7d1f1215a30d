from django.apps import AppConfig


class SsechatConfig(AppConfig):
    name = "ssechat"
    verbose_name = "ssechat"

    def ready(self) -> None:
        from django.conf import settings

        if settings.SSECHAT_STATS:
            from . import collector

            collector.install_stats()
