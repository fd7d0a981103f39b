"""The error type for bad input: the CLI prints its message as one line and exits 2."""


class GptDeployError(Exception):
    """A user-facing error: the message says what is wrong and, where possible, what to do."""
