"""Finding a font that draws Chinese labels.

Nothing is downloaded at run time. The install recipe puts a CJK font on the machine
(Debian's ``fonts-wqy-microhei``); this module looks for it and for the other common CJK fonts
at their usual paths, then asks fontconfig. A candidate is only accepted if it really has CJK
glyphs (fontconfig happily answers with a Latin font).

Without any CJK font, labels fall back to Pillow's built-in font: Latin text still shows,
Chinese characters come out as empty boxes.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

CJK_FONT_PATHS = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",  # Debian/Ubuntu fonts-wqy-microhei
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",  # fonts-wqy-zenhei
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",  # fonts-noto-cjk
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",  # Arch, Fedora
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",  # fonts-droid-fallback
    "/System/Library/Fonts/PingFang.ttc",  # macOS
    "/System/Library/Fonts/STHeiti Light.ttc",
    "C:/Windows/Fonts/msyh.ttc",  # Windows
)

# Two different ideographs: a font without CJK glyphs draws both as the same ".notdef" box.
_PROBE = ("击", "掌")


def find_cjk_font() -> Path | None:
    """Path of an installed font with CJK glyphs, or None. The answer is cached."""
    return _find_cjk_font()


@functools.lru_cache(maxsize=1)
def _find_cjk_font() -> Path | None:
    for candidate in CJK_FONT_PATHS:
        path = Path(candidate)
        if path.is_file() and has_cjk_glyphs(path):
            return path
    path = _fontconfig_match()
    if path is not None and has_cjk_glyphs(path):
        return path
    return None


def _fontconfig_match() -> Path | None:
    fc_match = shutil.which("fc-match")
    if fc_match is None:
        return None
    try:
        result = subprocess.run(
            [fc_match, "--format=%{file}", ":lang=zh-cn"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(result.stdout.strip())
    return path if result.returncode == 0 and path.is_file() else None


def has_cjk_glyphs(path: str | Path) -> bool:
    """True when the font at `path` loads and draws distinct shapes for two ideographs."""
    try:
        font = ImageFont.truetype(str(path), 24)
    except OSError:
        return False
    first, second = (_render(font, char) for char in _PROBE)
    return first.getbbox() is not None and first.tobytes() != second.tobytes()


def _render(font: ImageFont.FreeTypeFont, char: str) -> Image.Image:
    image = Image.new("L", (32, 32))
    ImageDraw.Draw(image).text((2, 2), char, fill=255, font=font)
    return image


def load_font(size: int, font_path: str | Path | None = None) -> Font:
    """A font of `size` pixels for labels.

    `font_path` wins when given, and must load (raises OSError otherwise: a user who names a
    font wants to know it is unusable). Otherwise the CJK font `find_cjk_font` finds, else
    Pillow's built-in font.
    """
    if font_path is not None:
        return ImageFont.truetype(str(font_path), size)
    found = find_cjk_font()
    if found is not None:
        return ImageFont.truetype(str(found), size)
    return ImageFont.load_default(size=size)
