"""The error every checkpoint reader raises (imported by the command line without JAX)."""


class CheckpointError(ValueError):
    """A checkpoint does not match what the config and the name table require."""
