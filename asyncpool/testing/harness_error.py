"""The harness's own error type."""


class HarnessError(RuntimeError):
    """A test server could not be found, started or stopped; the message says what to do."""
