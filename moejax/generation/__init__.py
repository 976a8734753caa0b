"""Text generation: batched prefill + KV-cache decoding (``moejax.generation.decode``)."""

from moejax.generation.decode import (Generator, end_ids, full_forward_logits,  # noqa: F401
                                      generate, left_pad, prepare, prompt_bucket, sample_logits,
                                      stop_at_strings)
