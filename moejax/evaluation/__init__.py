"""Evaluation: perplexity / bits-per-byte per dataset, expert statistics, plots."""
