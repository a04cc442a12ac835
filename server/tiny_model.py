"""`qwen-vl-tiny-model`: write a tiny random-weight checkpoint (tests, demos, benchmarks)."""

from __future__ import annotations

import argparse
from pathlib import Path

ARCHS = ("qwen2-vl", "qwen-vl")


def write_tiny_model(arch: str, out: Path, seed: int = 0, max_pixels: int | None = None) -> Path:
    """Write the checkpoint for `arch` into `out` and return it. Deterministic per seed.

    `max_pixels`: the Qwen2-VL image processor's pixel ceiling (default 448x448). Qwen-VL
    resizes every picture to 448x448, so it takes none (ValueError)."""
    if arch == "qwen2-vl":
        from server.tiny.qwen2_vl import write

        return write(out, seed) if max_pixels is None else write(out, seed, max_pixels)
    if max_pixels is not None:
        raise ValueError(f"{arch} has no image pixel ceiling to set")
    if arch == "qwen-vl":
        from server.qwen_vl.tiny import write_tiny_qwen_vl

        return write_tiny_qwen_vl(out, seed)
    raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen-vl-tiny-model", description=__doc__)
    parser.add_argument("--arch", choices=ARCHS, default="qwen2-vl")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="qwen2-vl only: the image processor's pixel ceiling (default 448x448)")
    args = parser.parse_args(argv)
    try:
        path = write_tiny_model(args.arch, args.out, args.seed, args.max_pixels)
    except ValueError as exc:
        parser.error(str(exc))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
