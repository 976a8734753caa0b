"""Text generation: batched prefill + KV-cache decoding (``moejax.generation.decode``)."""

from moejax.generation.decode import (Generator, cut_at_stop, end_ids,  # noqa: F401
                                      full_forward_logits, generate, left_pad, prepare,
                                      prompt_bucket, sample_logits, stop_at_strings)
