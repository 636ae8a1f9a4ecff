"""Evaluation: perplexity, synthetic long-context probes (passkey, NIAH, KV retrieval, variable tracking), lm-eval."""
