"""``{% notification_position %}``: where a page's stream can resume from (see views)."""

from django import template

from ..views import stream_position

register = template.Library()


@register.simple_tag
def notification_position() -> str:
    position = stream_position()
    return "" if position is None else str(position)
