"""datacredit: Shapley values of the data contributors of diffusion models (sparsified fine-tuning)."""

__version__ = "0.1.0"


def package_version() -> str:
    """The installed package's version (``importlib.metadata``); :data:`__version__` when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("datacredit")
    except PackageNotFoundError:
        return __version__
