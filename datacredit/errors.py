"""The two kinds of failure a step can have: bad input (retrying cannot help) and not ready yet (retry later).

The worker exits with ``ExitCode.BAD_INPUT`` on :class:`BadInput`, which fails its Job at once (a pod-failure
rule); anything else, :class:`NotReady` included, is an ordinary failure the Job and the executors retry.
"""

from __future__ import annotations


class BadInput(ValueError):
    """The input cannot be used as given; the message names the field or file and what to do."""


class DatasetError(BadInput):
    """The data set cannot be used as given; the message names the file or contributor."""


class ModelError(BadInput):
    """A model, weights, autoencoder or pipeline file cannot be used; the message names the spec field."""


class NotReady(RuntimeError):
    """A step ran before what it needs exists (a coalition before prepare finished): transient, retried."""
