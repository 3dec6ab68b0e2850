"""A mistake in how a command was called (the CLI's, the offline job's): one line on stderr and
exit status 2, never a traceback or argparse's usage block."""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """A mistake in a command line, a config file or an input; printed as one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors: the caller prints them as its one line."""

    def error(self, message: str):
        raise UsageError(message)
