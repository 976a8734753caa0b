"""Text generation: batched prefill + KV-cache decoding (``moejax.generation.decode``)."""

from moejax.generation.decode import (Generator, full_forward_logits, generate,  # noqa: F401
                                      left_pad, prepare, prompt_bucket, sample_logits,
                                      stop_at_strings)
