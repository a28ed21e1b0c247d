"""clipzoo_jax: CLIP fine-tuned with pseudo-labels from model-zoo experts (CLIPTeX), in JAX."""

__version__ = "0.1.0"
