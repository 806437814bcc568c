"""``python -m mailer``."""

from .cli import main

main()
