"""Tiny random-weight Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints that transformers and
vLLM both load.

Sizes are chosen for CPU start-up speed: the language model has head_dim 64 (the smallest
the CPU paged-attention kernel accepts), the vision tower is two narrow blocks. The
tokenizer is a byte-level BPE trained here on a small built-in corpus, carrying the
family's special tokens and chat template, so prompts look exactly like real Qwen2-VL
prompts. Same seed, same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

# The family's special tokens, in the order of the real tokenizer (ids follow the BPE vocab).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# ChatML with Qwen2-VL's vision placeholders; a default system turn like the released
# Instruct checkpoints. `add_vision_id` prefixes "Picture N: " as the real template does.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. A picture shows a cat on a sofa.",
    "Describe this image. What is in the picture? Where is the dog? Find the banana.",
    "There are two people standing next to a red car in front of a house with a garden.",
    "def main():\n    print('hello world')\n    return 0\n",
    "0123456789 12 345 6789 3.14159 2026-11-25 100% 42",
    "这是一只猫。图片里有什么？请描述这张图片。狗在哪里？香蕉。你好，世界！",
    "<ref>the dog</ref><box>(120,340),(560,880)</box> bounding box coordinates",
    '```json\n[{"bbox_2d": [10, 20, 300, 400], "label": "cat"}]\n```',
    "Hello! How can I help you today? I am a helpful assistant. 😀 🐱 🚗",
]


def _train_tokenizer(vocab_size: int = 1200):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


#: family -> (transformers config, model and processor class names, patch size)
FAMILIES = {
    "qwen2-vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", 14),
    "qwen2.5-vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", 14),
    "qwen3-vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", 16),
}


def write(out_dir: Path, seed: int = 0, max_pixels: int = 448 * 448, family: str = "qwen2-vl") -> Path:
    """Write the checkpoint of `family` (a key of FAMILIES) to `out_dir` (created) and return it.

    Contents: config.json, generation_config.json, model.safetensors, tokenizer files with
    the chat template, preprocessor_config.json (and the processor's other configs).
    `max_pixels`: the image processor's pixel ceiling (the default keeps the tiny vision
    tower fast: 256 image tokens at most, 196 for Qwen3-VL's larger patches).
    """
    import torch
    import transformers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    config_name, model_name, processor_name, patch = FAMILIES[family]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = _train_tokenizer()
    ids = {t: raw.token_to_id(t) for t in SPECIAL_TOKENS}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    vocab_size = 64 * ((len(tokenizer) + 63) // 64)

    text = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        # (head_dim 64: the multimodal rotary sections cover its 32 frequencies)
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    if family == "qwen2-vl":
        vision = dict(depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2)
    elif family == "qwen2.5-vl":  # windowed attention in block 0, full in block 1, as the real ones mix them
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                      window_size=112, fullatt_block_indexes=[1])
    else:  # qwen3-vl: learned position embeddings (a square grid) and a deepstack layer
        text.update(head_dim=64, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                  "mrope_section": [12, 10, 10], "mrope_interleaved": True})
        for key in ("bos_token_id", "eos_token_id"):
            text.pop(key)
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                      num_position_embeddings=576, deepstack_visual_indexes=[0])
    vision.update(patch_size=patch, spatial_merge_size=2, temporal_patch_size=2)
    config = getattr(transformers, config_name)(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.architectures = [model_name]
    config.dtype = "float32"

    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.05)
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    ).save_pretrained(out_dir)
    _save_processor(out_dir, tokenizer, family, processor_name, patch, max_pixels)
    return out_dir


def _save_processor(out_dir: Path, tokenizer, family: str, processor_name: str, patch: int, max_pixels: int) -> None:
    import transformers
    from transformers import Qwen2VLImageProcessor

    factor = 2 * patch  # (pixels per image token along each side)
    image_processor = Qwen2VLImageProcessor(
        min_pixels=factor * factor * 4, max_pixels=max_pixels, patch_size=patch, merge_size=2,
        **({"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if family == "qwen3-vl" else {}),
    )
    video_name = "Qwen3VLVideoProcessor" if family == "qwen3-vl" else "Qwen2VLVideoProcessor"
    video = getattr(transformers, video_name, None)
    kwargs = {"video_processor": video(patch_size=patch)} if video is not None else {}
    processor = getattr(transformers, processor_name)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, **kwargs
    )
    processor.save_pretrained(out_dir)
    # Keep the template on the tokenizer too: vLLM and plain tokenizer users read it there.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
