"""What the checkpoints' own (Hugging Face) processors make of a prompt: the reference that
the server's prompts are checked against on the real engine."""

from __future__ import annotations


def reference_tokenizer(server):
    """The checkpoint's tokenizer, loaded here as a client would (`server.arch`,
    `server.model_dir`: see the engine test modules' server fixtures)."""
    from transformers import AutoTokenizer

    if server.arch == "qwen-vl":
        from server.qwen_vl.plugin import register

        register()
    return AutoTokenizer.from_pretrained(server.model_dir)


def hf_prompt_tokens(server, images, text: str) -> int:
    """Prompt tokens of one user turn (the pictures, then `text`) as the reference processor
    counts them, image tokens included."""
    if server.arch in ("qwen2-vl", "qwen2.5-vl", "qwen3-vl"):
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(server.model_dir)
        messages = [{"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return int(processor(text=[prompt], images=images or None, return_tensors="pt")["input_ids"].shape[1])
    if server.arch == "qwen-vl":
        # No Hugging Face processor without remote code: the checkpoint's tokenizer on the
        # Qwen-VL-Chat prompt, each <img></img> holding the model's 256 image tokens.
        tok = reference_tokenizer(server)
        picture_lines = "".join(f"Picture {i + 1}: <img></img>\n" for i in range(len(images)))
        prompt = (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                  f"{picture_lines}{text}<|im_end|>\n<|im_start|>assistant\n")
        return len(tok.encode(prompt)) + 256 * len(images)
    raise AssertionError(f"no reference processor for {server.arch}")
