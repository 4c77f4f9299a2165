"""datacredit: Shapley values of the data contributors of diffusion models (sparsified fine-tuning)."""

__version__ = "0.1.0"
