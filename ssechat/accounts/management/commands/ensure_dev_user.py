"""Create a first user for local development, once, and say how to log in."""

import secrets
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the superuser 'admin' with a random password if no user exists yet."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="admin")
        parser.add_argument(
            "--credentials-file",
            default=str(Path(settings.BASE_DIR) / ".dev-user"),
            help="where the generated password is kept (git-ignored)",
        )

    def handle(self, *args, username: str, credentials_file: str, **options):
        User = get_user_model()
        path = Path(credentials_file)
        if User.objects.exists():
            if path.exists():
                self.stdout.write(f"Log in with: {path.read_text().strip()}  (from {path.name})")
            return
        password = secrets.token_urlsafe(12)
        User.objects.create_superuser(username=username, email="", password=password)
        path.write_text(f"{username} / {password}\n")
        path.chmod(0o600)
        self.stdout.write(f"Created superuser. Log in with: {username} / {password}")
        self.stdout.write(f"(saved in {path}; change it at /admin/password_change/)")
