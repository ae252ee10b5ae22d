"""Serving: reserved for the scheduler, the KV block pool and the HTTP server that the serving issue adds
(continuous batching over `engine.model`, with `engine.text` for the chat format). Empty until then;
today `engine.LLM` runs batches of prompts directly.
"""
