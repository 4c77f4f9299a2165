"""The Kubernetes operator (kopf): Job rendering, reconcile decisions, status, metrics and handlers."""
