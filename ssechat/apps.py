from django.apps import AppConfig


class SsechatConfig(AppConfig):
    name = "ssechat"
    verbose_name = "ssechat"
