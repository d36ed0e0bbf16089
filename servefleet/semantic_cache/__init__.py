"""Semantic cache for LLM pipelines: embed a prompt on CPU, find a similar earlier prompt in a vector
index, answer from Redis on a hit; shared by every cache replica and kept across restarts."""
