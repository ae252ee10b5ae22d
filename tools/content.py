"""Content parts: the text and images a tool result or a chat message is made of.

They live here, below both `tools` and `advisor`, because tools produce them (the image ledger encodes
`ImagePart`s for the model) and `advisor.messages` builds messages from them; neither has to reach up.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass


@dataclass
class TextPart:
    text: str


@dataclass
class ImagePart:
    """An encoded image (PNG or JPEG bytes), already downscaled for the model that will see it."""

    data: bytes
    media_type: str = "image/png"
    image_id: str | None = None  # the image ledger id (img_0, img_1, ...) when it came from one

    def base64(self) -> str:
        return base64.b64encode(self.data).decode("ascii")

    def data_url(self) -> str:
        return f"data:{self.media_type};base64,{self.base64()}"


Part = TextPart | ImagePart
