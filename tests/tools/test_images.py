import asyncio
import io
import struct
import time
import zlib

import numpy as np
import pytest
from advisor.tools.images import ImageLedger, UnknownImageError
from advisor.tools.profiles import PROFILES, Step3p7Profile
from advisor.tools.registry import BUILTIN
from advisor.tools.spec import ToolError
from advisor.tools.testdata import make_bar_chart
from PIL import Image

from advisor.messages import ImagePart


def test_ids_parents_and_boxes(ledger, astronaut):
    a = ledger.add(astronaut.crop((10, 20, 110, 220)), parent="img_0", box=(10, 20, 110, 220), op="crop")
    b = ledger.add(Image.new("RGB", (400, 800)), parent=a, box=(0, 0, 100, 200), op="zoom")
    assert (a, b) == ("img_1", "img_2") and ledger.ids() == ["img_0", "img_1", "img_2"]
    info = ledger.info(b)
    assert (info.parent, info.box, info.op, info.size) == ("img_1", (0, 0, 100, 200), "zoom", (400, 800))
    # a box on the zoomed crop maps back onto the photograph
    c = ledger.add(Image.new("RGB", (40, 40)), parent=b, box=(40, 80, 80, 120), op="crop")
    assert ledger.root_box(c) == ("img_0", (20.0, 40.0, 30.0, 50.0))
    assert "(= img_0 box [20, 40, 30, 50])" in ledger.describe(c)


def test_unknown_id_is_tool_error_and_key_error(ledger):
    with pytest.raises(ToolError, match="unknown image id 'img_7'; known ids: img_0") as e:
        ledger.get("img_7")
    assert isinstance(e.value, KeyError) and isinstance(e.value, UnknownImageError)
    with pytest.raises(KeyError):
        ledger.info("nope")


def test_ledger_copies_pixels(ledger):
    img = Image.new("RGB", (50, 50), "red")
    i = ledger.add(img)
    img.paste((0, 0, 255), (0, 0, 50, 50))
    assert ledger.get(i).getpixel((5, 5)) == (255, 0, 0)


def test_load_formats_and_transparency(tmp_path, astronaut):
    led = ImageLedger()
    astronaut.save(tmp_path / "a.jpg", quality=95)
    rgba = Image.new("RGBA", (60, 40), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 30, 40))
    rgba.save(tmp_path / "t.png")
    i = led.load(tmp_path / "a.jpg")
    assert led.get(i).size == (512, 512) and led.info(i).source == "a.jpg" and led.info(i).op == "input"
    j = led.load(tmp_path / "t.png")
    px = led.get(j)
    assert (
        px.mode == "RGB" and px.getpixel((45, 20)) == (255, 255, 255) and px.getpixel((5, 5)) == (0, 0, 255)
    )


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(60_000, 60_000))  # 3.6 gigapixels declared in 100 bytes
    t = time.perf_counter()
    with pytest.raises(ToolError, match="bomb.png.*(exceeds the cap|decompression bomb)"):
        ImageLedger().load(bomb)
    assert time.perf_counter() - t < 2  # refused from the header, not after decoding
    small = tmp_path / "small.png"
    Image.new("RGB", (200, 200)).save(small)
    with pytest.raises(ToolError, match="40000 pixels exceeds the cap of 10000"):
        ImageLedger(max_pixels=10_000).load(small)


def test_unreadable_files(tmp_path):
    led = ImageLedger()
    (tmp_path / "notes.png").write_text("not an image at all")
    with pytest.raises(ToolError, match="notes.png: not a readable image"):
        led.load(tmp_path / "notes.png")
    with pytest.raises(ToolError, match="not found"):
        led.load(tmp_path / "missing.png")
    buf = io.BytesIO()
    Image.new("RGB", (300, 300), "blue").save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:200])
    with pytest.raises(ToolError, match="cut.png: cannot decode"):
        led.load(tmp_path / "cut.png")
    Image.new("RGB", (10, 10)).save(tmp_path / "x.ico")
    with pytest.raises(ToolError, match="unsupported image format ICO"):
        led.load(tmp_path / "x.ico")
    assert len(led) == 0


