"""Image preprocessing of Qwen-VL: a direct bicubic resize to a square, then CLIP normalization.

This matches the published pipeline (PIL `convert("RGB")`, torchvision `Resize((448, 448),
BICUBIC)` on a PIL image, which is PIL's resize, `ToTensor`, `Normalize` with OpenAI-CLIP
mean/std): no aspect-ratio preservation, no crop, no padding.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_pil(image: object) -> Image.Image:
    """Accept a PIL image or an HWC uint8 array (what vLLM's image parser may hand over)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
        return Image.fromarray(image)
    raise TypeError(f"expected a PIL image or an HxWxC uint8 array, got {type(image).__name__}")


def preprocess_image(image: object, image_size: int) -> torch.Tensor:
    """Return the normalized float32 pixels of one image, shape [3, image_size, image_size]."""
    pil = to_pil(image).convert("RGB").resize(
        (image_size, image_size), Image.Resampling.BICUBIC
    )
    pixels = np.asarray(pil, dtype=np.float32) / np.float32(255.0)
    pixels = (pixels - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(
        CLIP_STD, dtype=np.float32
    )
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def preprocess_images(images: list[object], image_size: int) -> torch.Tensor:
    """Stack `preprocess_image` over `images`: [num_images, 3, image_size, image_size]."""
    return torch.stack([preprocess_image(image, image_size) for image in images])
