"""The image ledger: every image a task sees, by id (img_0, img_1, ...), with where it came from.

Input images get the first ids; each image a tool makes (crop, zoom, overlay) gets the next id and
records its parent and the pixel box of the parent it shows, so a box found on a zoomed crop can be
mapped back to the original. Images are immutable once added, so encodings are cached.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from advisor.tools.content import ImagePart
from advisor.tools.profiles import ImageCost, Profile, get_profile
from advisor.tools.spec import ToolError
from advisor.tools.vision import is_photo
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 50_000_000  # ~7000x7000; more is a decompression bomb, not a document
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # decoded pixels kept per ledger; the rest is packed as PNG
PNG_MAX_BYTES = 1_500_000  # above this an encoded PNG is re-sent as JPEG (photos, noise)
SUPPORTED_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF", "PPM")  # MPO: many phone JPEGs


class UnknownImageError(ToolError, KeyError):
    """An image id the ledger does not hold (a KeyError for dict-like callers, a ToolError for the model)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ImageInfo:
    id: str
    size: tuple[int, int]  # (width, height)
    parent: str | None = None
    box: tuple[int, int, int, int] | None = None  # pixel box of the parent this image shows
    op: str | None = None  # crop | zoom | bbox | regions | input | ...
    source: str | None = None  # file name for loaded images

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "size": list(self.size),
            "parent": self.parent,
            "box": list(self.box) if self.box else None,
            "op": self.op,
            "source": self.source,
        }


