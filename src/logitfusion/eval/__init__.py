"""Evaluation: the lm-eval backend (`lm`), our lm-eval task files (`tasks/`) and the results
record format (`records`)."""
