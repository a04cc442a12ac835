"""Workload bodies: deterministic, unique or repeated pictures as asked, fixed output."""

from __future__ import annotations

import base64
import io
import json
from collections import Counter

import pytest
from PIL import Image

from clients.workload import WorkloadSpec, build_workload, synthetic_image


def urls(body: bytes) -> list[str]:
    content = json.loads(body)["messages"][0]["content"]
    return [p["image_url"]["url"] for p in content if p.get("type") == "image_url"] if isinstance(content, list) else []


def test_synthetic_image_is_a_deterministic_picture_of_the_size():
    raw = synthetic_image(448, 300, seed=5)
    assert raw == synthetic_image(448, 300, seed=5)
    assert raw != synthetic_image(448, 300, seed=6)
    img = Image.open(io.BytesIO(raw))
    assert img.format == "JPEG" and img.size == (448, 300)
    # compresses like a photograph, not like a flat colour
    assert 10_000 < len(raw) < 200_000
    assert Image.open(io.BytesIO(synthetic_image(32, 16, 1, "PNG"))).format == "PNG"


def test_synthetic_image_rejects_bad_arguments():
    with pytest.raises(ValueError):
        synthetic_image(0, 10, 1)
    with pytest.raises(ValueError):
        synthetic_image(10, 10, 1, "BMP")


def test_unique_data_urls_differ_per_request():
    built = build_workload(WorkloadSpec(model="m", image_width=64, image_height=64), 12)
    all_urls = [u for b in built.bodies for u in urls(b)]
    assert len(all_urls) == 12 and len(set(all_urls)) == 12
    assert built.unique_images == 12 and built.files == {}
    header, _, payload = all_urls[0].partition(",")
    assert header == "data:image/jpeg;base64"
    assert Image.open(io.BytesIO(base64.b64decode(payload))).size == (64, 64)


def test_repeated_images_come_from_the_pool():
    spec = WorkloadSpec(model="m", image_width=32, image_height=32, repeat_share=1.0, pool_size=3)
    built = build_workload(spec, 60)
    counts = Counter(u for b in built.bodies for u in urls(b))
    assert len(counts) == 3 and sum(counts.values()) == 60


def test_partial_repeat_share_mixes_pool_and_unique():
    spec = WorkloadSpec(model="m", image_width=16, image_height=16, repeat_share=0.5, pool_size=2, seed=4)
    built = build_workload(spec, 200)
    counts = Counter(u for b in built.bodies for u in urls(b))
    repeated = sum(n for n in counts.values() if n > 1)
    assert 60 < repeated < 140  # about half of 200
    assert len(counts) > 60


def test_http_images_name_served_files():
    spec = WorkloadSpec(model="m", images="http", image_width=16, image_height=16, images_per_request=2)
    built = build_workload(spec, 5, "http://127.0.0.2:9000")
    for body in built.bodies:
        for url in urls(body):
            assert url.startswith("http://127.0.0.2:9000/img/")
            data, ctype = built.files[url.removeprefix("http://127.0.0.2:9000")]
            assert ctype == "image/jpeg" and data[:2] == b"\xff\xd8"
    assert len(built.files) == 10


def test_http_images_need_a_base_url():
    with pytest.raises(ValueError):
        build_workload(WorkloadSpec(model="m", images="http"), 1)


def test_text_only_body_and_fixed_output():
    built = build_workload(WorkloadSpec(model="m", images="none", prompt_words=10, max_tokens=7), 2)
    body = json.loads(built.bodies[0])
    assert isinstance(body["messages"][0]["content"], str)
    assert len(body["messages"][0]["content"].split()) == 12  # "Request s-i:" + 10 words
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 7 and body["ignore_eos"] is True and body["min_tokens"] == 7
    assert built.bodies[0] != built.bodies[1]  # prompts differ: no accidental prefix reuse


def test_output_length_can_be_left_free():
    body = json.loads(build_workload(WorkloadSpec(model="m", images="none", fixed_output=False), 1).bodies[0])
    assert "ignore_eos" not in body and "min_tokens" not in body


def test_workloads_are_deterministic_and_seeded():
    spec = WorkloadSpec(model="m", image_width=16, image_height=16, repeat_share=0.5)
    assert build_workload(spec, 10).bodies == build_workload(spec, 10).bodies
    other = WorkloadSpec(model="m", image_width=16, image_height=16, repeat_share=0.5, seed=1)
    assert set(map(bytes, build_workload(spec, 10).bodies)).isdisjoint(build_workload(other, 10).bodies)


@pytest.mark.parametrize(
    "kwargs",
    [{"images": "ftp"}, {"repeat_share": 1.5}, {"images_per_request": 0}, {"max_tokens": 0},
     {"repeat_share": 0.5, "pool_size": 0}],
)
def test_spec_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        WorkloadSpec(model="m", **kwargs)