def test_step3p7_costs_match_transformers_processor():
    from transformers.models.step3p7.image_processing_step3p7 import Step3p7ImageProcessor

    proc = Step3p7ImageProcessor()
    prof = Step3p7Profile()
    sizes = [
        (728, 728),
        (500, 800),
        (2000, 1000),
        (4000, 3000),
        (300, 1200),
        (20, 400),
        (3024, 100),
        (1100, 700),
    ]
    rng = np.random.default_rng(0)
    sizes += [tuple(int(v) for v in rng.integers(16, 5000, 2)) for _ in range(40)]
    for w, h in sizes:
        crops = proc.get_number_of_image_patches(h, w)
        assert prof.cost(w, h).local_crops == crops, (w, h)
        assert prof.cost(w, h).tokens == 169 + 81 * crops
    assert prof.cost(728, 728).tokens == 169 and prof.cost(728, 728).markers == 2


def test_encode_downscales_and_counts_tokens(ledger):
    data, media, tokens = ledger.encode("img_0")
    assert media == "image/jpeg" and tokens == 169  # a photograph travels as JPEG
    assert Image.open(io.BytesIO(data)).size == (512, 512)
    big = ledger.add(Image.new("RGB", (6048, 3024), "white"))
    data, _, tokens = ledger.encode(big)
    assert Image.open(io.BytesIO(data)).size == (3024, 1512)
    assert tokens == ledger.cost(big).tokens == 169 + 81 * 6 * 3
    _, _, small_tokens = ledger.encode(big, max_side=1008)  # a caller may spend fewer tokens
    assert (
        small_tokens == 169 + 81 * 2
        and ledger.encode(big, max_side=1008)[0] is ledger.encode(big, max_side=1008)[0]
    )
    gdata, _, gtok = ledger.encode(big, profile="generic")
    assert Image.open(io.BytesIO(gdata)).size == (1536, 768) and gtok == 55 * 28
    _, _, atok = ledger.encode("img_0", profile="anthropic")
    assert atok == -(-512 * 512 // 750)
    with pytest.raises(ValueError, match="unknown image profile 'gpt9'; known: step3p7, generic, anthropic"):
        ledger.encode("img_0", profile="gpt9")
    assert set(PROFILES) == {"step3p7", "generic", "anthropic"}


def test_noisy_photo_falls_back_to_jpeg():
    led = ImageLedger()
    noise = np.random.default_rng(1).integers(0, 255, (1200, 1200, 3), dtype=np.uint8)
    i = led.add(Image.fromarray(noise))
    data, media, _ = led.encode(i)
    assert media == "image/jpeg" and data[:2] == b"\xff\xd8"


def test_to_image_part(ledger):
    part = ledger.to_image_part("img_0")
    assert isinstance(part, ImagePart) and part.image_id == "img_0" and part.media_type == "image/jpeg"
    sent = np.asarray(Image.open(io.BytesIO(part.data)), dtype=float)
    assert np.abs(sent - np.asarray(ledger.get("img_0"), dtype=float)).mean() < 3
    # documents and charts stay lossless PNG, pixel for pixel
    chart = ledger.add(make_bar_chart([1, 2, 3]).image)
    part = ledger.to_image_part(chart)
    assert part.media_type == "image/png" and part.data_url().startswith("data:image/png;base64,")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(part.data))), np.asarray(ledger.get(chart)))


async def test_tools_add_to_the_ledger(ctx, astronaut):
    r = await BUILTIN["crop"].invoke({"image": "img_0", "box": [100, 50, 300, 210]}, ctx)
    assert not r.is_error and r.text.startswith("img_1: 200x160 px, crop of img_0 box [100, 50, 300, 210]")
    ((new_id, pil),) = r.images
    assert new_id == "img_1" and np.array_equal(np.asarray(pil), np.asarray(astronaut)[50:210, 100:300])
    r = await BUILTIN["zoom"].invoke(
        {"image": "img_1", "box": [0, 0, 0.5, 0.5], "coords": "norm1", "scale": 4}, ctx
    )
    assert r.images[0][1].size == (400, 320) and "(= img_0 box [100, 50, 200, 130])" in r.text
    r = await BUILTIN["zoom"].invoke({"image": "img_0", "box": [0, 0, 512, 512], "scale": 8}, ctx)
    assert r.images[0][1].size == (2048, 2048) and "capped from 8" in r.text
    r = await BUILTIN["bbox"].invoke({"image": "img_0", "boxes": [[10, 10, 100, 100]], "labels": ["x"]}, ctx)
    assert not r.is_error and ctx.images.info(r.images[0][0]).op == "bbox"
    r = await BUILTIN["find_regions"].invoke({"image": "img_0", "kind": "objects", "max_regions": 5}, ctx)
    assert not r.is_error and r.text.splitlines()[1].startswith("r0 object [") and len(r.images) == 1
    assert len(ctx.images) == 6


