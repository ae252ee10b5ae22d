import math

import numpy as np
import pytest
from advisor.tools import vision
from advisor.tools.boxes import MIN_SIDE, pixel_box
from advisor.tools.spec import ToolError
from advisor.tools.testdata import make_bar_chart, make_receipt, make_table
from advisor.tools.vision import PALETTE, bbox, crop, find_regions, iou, zoom
from PIL import Image


def test_crop_equals_array_slice(astronaut):
    arr = np.asarray(astronaut)
    out = crop(astronaut, [100, 50, 300, 210])
    assert out.size == (200, 160)
    assert np.array_equal(np.asarray(out), arr[50:210, 100:300])


@pytest.mark.parametrize(
    "coords,box", [("norm1", [0.25, 0.125, 0.5, 0.75]), ("norm1000", [250, 125, 500, 750])]
)
def test_normalised_coords_map_to_pixels(astronaut, coords, box):
    arr = np.asarray(astronaut)  # 512 x 512
    out = crop(astronaut, box, coords=coords)
    assert np.array_equal(np.asarray(out), arr[64:384, 128:256])


def test_partial_box_is_clamped(astronaut):
    out = crop(astronaut, [-40, 480, 60, 700])
    assert np.array_equal(np.asarray(out), np.asarray(astronaut)[480:512, 0:60])


def test_tiny_box_grows_to_min_side_inside_image(astronaut):
    assert pixel_box([100, 100, 104, 103], astronaut.size) == (88, 87, 116, 115)
    # at the corner the grown box is shifted back inside
    assert pixel_box([0, 0, 2, 2], astronaut.size) == (0, 0, MIN_SIDE, MIN_SIDE)
    assert pixel_box([510, 510, 512, 512], astronaut.size) == (484, 484, 512, 512)
    small = Image.new("RGB", (20, 10))
    assert pixel_box([1, 1, 2, 2], small.size) == (0, 0, 20, 10)


@pytest.mark.parametrize(
    "box,coords,needle",
    [
        ([300, 50, 100, 210], "pixel", "inverted"),
        ([100, 50, 100, 210], "pixel", "empty"),
        ([float("nan"), 0, 10, 10], "pixel", "NaN"),
        ([0, 0, math.inf, 10], "pixel", "NaN or infinite"),
        ([600, 600, 700, 700], "pixel", "wholly outside the 512x512"),
        ([-50, -50, -1, -1], "pixel", "wholly outside"),
        ([1, 2, 3], "pixel", "4 numbers"),
        (["a", 2, 3, 4], "pixel", "4 numbers"),
        ([100, 100, 400, 400], "norm1", "did you mean norm1000 or pixel"),
        ([0, 0, 10, 10], "inches", "coords must be one of"),
    ],
)
def test_bad_boxes_are_clear_tool_errors(astronaut, box, coords, needle):
    with pytest.raises(ToolError, match=needle.replace("(", r"\(")):
        crop(astronaut, box, coords=coords)


