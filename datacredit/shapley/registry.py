"""The estimator registry: each method is one object, and the spec's allowed names come from here.

A method says how to plan (the deterministic coalition sequence), how to turn observed utilities into values
and standard errors, whether a stopping rule may end it early, and (optionally) the closed-form sensitivity of
its values to each utility that the between-seed intervals use, and (optionally) the covariance of its values,
whose off-diagonal lets a ``topK`` question compare two values by the variance of their difference.
:mod:`datacredit.shapley.builtin` registers ``kernel``, ``exact``, ``permutation``, ``banzhaf`` and ``loo``;
:func:`register_method` adds your own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from datacredit.shapley.design import Plan
    from datacredit.shapley.table import Observations, Table

PlanBuilder = Callable[[int, int, int], "Plan"]  # (n_players, budget, seed) -> Plan
#: (observations, the table, the plan when known, rows used) -> (values, standard errors)
Fit = Callable[["Observations", "Table", "Plan | None", "int | None"], tuple[np.ndarray, np.ndarray]]
Sensitivity = Callable[["Observations"], "np.ndarray | None"]  # J (n, rows), or None: central differences
#: (observations, the table, the plan when known, rows used) -> covariance (n, n), or None: treat as independent
Covariance = Callable[["Observations", "Table", "Plan | None", "int | None"], "np.ndarray | None"]


@dataclass(frozen=True)
class Method:
    """One estimator: its plan, its fit, whether it can stop early, its closed-form sensitivity and the
    covariance of its values (for the stopping questions about differences, such as topK)."""

    name: str
    summary: str
    plan: PlanBuilder
    fit: Fit
    stops_early: bool = True
    sensitivity: Sensitivity | None = None
    covariance: Covariance | None = None


_METHODS: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` under its name (``replace`` to override one); returns it."""
    if method.name in _METHODS and not replace:
        raise ValueError(f"estimator {method.name!r} is registered already (pass replace=True to override it)")
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a method added with :func:`register_method` (a plugin unloaded, a test cleaned up)."""
    _METHODS.pop(name, None)


def get_method(name: str) -> Method:
    """The method registered as ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(_METHODS)}") from None


def method_names() -> tuple[str, ...]:
    """Registered method names, in registration order (the built-ins first)."""
    return tuple(_METHODS)