async def test_tool_errors_reach_the_model(ctx):
    cases = [
        ({"image": "img_3", "box": [0, 0, 10, 10]}, "unknown image id 'img_3'; known ids: img_0"),
        ({"image": "img_0", "box": [50, 50, 10, 10]}, "inverted"),
        ({"image": "img_0", "box": [0, 0, 10]}, "'box'"),
        ({"image": "img_0", "box": [0, 0, 10, 10], "coords": "cm"}, "'coords'"),
        ({"box": [0, 0, 10, 10]}, "'image'"),
    ]
    for args, needle in cases:
        r = await BUILTIN["crop"].invoke(args, ctx)
        assert r.is_error and needle in r.text, r.text
    r = await BUILTIN["bbox"].invoke({"image": "img_0", "boxes": []}, ctx)
    assert r.is_error and "'boxes'" in r.text
    r = await BUILTIN["crop"].invoke(
        {"image": "img_0", "box": [0, 0, 10, 10]}, ctx.__class__(workspace=ctx.workspace)
    )
    assert r.is_error and "no image ledger" in r.text
    assert len(ctx.images) == 1  # nothing was added by a failed call


async def test_concurrent_tool_calls_get_unique_ids(ctx):
    calls = [
        BUILTIN["crop"].invoke({"image": "img_0", "box": [i, i, i + 50, i + 50]}, ctx) for i in range(24)
    ]
    results = await asyncio.gather(*calls)
    ids = [r.images[0][0] for r in results]
    assert len(set(ids)) == 24 and set(ids) == {f"img_{i}" for i in range(1, 25)}


def test_exif_rotation_and_16_bit_scans(tmp_path, astronaut):
    photo = astronaut.crop((0, 0, 300, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # camera held upright: the viewer must rotate 90 degrees
    photo.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    led = ImageLedger()
    assert led.get(led.load(tmp_path / "phone.jpg")).size == (200, 300)
    ramp = np.tile(np.linspace(1000, 60000, 256).astype(np.uint16), (20, 1))
    Image.fromarray(ramp).save(tmp_path / "scan16.png")
    scan = np.asarray(led.get(led.load(tmp_path / "scan16.png")))
    assert scan.shape == (20, 256, 3) and scan[0, 0, 0] == 0 and scan[0, -1, 0] == 255
    assert np.all(np.diff(scan[0, :, 0].astype(int)) >= 0)  # the ramp survives, not clipped to white


def test_profile_for_endpoints():
    from advisor.tools.profiles import profile_for

    assert profile_for("step-3.7-flash", "openai") == "step3p7"
    assert profile_for("stepfun-ai/Step3p7-Flash", "embedded") == "step3p7"
    assert profile_for("claude-opus-4-5", "anthropic") == "anthropic"
    assert profile_for("anthropic/claude-sonnet-4.5", "openai") == "anthropic"  # via OpenRouter
    assert profile_for("qwen2.5-vl-7b", "openai") == "generic"


async def test_small_model_argument_forms_are_accepted(ctx, astronaut):
    r = await BUILTIN["crop"].invoke({"image": 0, "box": "[100, 50, 300, 210]"}, ctx)
    assert not r.is_error and r.text.startswith("img_1: 200x160 px, crop of img_0")
    r = await BUILTIN["bbox"].invoke({"image": "img1", "boxes": "[[0, 0, 50, 50]]", "labels": '["x"]'}, ctx)
    assert not r.is_error and "bbox of img_1" in r.text
    r = await BUILTIN["zoom"].invoke({"image": "1", "box": "[0, 0, 50"}, ctx)
    assert r.is_error and "'box'" in r.text


def test_memory_budget_packs_old_images_losslessly(astronaut):
    led = ImageLedger(max_bytes=2 * 512 * 512 * 3)  # room for two astronauts
    ids = [led.add(astronaut.rotate(90 * i)) for i in range(5)]
    assert led.memory()["pixels"] <= led.max_bytes and led.memory()["packed"] > 0
    for i, image_id in enumerate(ids):  # every image comes back pixel for pixel, in any order
        assert np.array_equal(np.asarray(led.get(image_id)), np.asarray(astronaut.rotate(90 * i)))
    assert led.memory()["pixels"] <= led.max_bytes and len(led) == 5 and led.ids() == ids
    crop = led.add(led.get("img_1").crop((0, 0, 10, 10)), parent="img_1", box=(0, 0, 10, 10), op="crop")
    assert led.info(crop).parent == "img_1" and led.root_box(crop) == ("img_1", (0.0, 0.0, 10.0, 10.0))
