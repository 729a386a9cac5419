"""The error a command raises for a problem with what the user asked for."""


class UsageError(Exception):
    """Printed by the CLI as one line, exit code 2."""
