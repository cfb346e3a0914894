"""The header reader against Pillow: same sizes on good files, never "fine" where Pillow refuses."""

from __future__ import annotations

import io
import random
import warnings

import numpy as np
import pytest
from PIL import Image

from mtssl_lightning.data.image_header import header_size
from mtssl_lightning.data.sources import probe_image


def _photo(width: int = 61, height: int = 47) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _encoded() -> dict[str, bytes]:
    """Files as cameras and libraries write them: the JPEG and PNG flavours screening meets."""
    photo = _photo()
    exif = Image.Exif()
    exif[0x010F] = "camera"
    exif[0x011A] = (300, 1)
    exif[0x0128] = 2
    files = {}

    def save(name: str, image: Image.Image, **kwargs) -> None:
        buffer = io.BytesIO()
        image.save(buffer, **kwargs)
        files[name] = buffer.getvalue()

    save("baseline.jpg", photo, format="JPEG", quality=90)
    save("progressive.jpg", photo, format="JPEG", progressive=True)
    save("grey.jpg", photo.convert("L"), format="JPEG")
    save("cmyk.jpg", photo.convert("CMYK"), format="JPEG")
    save("exif.jpg", photo, format="JPEG", exif=exif)
    save("big_exif.jpg", photo, format="JPEG", exif=exif, comment=b"x" * 9000)  # the SOF lies beyond the first block
    save("icc.jpg", photo, format="JPEG", icc_profile=b"\0" * 3000)
    save("restart.jpg", photo, format="JPEG", restart_marker_blocks=1)
    save("wide.jpg", _photo(400, 3), format="JPEG")
    save("rgb.png", photo, format="PNG")
    save("rgba.png", photo.convert("RGBA"), format="PNG")
    save("grey.png", photo.convert("L"), format="PNG")
    save("grey_alpha.png", photo.convert("LA"), format="PNG")
    save("bits.png", photo.convert("1"), format="PNG")
    save("palette.png", photo.convert("P"), format="PNG", transparency=0)  # tRNS: left to Pillow
    save("deep.png", Image.fromarray(np.arange(47 * 61, dtype=np.uint16).reshape(47, 61) * 20), format="PNG")
    save("interlaced_dpi.png", photo, format="PNG", dpi=(72, 72))
    save("text.png", photo, format="PNG", pnginfo=_text_info())
    return files


def _text_info():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Comment", "made for a test")
    return info


FILES = _encoded()


def _pillow_size(data: bytes) -> tuple[int, int] | None:
    """What screening with Pillow alone decides: the size if it opens, else ``None``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size if image.size[0] >= 1 and image.size[1] >= 1 else None
    except Exception:  # noqa: BLE001
        return None


def _write(tmp_path, data: bytes, name: str = "f") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("name", sorted(FILES))
def test_the_size_read_from_the_header_is_pillows(tmp_path, name):
    size = header_size(_write(tmp_path, FILES[name], name))
    expected = Image.open(io.BytesIO(FILES[name])).size
    if name == "palette.png":
        assert size is None  # a tRNS chunk: left to Pillow, on purpose
    else:
        assert size == expected


def test_other_formats_are_left_to_pillow(tmp_path):
    photo = _photo()
    for fmt in ("WEBP", "GIF", "BMP", "TIFF", "PPM"):
        buffer = io.BytesIO()
        photo.save(buffer, format=fmt)
        assert header_size(_write(tmp_path, buffer.getvalue())) is None, fmt
    assert header_size(_write(tmp_path, b"just some text, not a picture")) is None


def test_damaged_headers_are_never_called_fine_when_pillow_refuses_them(tmp_path):
    """Truncations of each file's header (about 300 cuts each) and 300 random byte changes per file (in
    the header, where both readers look): whenever the header reader gives a size, Pillow opens
    the file with that size. The damage must also make the reader decline often (it does not
    accept everything) and accept some damaged files (it is not declining everything)."""
    rng = random.Random(0)
    declined = accepted = 0
    path = tmp_path / "f"
    for name, data in FILES.items():
        end = _header_end(data)
        cases = [data[:cut] for cut in range(0, end + 16, max(1, end // 300))]
        for _ in range(300):
            damaged = bytearray(data)
            for _ in range(rng.choice((1, 1, 2, 4))):
                damaged[rng.randrange(2, end)] = rng.randrange(256)
            cases.append(bytes(damaged))
        for case in cases:
            path.write_bytes(case)
            size = header_size(path)
            if size is None:
                declined += 1
                continue
            accepted += 1
            assert _pillow_size(case) == size, (name, case[:64])
    assert declined > 3000 and accepted > 1000, (declined, accepted)


def _header_end(data: bytes) -> int:
    """Where the image data starts (JPEG: after the start-of-scan marker, PNG: the IDAT chunk)."""
    at = data.find(b"\xff\xda") if data[:2] == b"\xff\xd8" else data.find(b"IDAT")
    return at + 8


def test_probe_reasons_are_pillows_alone(tmp_path, monkeypatch):
    """``probe_image`` with the header reader gives, file for file, today's verdict (Pillow only):
    the good files, a 12-bit JPEG, a PNG with a broken checksum, truncated and empty files."""
    jpeg = bytearray(FILES["baseline.jpg"])
    jpeg[jpeg.find(b"\xff\xc0") + 4] = 12  # sample precision
    png = bytearray(FILES["rgb.png"])
    png[20] ^= 1  # inside IHDR: the checksum no longer matches
    cases = dict(FILES, **{"deep.jpg": bytes(jpeg), "bad.png": bytes(png), "cut.jpg": FILES["exif.jpg"][:300], "empty.png": b""})
    paths = {name: _write(tmp_path, data, name) for name, data in cases.items()}
    assert header_size(paths["deep.jpg"]) is None and header_size(paths["bad.png"]) is None
    fast = {name: probe_image(path) for name, path in paths.items()}
    monkeypatch.setattr("mtssl_lightning.data.sources.header_size", lambda path: None)
    assert fast == {name: probe_image(path) for name, path in paths.items()}
    assert sum(reason is None for reason in fast.values()) == len(FILES)
