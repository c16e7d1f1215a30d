from django.apps import AppConfig


class StreamsConfig(AppConfig):
    name = "ssechat.streams"
    label = "streams"
    verbose_name = "Event streams"
