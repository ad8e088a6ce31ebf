"""Reliability tests: fuzzed datasets and abusive requests to the served model."""
from __future__ import annotations

from tests.reliability.tally import summary


def pytest_terminal_summary(terminalreporter):
    lines = summary()
    if lines:
        terminalreporter.section("fuzz cases")
        for line in lines:
            terminalreporter.write_line(line)
