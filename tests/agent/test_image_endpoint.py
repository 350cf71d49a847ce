"""``POST /v1/predict/{model}`` with real PNG/JPEG bytes, decoded by OpenCV."""

from __future__ import annotations

import aiohttp
import cv2
import numpy as np
import pytest

from edgefleet.core.bundle.manifest import ImagePreprocessing
from edgefleet.core.errors import BadRequest
from edgefleet.core.processing.image import letterbox, preprocess, read_header, to_tensor
from tests.support.images import BIG, IMAGE_PRE, IMG, png
from tests.support.tiny import agent_config, tiny_reference


@pytest.fixture
async def agent(start_agent, make_tiny_bundle, keys, tmp_path):
    bundle = make_tiny_bundle("img1", preprocessing=IMAGE_PRE)
    return await start_agent(
        agent_config(tmp_path, keys, [bundle], server={"max_body_bytes": 200_000})
    )


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


def expected(img: np.ndarray) -> np.ndarray:
    return tiny_reference((img.astype(np.float32) / 255).reshape(1, 4))[0]


async def test_png_body_gives_labelled_predictions(session, agent):
    async with session.post(f"{agent.base}/v1/predict/tiny", data=png(BIG)) as r:
        assert r.status == 200, await r.text()
        doc = await r.json()
    probs = expected(IMG)
    assert (doc["model"], doc["version"], doc["source"]) == ("tiny", "img1", "edge")
    assert doc["latency_ms"] > 0
    assert [p["label"] for p in doc["predictions"]] == [
        ["a", "b", "c"][i] for i in np.argsort(-probs)
    ]
    assert doc["predictions"][0]["confidence"] == pytest.approx(probs.max(), rel=1e-5)
    assert doc["confidence"] == pytest.approx(probs.max(), rel=1e-5)


async def test_multipart_jpeg_and_top_k(session, agent):
    _, jpg = cv2.imencode(".jpg", BIG, [cv2.IMWRITE_JPEG_QUALITY, 100])
    form = aiohttp.FormData()
    form.add_field("image", jpg.tobytes(), filename="x.jpg", content_type="image/jpeg")
    async with session.post(f"{agent.base}/v1/predict/tiny?top_k=1", data=form) as r:
        assert r.status == 200, await r.text()
        doc = await r.json()
    assert len(doc["predictions"]) == 1
    assert doc["predictions"][0]["label"] == ["a", "b", "c"][int(np.argmax(expected(IMG)))]


@pytest.mark.parametrize(
    ("what", "body", "message"),
    [
        ("empty", b"", "empty image body"),
        ("text", b"hello, I am not an image", "not a JPEG or PNG"),
        ("truncated png", png(BIG)[:40], "corrupt or truncated"),
        ("corrupt jpeg", b"\xff\xd8\xff\xe0" + b"\x00" * 300, "corrupt or truncated"),
        ("gif", b"GIF89a" + b"\x00" * 50, "not a JPEG or PNG"),
    ],
)
async def test_bad_images_are_400(session, agent, what, body, message):
    async with session.post(f"{agent.base}/v1/predict/tiny", data=body) as r:
        assert r.status == 400, what
        assert message in (await r.json())["error"]
    async with session.post(f"{agent.base}/v1/predict/tiny", data=png(BIG)) as r:
        assert r.status == 200


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header announcing a huge image, followed by a tiny body."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


async def test_decompression_bomb_is_refused_without_allocating(session, agent):
    # Refused from the PNG header, before OpenCV allocates (issue 9, finding 5; memory
    # bounds against a real agent process: tests/agent/test_http_hardening.py).
    async with session.post(
        f"{agent.base}/v1/predict/tiny", data=png_claiming(100_000, 100_000)
    ) as r:
        assert r.status == 413
        assert "100000x100000 pixels" in (await r.json())["error"]
    async with session.post(f"{agent.base}/v1/predict/tiny", data=png(BIG)) as r:
        assert r.status == 200