class ImageLedger:
    """Thread-safe store of a task's images; tools run in worker threads and may add concurrently.

    Decoded pixels are kept up to `max_bytes`; beyond that the least recently used images are kept
    as fast PNG (lossless) and decoded again on `get`, so a long task full of zooms, or many tasks
    in one process, cannot exhaust memory.
    """

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self._info: dict[str, ImageInfo] = {}
        self._pixels: OrderedDict[str, Image.Image] = OrderedDict()  # least recently used first
        self._packed: dict[str, bytes] = {}
        self._pixel_bytes = 0
        self._encoded: dict[tuple, tuple[bytes, str, int]] = {}
        self._lock = threading.RLock()

    # ---- store -------------------------------------------------------------------------------
    def add(
        self,
        image: Image.Image,
        parent: str | None = None,
        box=None,
        op: str | None = None,
        source: str | None = None,
    ) -> str:
        if not isinstance(image, Image.Image):
            raise TypeError(f"ImageLedger.add needs a PIL image, got {type(image).__name__}")
        if parent is not None:
            self.info(parent)
        w, h = image.size
        if w * h > self.max_pixels:
            raise ToolError(f"image of {w}x{h} px exceeds the ledger's cap of {self.max_pixels} pixels")
        box_t = tuple(int(v) for v in box) if box is not None else None
        if box_t is not None and len(box_t) != 4:
            raise ValueError(f"box must have 4 numbers, got {list(box)}")
        image = image.copy()  # the ledger owns its pixels: later edits by the caller cannot leak in
        with self._lock:
            image_id = f"img_{len(self._info)}"
            self._info[image_id] = ImageInfo(image_id, image.size, parent, box_t, op, source)
            self._keep(image_id, image)
        return image_id

    def get(self, image_id: str) -> Image.Image:
        with self._lock:
            if image_id in self._pixels:
                self._pixels.move_to_end(image_id)
                return self._pixels[image_id]
            packed = self._packed.get(image_id) if isinstance(image_id, str) else None
            if packed is None:
                raise UnknownImageError(f"unknown image id {image_id!r}; {self._known()}")
            with Image.open(io.BytesIO(packed)) as im:
                im.load()
                image = im.copy()
            self._keep(image_id, image)
            return image

    def _keep(self, image_id: str, image: Image.Image) -> None:
        """Hold decoded pixels, packing the least recently used others while over budget."""
        self._pixels[image_id] = image
        self._pixel_bytes += _nbytes(image)
        while self._pixel_bytes > self.max_bytes and len(self._pixels) > 1:
            old_id, old = self._pixels.popitem(last=False)
            if old_id not in self._packed:
                buf = io.BytesIO()
                old.save(buf, format="PNG", compress_level=1)
                self._packed[old_id] = buf.getvalue()
            self._pixel_bytes -= _nbytes(old)

    def memory(self) -> dict[str, int]:
        """Bytes held: decoded pixels and packed PNGs."""
        with self._lock:
            return {"pixels": self._pixel_bytes, "packed": sum(len(b) for b in self._packed.values())}

    def info(self, image_id: str) -> ImageInfo:
        try:
            return self._info[image_id]
        except (KeyError, TypeError):
            raise UnknownImageError(f"unknown image id {image_id!r}; {self._known()}") from None

    def ids(self) -> list[str]:
        return list(self._info)

    def __len__(self) -> int:
        return len(self._info)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._info

    def _known(self) -> str:
        ids = self.ids()
        return "known ids: " + ", ".join(ids) if ids else "the ledger holds no images yet"

    def root_box(self, image_id: str) -> tuple[str, tuple[float, float, float, float]]:
        """The original image this one descends from, and the box of it this image shows."""
        info = self.info(image_id)
        x1, y1, x2, y2 = 0.0, 0.0, float(info.size[0]), float(info.size[1])
        while info.parent is not None and info.box is not None:
            bx1, by1, bx2, by2 = info.box
            sx, sy = (bx2 - bx1) / info.size[0], (by2 - by1) / info.size[1]
            x1, x2 = bx1 + x1 * sx, bx1 + x2 * sx
            y1, y2 = by1 + y1 * sy, by1 + y2 * sy
            info = self.info(info.parent)
        return info.id, (x1, y1, x2, y2)

    # ---- files -------------------------------------------------------------------------------
    def load(self, path: str | Path, op: str = "input") -> str:
        """Read an image file (checked against the pixel cap before decoding) and add it."""
        path = Path(path)
        name = path.name
        if not path.is_file():
            raise ToolError(f"image file not found: {path}")
        try:
            with Image.open(path) as im:
                # PIL reads only the header here; refuse bombs before a single pixel is decoded.
                w, h = im.size
                if w * h > self.max_pixels:
                    raise ToolError(
                        f"{name}: {w}x{h} = {w * h} pixels exceeds the cap of {self.max_pixels} "
                        "(possible decompression bomb); downscale it first"
                    )
                if im.format not in SUPPORTED_FORMATS:
                    raise ToolError(
                        f"{name}: unsupported image format {im.format}; use {', '.join(SUPPORTED_FORMATS)}"
                    )
                im.load()
                image = _to_rgb(ImageOps.exif_transpose(im))
        except ToolError:
            raise
        except Image.DecompressionBombError as e:
            raise ToolError(f"{name}: refused as a decompression bomb ({e})") from None
        except UnidentifiedImageError:
            raise ToolError(
                f"{name}: not a readable image (supported: {', '.join(SUPPORTED_FORMATS)})"
            ) from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ToolError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None
        return self.add(image, op=op, source=name)

    # ---- encoding for a model ----------------------------------------------------------------
    def model_size(
        self, image_id: str, profile: str | Profile = "step3p7", max_side: int | None = None
    ) -> tuple[int, int]:
        w, h = self.info(image_id).size  # no need to decode a packed image for its size
        return get_profile(profile).fit(w, h, max_side)

    def cost(
        self, image_id: str, profile: str | Profile = "step3p7", max_side: int | None = None
    ) -> ImageCost:
        """Token cost of sending this image to the model `profile` describes."""
        return get_profile(profile).cost(*self.model_size(image_id, profile, max_side))

    def encode(
        self, image_id: str, profile: str | Profile = "step3p7", max_side: int | None = None
    ) -> tuple[bytes, str, int]:
        """(bytes, media type, image tokens) of the image as the model will see it, downscaled first."""
        prof = get_profile(profile)
        key = (image_id, prof, max_side)
        if key in self._encoded:
            return self._encoded[key]
        image = self.get(image_id)
        size = prof.fit(*image.size, max_side)
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        data, media_type = _encode_bytes(image)
        out = (data, media_type, prof.cost(*size).tokens)
        with self._lock:
            self._encoded[key] = out
        return out

    def to_image_part(
        self, image_id: str, profile: str | Profile = "step3p7", max_side: int | None = None
    ) -> ImagePart:
        data, media_type, _ = self.encode(image_id, profile, max_side)
        return ImagePart(data=data, media_type=media_type, image_id=image_id)

    def describe(self, image_id: str) -> str:
        """One line for the model: id, size, and where the image came from."""
        info = self.info(image_id)
        line = f"{info.id}: {info.size[0]}x{info.size[1]} px"
        if info.parent is None:
            op = info.op or "input"
            return line + (f" ({op} {info.source})" if info.source else f" ({op})")
        line += f", {info.op} of {info.parent} box {list(info.box) if info.box else 'full'}"
        root, rbox = self.root_box(image_id)
        if root != info.parent:
            line += f" (= {root} box {[round(v) for v in rbox]})"
        return line


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB on white: transparent areas of logos and screenshots must not turn black."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit and float scans: stretch, don't clip
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.round().astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _encode_bytes(image: Image.Image) -> tuple[bytes, str]:
    """PNG for documents, charts and screenshots (sharp edges, few colours); JPEG for photographs.

    Deciding from a thumbnail's colour count avoids compressing a photo as PNG only to throw it away.
    """
    buf = io.BytesIO()
    if not is_photo(image):
        image.save(buf, format="PNG", compress_level=3)
        if buf.tell() <= PNG_MAX_BYTES:
            return buf.getvalue(), "image/png"
        buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue(), "image/jpeg"


def _nbytes(image: Image.Image) -> int:
    return image.width * image.height * len(image.getbands())
