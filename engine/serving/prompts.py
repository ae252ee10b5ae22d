"""Images into a rendered chat prompt: each placeholder becomes the checkpoint's image-token layout, and
the pixels become the engine's image inputs (shared by the embedded endpoint and the server)."""

from __future__ import annotations

import io
from typing import Any


def image_inputs(llm: Any, tokenizer: Any, images: list[bytes], text: str, where: Any = None):
    """(text with each image placeholder expanded, the pixel inputs or None); ValueError naming `where`
    (default: the checkpoint) when the checkpoint cannot take images."""
    if not images:
        return text, None
    where = where or llm.path
    if llm.vision is None or llm.config.vision is None:
        raise ValueError(f"{where}: this checkpoint has no vision tower; it cannot take image inputs")
    patch_id = tokenizer.token_to_id("<im_patch>")
    if patch_id != llm.config.image_token_id:
        raise ValueError(
            f"{where}: tokenizer <im_patch> id {patch_id} != config image_token_id {llm.config.image_token_id}"
        )
    from advisor.engine.text.chat import expand_image_placeholders
    from advisor.engine.text.image_processing import ImageProcessorConfig, preprocess
    from PIL import Image, UnidentifiedImageError

    try:
        pils = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"an image could not be decoded: {e}") from None
    processed = preprocess(pils, ImageProcessorConfig.from_vision_config(llm.config.vision))
    text = expand_image_placeholders(text, processed.token_texts())
    return text, {
        "pixel_values": processed.pixel_values,
        "pixel_values_local": processed.pixel_values_local,
        "num_local_patches": processed.num_local_patches,
    }
