"""vLLM multimodal processing for Qwen-VL: processing info, dummy inputs and the processor.

Prompt contract: each image of `multi_modal_data["image"]` is announced in the prompt by the
adjacent pair `<img></img>` (ids 151857, 151858), as the chat template renders it
(`Picture N: <img></img>\\n`). The processor replaces each pair, in order, with
`<img>` + 256 x `<imgpad>` + `</img>`; the model writes the image's 256 embeddings onto the
`<imgpad>` positions only. A prompt that already carries the expanded form is accepted as is.
This works the same for text prompts (vLLM tokenizes them first) and token-id prompts.

There is no Hugging Face processor: images are preprocessed here (`image.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transformers import BatchFeature

from server.qwen_vl.config import QWenConfig, VisualConfig
from server.qwen_vl.image import preprocess_images
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalDataDict, MultiModalInput
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    ProcessorInputs,
    PromptUpdateDetails,
    TimingContext,
)

IMAGE_PLACEHOLDER = "<img></img>"


def picture_prefix(index: int) -> str:
    """The chat format's announcement of the `index`-th image (1-based) of a conversation."""
    return f"Picture {index}: {IMAGE_PLACEHOLDER}\n"


def image_token_ids(visual: VisualConfig) -> tuple[int, int, int]:
    """(`<img>`, `</img>`, `<imgpad>`) ids: image_start_id and the two ids after it."""
    start = visual.image_start_id
    return start, start + 1, start + 2


class QwenVLProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> QWenConfig:
        return self.ctx.get_hf_config(QWenConfig)

    def get_visual_config(self) -> VisualConfig:
        return self.get_hf_config().visual_config

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        # Preprocessing is fixed (448 x 448 bicubic, CLIP normalization): no options.
        return {}

    def get_num_image_tokens(self) -> int:
        """Embeddings per image: the resampler's query count, independent of image size."""
        return self.get_visual_config().n_queries

    def get_mm_max_tokens_per_item(
        self, seq_len: int, mm_counts: Mapping[str, int]
    ) -> Mapping[str, int]:
        return {"image": self.get_num_image_tokens()}


class QwenVLDummyInputsBuilder(BaseDummyInputsBuilder[QwenVLProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return "".join(picture_prefix(i) for i in range(1, mm_counts.get("image", 0) + 1))

    def get_dummy_mm_data(
        self,
        seq_len: int,
        mm_counts: Mapping[str, int],
        mm_options: MultiModalDummyOptions,
    ) -> MultiModalDataDict:
        size = self.info.get_visual_config().image_size
        return {
            "image": self._get_dummy_images(
                width=size,
                height=size,
                num_images=mm_counts.get("image", 0),
                overrides=mm_options.get("image"),
            )
        }


def count_image_slots(prompt: Sequence[int], visual: VisualConfig) -> int:
    """Image slots in a token prompt: `<img></img>` pairs and already expanded
    `<img>` + n_queries x `<imgpad>` + `</img>` spans."""
    start, end, pad = image_token_ids(visual)
    n = visual.n_queries
    count = 0
    for i, token in enumerate(prompt):
        if token != start:
            continue
        if i + 1 < len(prompt) and prompt[i + 1] == end:
            count += 1
        elif i + n + 1 < len(prompt) and prompt[i + n + 1] == end and all(
            t == pad for t in prompt[i + 1 : i + n + 1]
        ):
            count += 1
    return count


class QwenVLMultiModalProcessor(BaseMultiModalProcessor[QwenVLProcessingInfo]):
    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext) -> MultiModalInput:
        """Check that the prompt has one image slot per image, then let vLLM expand them."""
        num_images = inputs.mm_data_items.get_all_counts().get("image", 0)
        if isinstance(inputs.prompt, list):
            slots = count_image_slots(inputs.prompt, self.info.get_visual_config())
            if slots != num_images:
                raise ValueError(
                    f"the prompt has {slots} image slot(s) ('{IMAGE_PLACEHOLDER}', e.g. "
                    f"'{picture_prefix(1).strip()}') but {num_images} image(s) were given"
                )
        return super().apply(inputs, timing_ctx)

    def _call_hf_processor(
        self,
        hf_data: Mapping[str, object],
        hf_kwargs: Mapping[str, object],
    ) -> BatchFeature:
        images = list(hf_data.get("images") or [])
        size = self.info.get_visual_config().image_size
        return BatchFeature({"pixel_values": preprocess_images(images, size)})

    def _get_mm_fields_config(
        self,
        hf_inputs: BatchFeature,
        hf_processor_mm_kwargs: Mapping[str, object],
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            "pixel_values": MultiModalFieldConfig.batched("image"),
            "image_embeds": MultiModalFieldConfig.batched("image"),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        start, end, pad = image_token_ids(self.info.get_visual_config())
        expanded = [start] + [pad] * self.info.get_num_image_tokens() + [end]
        replacement = PromptUpdateDetails.select_token_id(expanded, embed_token_id=pad)
        # Alternatives per image, tried in order: the compact pair, or an already expanded span.
        return [
            PromptReplacement(modality="image", target=[start, end], replacement=replacement),
            PromptReplacement(modality="image", target=expanded, replacement=replacement),
        ]
