"""Test fixtures a user's tests can share with ours: `toy`, tiny random model families (real
Hugging Face directories, tokenizer included) built in seconds, so that anything fused, served or
evaluated can be tested without a download. Beside the front ends, not part of the research bench."""
