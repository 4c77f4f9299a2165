"""The words both executors, the CLI, the CRD and the metrics share, defined once.

``StrEnum`` / ``IntEnum`` members compare equal to their plain values, so status documents, JSON files and
labels keep holding the strings and numbers they always held.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class Phase(StrEnum):
    """``status.phase`` of a ValuationRun (the CRD's enum and the run-phase metric list these)."""

    PENDING = "Pending"
    PREPARING = "Preparing"
    EVALUATING = "Evaluating"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


TERMINAL_PHASES = (Phase.SUCCEEDED, Phase.FAILED)


class JobState(StrEnum):
    """What one Job (an attempt of prepare or of a coalition) is doing."""

    QUEUED = "Queued"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING)


class AttemptFailure(StrEnum):
    """Why an attempt failed (``failed.json`` markers, the attempts metric's ``reason`` label)."""

    BAD_INPUT = "BadInput"  # the worker exited with ExitCode.BAD_INPUT
    DEADLINE = "DeadlineExceeded"  # execution.activeDeadlineSeconds
    POD_FAILED = "PodFailed"  # any other failure (OOM, a crash, a node lost)
    NO_RESULT = "NoResult"  # the Job completed but wrote no result.json
    LOST = "JobLost"  # the Job vanished before any pass saw how it ended
    REJECTED = "JobRejected"  # the API server refused to create the Job
    STORAGE = "StorageUnavailable"  # the worker exited with ExitCode.STORAGE


NOT_RETRIED = (AttemptFailure.BAD_INPUT, AttemptFailure.REJECTED)  # the same Job would fail the same way


class RunFailure(StrEnum):
    """``reason`` of the ``Failed`` condition when a run fails."""

    INVALID_SPEC = "InvalidSpec"
    INVALID_PLAN = "InvalidPlan"
    PREPARE_FAILED = "PrepareFailed"
    COALITIONS_FAILED = "CoalitionsFailed"
    ESTIMATE_FAILED = "EstimateFailed"


class ExitCode(IntEnum):
    """Exit codes of every ``datacredit`` command; the worker's select the Jobs' pod-failure rules."""

    OK = 0
    FAILED = 1  # the work failed (too many failed coalitions, a run without results yet); retried in Jobs
    USAGE = 2  # unknown option, missing or malformed argument (click's own code)
    BAD_INPUT = 3  # bad manifest, data or model files: retrying cannot help (Jobs fail fast on it)
    STORAGE = 4  # storage unreachable for longer than the patience: an outage, worth retrying later
    INTERRUPTED = 130  # Ctrl-C (SIGINT); what finished is kept, the same command resumes
