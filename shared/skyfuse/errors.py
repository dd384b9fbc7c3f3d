"""The errors skyfuse raises on purpose, under one base class, so that a problem to tell the user
about is never confused with a bug.

    SkyfuseError                  a problem its message fully explains
    ├── InvalidInput (ValueError) what was given breaks a rule: a config key, event data, a CSV,
    │                             a training option, a trace (ConfigError, ContractError, DataError, …)
    └── Failure                   something outside the input went wrong: a store, a server, a key
                                  file, a scenario (StoreError, HostError, HttpError, …)

The `skyfuse` command prints a SkyfuseError as one line and exits with its `exit_code` (2: change
what you typed; 1: a runtime failure); anything else is a bug and keeps its traceback. Each domain
module keeps its own subclass (`skyfuse.config.ConfigError`, `skyfuse.storage.StoreError`, …); the
invalid-input ones stay ValueErrors for the callers that catch those.
"""
from __future__ import annotations


class SkyfuseError(Exception):
    """Base of every error skyfuse raises on purpose; its message says what is wrong."""

    exit_code = 2  # the `skyfuse` command's exit status for it


class InvalidInput(SkyfuseError, ValueError):
    """What was given (a config, event data, a dataset, an option, a trace) breaks a rule."""


class Failure(SkyfuseError):
    """Something outside the input went wrong: a store, a server, a network call, a key file."""

    exit_code = 1
