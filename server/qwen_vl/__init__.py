"""First-generation Qwen-VL support for vLLM (out-of-tree model plugin)."""
