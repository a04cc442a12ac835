"""`qwen-vl-tiny-model`: write a tiny random-weight checkpoint (tests, demos, benchmarks)."""

from __future__ import annotations

import argparse
from pathlib import Path
from server.help_format import DefaultsHelpFormatter

ARCHS = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen-vl")


def write_tiny_model(arch: str, out: Path, seed: int = 0, max_pixels: int | None = None) -> Path:
    """Write the checkpoint for `arch` into `out` and return it. Deterministic per seed.

    `max_pixels`: the image processor's pixel ceiling of Qwen2-VL, Qwen2.5-VL and Qwen3-VL
    (default 448x448). Qwen-VL resizes every picture to 448x448, so it takes none
    (ValueError)."""
    from server.tiny.qwen2_vl import FAMILIES, write

    if arch in FAMILIES:
        return write(out, seed, family=arch) if max_pixels is None else write(out, seed, max_pixels, family=arch)
    if max_pixels is not None:
        raise ValueError(f"{arch} has no image pixel ceiling to set")
    if arch == "qwen-vl":
        from server.qwen_vl.tiny import write_tiny_qwen_vl

        return write_tiny_qwen_vl(out, seed)
    raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen-vl-tiny-model", description=__doc__,
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--arch", choices=ARCHS, default="qwen2-vl")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="not qwen-vl: the image processor's pixel ceiling (default 448x448)")
    args = parser.parse_args(argv)
    try:
        path = write_tiny_model(args.arch, args.out, args.seed, args.max_pixels)
    except ValueError as exc:
        parser.error(str(exc))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
