"""Test-only helpers importable from subprocesses (``tests.support``)."""
