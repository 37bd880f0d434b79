"""The OpenAI-compatible server: a thin front end over the engine."""
