"""Drop-in compatibility suites for distexec: other projects' tests, run against its executor.

Layer: test harness, never shipped (``pyproject.toml`` packages only ``distexec*``).
"""
