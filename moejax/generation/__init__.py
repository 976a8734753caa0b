"""Text generation: an autoregressive decoder with a KV cache (``moejax.generation.decode``)."""

from moejax.generation.decode import (Generator, full_forward_logits, prepare,  # noqa: F401
                                      sample_logits)
