"""The ``qwen-vl-grounding`` command."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from PIL import Image

from server.grounding import parse_grounding
from server.grounding.cli import main
from server.grounding.draw import PALETTE

from . import samples as S


def run(monkeypatch, capsys, argv, stdin=""):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_parse_reads_stdin_and_prints_boxes_as_json(monkeypatch, capsys):
    argv = ["parse", "--family", "qwen2.5-vl", "--image-size", "640x465"]
    code, out, _ = run(monkeypatch, capsys, argv, S.QWEN25_ITEMS_AND_COUNT)
    assert code == 0
    printed = json.loads(out)
    expected = parse_grounding(S.QWEN25_ITEMS_AND_COUNT, "qwen2.5-vl", [(640, 465)])
    assert printed == [b.to_dict() for b in expected]
    assert printed[-1]["phrase"] == "martini glass"
    assert {"phrase", "box", "image_index"} <= printed[0].keys()


def test_parse_keeps_chinese_readable(monkeypatch, capsys):
    argv = ["parse", "--family", "qwen-vl", "--image-size", "2048x1365"]
    _, out, _ = run(monkeypatch, capsys, argv, S.QWEN_VL_CHAT_HIGHFIVE)
    assert "击掌" in out


def test_parse_text_option_and_several_images(monkeypatch, capsys):
    argv = ["parse", "--family", "qwen-vl", "--image-size", "100x100", "--image-size", "2000x1000",
            "--text", S.QWEN_VL_CHAT_HIGHFIVE]  # fmt: skip
    code, out, _ = run(monkeypatch, capsys, argv, "ignored <box>(1,1),(2,2)</box>")
    assert code == 0
    (box,) = json.loads(out)
    assert box["image_index"] == 1
    assert box["box"] == [1072, 509, 1176, 602]


def test_parse_model_size_and_pixel_bounds(monkeypatch, capsys):
    text = '{"bbox_2d": [1022, 770, 2044, 1540]}'
    argv = ["parse", "--family", "qwen2.5-vl", "--image-size", "4080x3072",
            "--model-size", "2040x1536", "--max-pixels", "12845056", "--text", text]  # fmt: skip
    _, out, _ = run(monkeypatch, capsys, argv)
    assert json.loads(out)[0]["box"] == [2040, 1536, 4080, 3072]


@pytest.mark.parametrize(
    "argv",
    [
        ["parse", "--family", "qwen-vl", "--image-size", "0x10"],
        ["parse", "--family", "qwen-vl", "--image-size", "wide"],
        ["parse", "--family", "qwen4-vl", "--image-size", "10x10"],
        ["parse", "--family", "qwen-vl"],
        ["parse", "--family", "qwen-vl", "--image-size", "10x10", "--image-index", "3"],
    ],
)
def test_bad_arguments_exit_with_status_2(monkeypatch, capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        run(monkeypatch, capsys, argv)
    assert exit_info.value.code == 2


def test_draw_writes_a_png_with_the_boxes(monkeypatch, capsys, tmp_path):
    picture = tmp_path / "in.jpg"
    Image.new("RGB", (400, 300), (128, 128, 128)).save(picture, quality=100)
    out_png = tmp_path / "out.png"
    argv = ["draw", "--image", str(picture), "--family", "qwen-vl", "--out", str(out_png)]
    code, out, _ = run(monkeypatch, capsys, argv, "<ref>击掌</ref><box>(250,400),(750,900)</box>")
    assert code == 0
    (box,) = json.loads(out)
    assert box["box"] == [100, 120, 300, 270]
    with Image.open(out_png) as png:
        assert png.format == "PNG" and png.size == (400, 300)
        rgb = png.convert("RGB")
        assert rgb.getpixel((100, 200)) == PALETTE[0]  # left edge
        assert rgb.getpixel((299, 200)) == PALETTE[0]  # right edge
        assert rgb.getpixel((200, 269)) == PALETTE[0]  # bottom edge


def test_draw_maps_and_draws_on_the_upright_picture(monkeypatch, capsys, tmp_path):
    """A phone photo stored sideways (EXIF orientation 6): the server shows the model the
    upright picture and maps its boxes there, so the command must too."""
    picture = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.new("RGB", (400, 300), (128, 128, 128)).save(picture, quality=100, exif=exif)
    out_png = tmp_path / "out.png"
    argv = ["draw", "--image", str(picture), "--family", "qwen-vl", "--out", str(out_png)]
    code, out, _ = run(monkeypatch, capsys, argv, "<ref>a</ref><box>(250,400),(750,900)</box>")
    assert code == 0
    (box,) = json.loads(out)
    assert box["box"] == [75, 160, 225, 360]  # in the upright 300x400 frame
    with Image.open(out_png) as png:
        assert png.size == (300, 400)
        assert png.convert("RGB").getpixel((75, 250)) == PALETTE[0]  # left edge


def test_draw_reports_unreadable_files(monkeypatch, capsys, tmp_path):
    argv = ["draw", "--image", str(tmp_path / "missing.png"), "--family", "qwen-vl",
            "--out", str(tmp_path / "o.png"), "--text", ""]  # fmt: skip
    code, _, err = run(monkeypatch, capsys, argv)
    assert code == 1
    assert "cannot read image" in err


def test_draw_reports_a_picture_over_pillows_pixel_limit(monkeypatch, capsys, tmp_path):
    """Pillow's decompression-bomb error is not an OSError: it ended the command in a traceback."""
    picture = tmp_path / "huge.png"
    Image.new("1", (1000, 1000)).save(picture)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400_000)  # 1,000,000 pixels: over twice the limit
    argv = ["draw", "--image", str(picture), "--family", "qwen-vl", "--out", str(tmp_path / "o.png"), "--text", ""]
    code, _, err = run(monkeypatch, capsys, argv)
    assert code == 1
    assert "cannot read image" in err and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_draw_reports_an_unusable_font(monkeypatch, capsys, tmp_path):
    picture = tmp_path / "in.png"
    Image.new("RGB", (40, 30)).save(picture)
    argv = ["draw", "--image", str(picture), "--family", "qwen-vl", "--out",
            str(tmp_path / "o.png"), "--font", str(tmp_path / "nofont.ttf"),
            "--text", "<ref>a</ref><box>(1,1),(500,500)</box>"]  # fmt: skip
    code, _, err = run(monkeypatch, capsys, argv)
    assert code == 1
    assert "cannot load font" in err


def test_command_in_a_real_process_reads_standard_input():
    script = "import sys; from server.grounding.cli import main; sys.exit(main())"
    result = subprocess.run(
        [sys.executable, "-c", script, "parse", "--family", "qwen3-vl", "--image-size", "480x640"],
        input=S.QWEN3_FREE_SPACE_POINT,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (point,) = json.loads(result.stdout)
    assert point["kind"] == "point"
    assert point["points"] == [[444, 396]]
