"""`python -m clients.bench_handoff`'s options (its timing runs on the real engine in
tests/api/test_image_handoff_engine.py)."""

from __future__ import annotations

import argparse

import pytest

from clients.bench_handoff import main, parse_sizes


def test_sizes_are_width_x_height_lists():
    assert parse_sizes("448x448, 1920X1080") == [(448, 448), (1920, 1080)]


@pytest.mark.parametrize("text", ["", "448", "448x", "0x10", "axb", "1x2x3", "-4x4"])
def test_a_malformed_size_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="WIDTHxHEIGHT"):
        parse_sizes(text)


def test_too_few_requests_is_refused_before_any_engine_starts(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--model", "/nonexistent", "--requests", "1"])
    assert exc.value.code == 2
    assert "--requests must be at least 2" in capsys.readouterr().err
