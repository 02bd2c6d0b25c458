"""One error family: library code raises these, the CLI prints their one-line message."""

import click


class AtlasError(click.ClickException):
    """A problem the user can fix; the message names the problem and the fix."""

    exit_code = 2


class ConfigError(AtlasError):
    """The config file or one of its values is invalid."""


class ModelError(AtlasError):
    """The model cannot be found or loaded."""


class DatasetError(AtlasError):
    """The dataset is missing, empty or unreadable."""


class ArtefactError(AtlasError):
    """An artefact on disk is missing, corrupt or from another schema version."""


class WorkerError(AtlasError):
    """A shard or task failed on a worker of another process (a Ray actor or task); the message names which."""
