"""``qwen-vl-grounding``: parse grounded answers and draw them, from the shell.

    qwen-vl-grounding parse --family qwen2.5-vl --image-size 1024x768 < answer.txt
    qwen-vl-grounding draw --image photo.jpg --family qwen-vl --out boxes.png --text '...'

`parse` prints a JSON list of boxes (phrase, box in original pixels, image index, kind, the
model's own numbers). `draw` parses the answer against the image file's size, writes the
picture with the boxes as PNG, and prints the same JSON. The answer is read from ``--text`` or
else from standard input. Exit status: 0 done, 1 the image, the font or the output file could
not be used, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence

from server.grounding.parse import parse_grounding
from server.grounding.types import Family, GroundingBox

# WIDTHxHEIGHT; the separator may also be X or U+00D7 (the multiplication sign).
_SIZE = re.compile(r"\s*(\d{1,9})\s*[xX\u00d7]\s*(\d{1,9})\s*")


def _size(value: str) -> tuple[int, int]:
    match = _SIZE.fullmatch(value)
    if match is None or int(match.group(1)) <= 0 or int(match.group(2)) <= 0:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 1024x768, got {value!r}")
    return int(match.group(1)), int(match.group(2))


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-vl-grounding",
        description="Parse the boxes in a Qwen-VL answer, or draw them onto the image.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--family",
        required=True,
        choices=[f.value for f in Family],
        help="the model generation that wrote the answer",
    )
    common.add_argument("--text", help="the model's answer (default: read standard input)")
    common.add_argument(
        "--model-size",
        type=_size,
        action="append",
        metavar="WxH",
        help="size the image had when given to the model, if it was downscaled first "
        "(Qwen2.5-VL only; once per image)",
    )
    common.add_argument(
        "--min-pixels", type=_positive, help="Qwen2.5-VL processor min_pixels (default 3136)"
    )
    common.add_argument(
        "--max-pixels", type=_positive, help="Qwen2.5-VL processor max_pixels (default 12845056)"
    )
    common.add_argument(
        "--image-index",
        type=int,
        help="which image the boxes refer to (default: the last one)",
    )

    parse_cmd = commands.add_parser(
        "parse", parents=[common], help="print the boxes as JSON (read the answer from stdin)"
    )
    parse_cmd.add_argument(
        "--image-size",
        type=_size,
        action="append",
        required=True,
        metavar="WxH",
        help="original size of an image of the request; repeat for several, in order",
    )

    draw_cmd = commands.add_parser(
        "draw", parents=[common], help="draw the boxes onto the image and write a PNG"
    )
    draw_cmd.add_argument("--image", required=True, help="the picture the answer is about")
    draw_cmd.add_argument("--out", required=True, help="where to write the PNG")
    draw_cmd.add_argument("--font", help="a TrueType/OpenType font for the labels")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    text = args.text if args.text is not None else sys.stdin.read()
    if args.command == "parse":
        _print(_boxes(parser, args, text, args.image_size))
        return 0
    return _draw(parser, args, text)


def _boxes(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    text: str,
    sizes: list[tuple[int, int]],
) -> list[GroundingBox]:
    try:
        return parse_grounding(
            text,
            args.family,
            sizes,
            model_sizes=args.model_size,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            image_index=args.image_index,
        )
    except ValueError as exc:
        parser.error(str(exc))  # exits with status 2


def _print(boxes: list[GroundingBox]) -> None:
    # Phrases stay readable (击掌, not \u51fb\u638c) where the terminal takes UTF-8.
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "")
    readable = encoding in ("utf8", "utf_8")
    json.dump([b.to_dict() for b in boxes], sys.stdout, ensure_ascii=not readable, indent=2)
    sys.stdout.write("\n")


def _draw(parser: argparse.ArgumentParser, args: argparse.Namespace, text: str) -> int:
    # Pillow and the drawing code are imported here so that `parse` stays light.
    from PIL import Image, ImageOps

    from server.grounding.draw import draw_boxes

    if args.image_index not in (None, 0, -1):
        parser.error("draw takes one image; --image-index must be 0 or left out")
    try:
        with Image.open(args.image) as image:
            # upright, as the server showed it to the model (boxes are in that frame)
            try:
                picture = ImageOps.exif_transpose(image)
            except Exception:  # malformed EXIF: unrotated, as the server takes it
                picture = image.copy()
            picture.load()
    except (OSError, Image.DecompressionBombError) as exc:  # (the bomb error is not an OSError)
        return _fail(f"cannot read image {args.image}: {exc}")
    boxes = _boxes(parser, args, text, [picture.size])
    try:
        drawn = draw_boxes(picture, boxes, font_path=args.font)
    except OSError as exc:
        return _fail(f"cannot load font {args.font}: {exc}")
    try:
        drawn.save(args.out, format="PNG")
    except OSError as exc:
        return _fail(f"cannot write {args.out}: {exc}")
    _print(boxes)
    return 0


def _fail(message: str) -> int:
    print(f"qwen-vl-grounding: {message}", file=sys.stderr)
    return 1
