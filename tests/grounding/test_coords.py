"""Coordinate frames: Qwen2.5-VL's smart_resize and the mapping to original pixels."""

from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from server.grounding import Family, smart_resize
from server.grounding.coords import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    model_frame,
    to_model,
    to_pixel,
)


@pytest.fixture(scope="module")
def hf_smart_resize():
    """transformers' own `smart_resize`, compiled from the installed source file.

    Importing the module would import torch (20 s here); the function itself needs only
    `math`, so it is lifted out of the file with `ast` and compiled alone.
    """
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        pytest.skip("transformers is not installed")
    path = Path(spec.origin).parent / "models" / "qwen2_vl" / "image_processing_qwen2_vl.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    func = next(
        (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "smart_resize"),
        None,
    )
    if func is None:
        pytest.fail(f"{path} no longer defines smart_resize: re-check the Qwen2.5-VL resize")
    namespace: dict = {"math": math}
    exec(compile(ast.Module(body=[func], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["smart_resize"]


@given(
    height=st.integers(1, 20000),
    width=st.integers(1, 20000),
    bounds=st.sampled_from(
        [
            (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS),  # the checkpoints' preprocessor_config
            (56 * 56, 28 * 28 * 1280),  # transformers' class default
            (256 * 28 * 28, 1280 * 28 * 28),  # README's suggested token range
            (512 * 28 * 28, 2048 * 28 * 28),  # cookbooks' API calls
        ]
    ),
)
def test_smart_resize_matches_installed_transformers(hf_smart_resize, height, width, bounds):
    assume(max(height, width) / min(height, width) <= 200)  # transformers refuses the rest
    min_pixels, max_pixels = bounds
    ours = smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
    theirs = hf_smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
    assert ours == theirs


@pytest.mark.parametrize(
    ("original", "printed_by_notebook"),
    [
        # QwenLM/Qwen2.5-VL cookbooks/ocr.ipynb prints inputs['image_grid_thw'] * 14 as
        # (height, width) next to the image size, for two of its pictures.
        ((870, 1398), (1400, 868)),
        ((576, 864), (868, 588)),
    ],
)
def test_smart_resize_matches_sizes_printed_in_the_cookbook(original, printed_by_notebook):
    width, height = original
    assert smart_resize(height, width) == printed_by_notebook


def test_default_max_pixels_is_the_checkpoints_not_transformers_class_default():
    # The Qwen2.5-VL cookbook answers about the 4080x3072 Origamis.jpg with y up to 1900;
    # that fits the frame of max_pixels 12845056 but not that of 1280*28*28.
    _, height = model_frame(Family.QWEN2_5_VL, (4080, 3072))
    assert height >= 1900
    _, small_height = model_frame(Family.QWEN2_5_VL, (4080, 3072), max_pixels=1280 * 28 * 28)
    assert small_height < 1900


def test_smart_resize_does_not_raise_on_extreme_aspect_ratios():
    # transformers raises for a ratio above 200; parsing must stay total.
    height, width = smart_resize(1, 100000)
    assert height == 28 and width % 28 == 0 and width > height
    with pytest.raises(ValueError):
        smart_resize(0, 10)


@pytest.mark.parametrize("family", [Family.QWEN_VL, Family.QWEN2_VL, Family.QWEN3_VL])
@given(width=st.integers(1, 10000), height=st.integers(1, 10000))
def test_relative_families_use_a_1000_grid_whatever_the_size(family, width, height):
    assert model_frame(family, (width, height)) == (1000, 1000)


@given(
    value=st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300),
    frame=st.integers(1, 5000),
    extent=st.integers(1, 5000),
)
def test_to_pixel_clamps_into_the_image(value, frame, extent):
    assert 0 <= to_pixel(value, frame, extent) <= extent


@given(frame=st.integers(1, 5000), extent=st.integers(1, 5000), data=st.data())
def test_grid_round_trip_is_within_half_a_grid_step(frame, extent, data):
    pixel = data.draw(st.integers(0, extent))
    back = to_pixel(to_model(pixel, frame, extent), frame, extent)
    assert abs(back - pixel) <= 0.5 * extent / frame + 0.5


def test_relative_grid_edges_map_to_image_edges():
    assert to_pixel(0, 1000, 2048) == 0
    assert to_pixel(1000, 1000, 2048) == 2048
    assert to_pixel(500, 1000, 2048) == 1024
