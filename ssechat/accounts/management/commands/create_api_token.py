from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from ssechat.accounts.models import ApiToken


class Command(BaseCommand):
    help = "Create an API token for a user. The token is printed alone on the last line."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="", help="a label to tell tokens apart")

    def handle(self, *args, username: str, name: str, **options):
        User = get_user_model()
        try:
            user = User.objects.get_by_natural_key(username)
        except User.DoesNotExist as exc:
            raise CommandError(f"No user named {username!r}.") from exc
        if not user.is_active:
            raise CommandError(f"User {username!r} is not active.")
        row, token = ApiToken.create_for(user, name=name)
        self.stderr.write(
            f"Created API token {row.prefix}… for {username}. It is shown only now; "
            "only its hash is stored."
        )
        self.stdout.write(token)
