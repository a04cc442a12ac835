"""OpenAI-compatible serving of the Qwen-VL model family on vLLM."""

__version__ = "0.1.0"
