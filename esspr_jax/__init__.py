"""esspr-jax: unified vision-language same-style product retrieval in JAX/Flax."""

__version__ = "0.1.0"