def test_zoom_sizes_filter_and_cap(astronaut):
    out = zoom(astronaut, [100, 100, 200, 150], scale=3)
    assert out.size == (300, 150)
    # Lanczos upsampling then downsampling gives the original region back closely.
    back = np.asarray(out.resize((100, 50), Image.Resampling.LANCZOS), dtype=float)
    ref = np.asarray(astronaut, dtype=float)[100:150, 100:200]
    assert np.abs(back - ref).mean() < 6
    big = zoom(astronaut, [0, 0, 512, 256], scale=8)
    assert big.size == (vision.MAX_ZOOM_SIDE, vision.MAX_ZOOM_SIDE // 2)
    for bad in (0, -1, float("nan"), 9):
        with pytest.raises(ToolError, match="scale"):
            zoom(astronaut, [0, 0, 50, 50], scale=bad)


def test_bbox_colours_along_edges_and_labels(astronaut):
    boxes = [[50, 80, 200, 220], [260, 300, 480, 470]]
    before = np.asarray(astronaut).copy()
    out = np.asarray(bbox(astronaut, boxes, labels=["face", "hand"]))
    assert np.array_equal(np.asarray(astronaut), before)  # input untouched
    for (x1, y1, x2, y2), colour in zip(boxes, PALETTE, strict=False):
        colour = np.array(colour)
        assert (out[y1 + 30 : y2 - 5, x1] == colour).all()  # left edge
        assert (out[y1 + 30 : y2 - 5, x2 - 1] == colour).all()  # right edge
        assert (out[y2 - 1, x1 + 5 : x2 - 5] == colour).all()  # bottom edge
        # the label tag sits just above the box, filled with the box's colour
        tag = out[max(0, y1 - 14) : y1 - 2, x1 : x1 + 20].reshape(-1, 3)
        assert (tag == colour).all(axis=1).mean() > 0.3
    assert not np.array_equal(PALETTE[0], PALETTE[1])
    with pytest.raises(ToolError, match="2 labels for 1 boxes"):
        bbox(astronaut, [[0, 0, 50, 50]], labels=["a", "b"])
    with pytest.raises(ToolError, match="inverted"):
        bbox(astronaut, [[0, 0, 50, 50], [90, 90, 10, 10]])
    single = np.asarray(bbox(astronaut, [10, 100, 60, 160]))  # one flat box is accepted too
    assert (single[110:150, 10] == PALETTE[0]).all()


def _match(found, truth, thresh):
    return [max((iou(t, f) for f in found), default=0.0) >= thresh for t in truth]


@pytest.mark.parametrize("values", [[3, 7, 5, 9, 2], [10, 1, 4], [5] * 8, [0.5, 8]])
def test_find_regions_chart_bars(values):
    chart = make_bar_chart(values)
    regions = find_regions(chart.image, kind="elements")
    found = [r.box for r in regions]
    assert all(_match(found, chart.bar_boxes, 0.85)), (found, chart.bar_boxes)
    assert len(found) == len(values)  # axis text, ticks and grid lines are not elements


@pytest.mark.parametrize("rows,cols,line,seed", [(6, 5, 1, 2), (3, 2, 3, 3), (8, 4, 2, 4)])
def test_find_regions_table_cells_exact(rows, cols, line, seed):
    table = make_table(rows=rows, cols=cols, seed=seed, line=line)
    cells = [r.box for r in find_regions(table.image, kind="cells", max_regions=200)]
    assert len(cells) == rows * cols
    assert all(_match(cells, table.cell_boxes, 0.99)), (cells, table.cell_boxes)


def test_find_regions_table_cells_and_text():
    table = make_table(rows=4, cols=3, seed=1)
    cells = [r.box for r in find_regions(table.image, kind="cells")]
    assert len(cells) == 12
    assert all(_match(cells, table.cell_boxes, 0.99)), (cells, table.cell_boxes)
    text = [r.box for r in find_regions(table.image, kind="text")]
    assert all(_match(text, table.text_boxes, 0.5)), (text, table.text_boxes)
    both = find_regions(table.image, kind="all", max_regions=100)
    assert {r.kind for r in both} == {"cell", "text"}


def test_find_regions_text_lines_cover_receipt():
    receipt = make_receipt(seed=3, photo=False)
    found = [r.box for r in find_regions(receipt.image, kind="text", max_regions=200)]
    h, w = receipt.image.height, receipt.image.width
    covered = np.zeros((h, w), bool)
    for x1, y1, x2, y2 in found:
        covered[y1:y2, x1:x2] = True
    ink = np.asarray(receipt.image.convert("L")) < 128
    for x1, y1, x2, y2 in receipt.line_boxes:
        if y2 - y1 < 8:  # the "-----" separator rules are not text
            continue
        line_ink = ink[y1:y2, x1:x2]
        assert covered[y1:y2, x1:x2][line_ink].mean() > 0.97, (x1, y1, x2, y2)
    # no region is taller than two lines: lines are not merged together
    assert max(b[3] - b[1] for b in found) < 2 * 15 * 1.55


def test_find_regions_on_photo_and_errors(astronaut):
    regions = find_regions(astronaut, kind="objects", max_regions=10)
    assert 1 <= len(regions) <= 10
    for r in regions:
        x1, y1, x2, y2 = r.box
        assert 0 <= x1 < x2 <= 512 and 0 <= y1 < y2 <= 512
    with pytest.raises(ToolError, match="kind must be one of"):
        find_regions(astronaut, kind="faces")
    assert find_regions(Image.new("RGB", (200, 100), "white")) == []


def test_left_labels_and_frames_are_not_tables(astronaut):
    out = np.asarray(bbox(astronaut, [[100, 100, 200, 130]], labels=["r0"], label_at="left"))
    tag = out[102:112, 85:97].reshape(-1, 3)
    assert (tag == PALETTE[0]).all(axis=1).mean() > 0.3  # the tag sits left of the box's top corner
    assert (out[60:98, 100:200] == np.asarray(astronaut)[60:98, 100:200]).all()  # nothing drawn above
    with pytest.raises(ToolError, match="label_at"):
        bbox(astronaut, [[0, 0, 50, 50]], label_at="below")
    chart = make_bar_chart([1, 2]).image  # the plot frame encloses one big box: not a table
    assert find_regions(chart, kind="cells") == []


def test_all_adapts_to_photos_and_documents(astronaut):
    assert vision.is_photo(astronaut) and not vision.is_photo(make_table().image)
    assert {r.kind for r in find_regions(astronaut, "all")} == {"object"}
    objects = find_regions(astronaut, "objects", max_regions=30)
    # the mission patch on the suit (about x 130-215, y 345-430) is one of the candidates
    assert max(iou(r.box, (130, 345, 215, 430)) for r in objects) > 0.6
    assert all(iou(a.box, b.box) < 0.6 for i, a in enumerate(objects) for b in objects[:i])
