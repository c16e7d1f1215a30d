from django_eventstream.channelmanager import DefaultChannelManager


class LoggedInChannelManager(DefaultChannelManager):
    """Streams for authenticated users only (the README's per-user permission hook)."""

    def can_read_channel(self, user, channel):
        return user is not None and user.is_authenticated
