from pathlib import Path

import pytest
from advisor.tools.images import ImageLedger
from advisor.tools.spec import ToolContext
from PIL import Image
from skimage import data


@pytest.fixture(scope="session")
def astronaut() -> Image.Image:
    """A real photograph (512x512 RGB) bundled with scikit-image, available offline."""
    return Image.fromarray(data.astronaut())


@pytest.fixture
def ledger(astronaut) -> ImageLedger:
    led = ImageLedger()
    led.add(astronaut, op="input", source="astronaut.png")
    return led


@pytest.fixture
def ctx(tmp_path: Path, ledger) -> ToolContext:
    ws = tmp_path / "ws"
    ws.mkdir()
    return ToolContext(workspace=ws, images=ledger)
