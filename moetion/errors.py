"""Exceptions raised by moetion. Every message says what was expected, what was found, and what to do."""


class MoetionError(Exception):
    """Base class of every error moetion raises on purpose."""


class ConfigError(MoetionError, ValueError):
    """A configuration value or combination is invalid."""


class PartitionError(MoetionError, ValueError):
    """The layers cannot be split into the requested pipeline stages."""


class DataError(MoetionError):
    """The data source cannot supply the requested (iteration, micro-batch)."""


class PeerFailure(MoetionError):
    """A peer rank died, closed its connection, or did not answer within the timeout."""


class LaunchError(MoetionError):
    """One or more launched worker processes failed."""


class NondeterministicOpError(MoetionError):
    """Under ``determinism.strict``, the model ran an op that has no deterministic implementation."""
