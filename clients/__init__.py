"""Clients of qwen-vl-serve: the `qwen-vl-bench` load generator and the side-by-side
comparison with vLLM's own OpenAI server (`qwen-vl-bench compare`).

Nothing here imports the server package or vLLM: the load generator talks HTTP only, so it
measures any OpenAI-compatible chat-completions endpoint the same way.
"""