async def test_multipart_without_image_field_and_bad_query(session, agent):
    form = aiohttp.FormData()
    form.add_field("picture", png(BIG), filename="x.png")
    async with session.post(f"{agent.base}/v1/predict/tiny", data=form) as r:
        assert r.status == 400
        assert "field named 'image'" in (await r.json())["error"]
    async with session.post(f"{agent.base}/v1/predict/tiny?top_k=lots", data=png(BIG)) as r:
        assert r.status == 400
        assert "top_k" in (await r.json())["error"]


async def test_oversized_image_is_413(session, agent):
    noise = np.random.default_rng(0).integers(0, 255, (600, 600), dtype=np.uint8)
    body = png(noise)
    assert len(body) > 200_000
    async with session.post(f"{agent.base}/v1/predict/tiny", data=body) as r:
        assert r.status == 413


def test_letterbox_keeps_aspect_and_maps_boxes_back():
    spec = ImagePreprocessing(input="x", width=100, height=100, color="RGB", resize="letterbox")
    img = np.zeros((50, 200, 3), np.uint8)
    img[:, 100:] = 255  # right half white
    tensor, transform = preprocess(png(img), spec)
    assert tensor.shape == (1, 100, 100, 3)
    # 200x50 scaled by 0.5 -> 100x25, padded 37 rows above (centred).
    assert transform.pad_y == 37 and transform.pad_x == 0
    assert tensor[0, 10].max() == 0  # padding row
    assert tensor[0, 50, 75].min() == pytest.approx(1.0)  # white half
    # The box covering the whole content maps back to the whole image.
    box = (0.0, 37 / 100, 1.0, 62 / 100)
    assert transform.box_to_pixels(box) == [0.0, 0.0, 200.0, 50.0]


def _encoded(kind: str, img: np.ndarray) -> bytes:
    params = {
        "png": (".png", []),
        "jpeg": (".jpg", []),
        "progressive": (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        "progressive 4:4:4": (
            ".jpg",
            [
                cv2.IMWRITE_JPEG_PROGRESSIVE,
                1,
                cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
            ],
        ),
    }
    ext, flags = params[kind]
    ok, buf = cv2.imencode(ext, img, flags)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("kind", ["png", "jpeg", "progressive", "progressive 4:4:4"])
@pytest.mark.parametrize("channels", [1, 3])
def test_header_dimensions_match_what_opencv_decodes(kind, channels):
    """The sizes the budget check reads from the header are the decoded ones."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (37, 123, channels), dtype=np.uint8).squeeze()
    data = _encoded(kind, img)
    header = read_header(data)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert (header.height, header.width) == decoded.shape[:2]
    assert header.format == ("PNG" if kind == "png" else "JPEG")
    # Progressive files buffer every coefficient: a decode costs more than baseline's.
    buffered = kind.startswith("progressive")
    assert (header.coefficient_bytes_per_pixel > 0) == buffered
    assert header.decode_bytes("BGR") > header.decode_bytes("GRAY")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0\0\0\0\0\0\x10", "0x16 pixels"),
        (b"\x89PNG\r\n\x1a\n\0\0\0\x0dXXXX", "without an IHDR"),
        (b"\xff\xd8\xff\xda\0\x08\x01\x01\0\0\x3f\0", "without a frame header"),
    ],
)
def test_headers_that_lie_or_lack_are_400(data, message):
    with pytest.raises(BadRequest, match=message):
        read_header(data)


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_rgb_is_converted_after_resizing_with_the_same_result(resize):
    """Resizing before the BGR->RGB swap (no full-size copy) changes no value."""
    rng = np.random.default_rng(2)
    img = rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)
    spec = ImagePreprocessing(
        input="x", width=32, height=24, color="RGB", resize=resize, interpolation="area"
    )
    rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if resize == "letterbox":
        want, _ = letterbox(rgb, 32, 24, cv2.INTER_AREA)
    else:
        want = cv2.resize(rgb, (32, 24), interpolation=cv2.INTER_AREA)
    tensor, _ = preprocess(png(img), spec)
    np.testing.assert_array_equal(tensor, to_tensor(want, spec))
