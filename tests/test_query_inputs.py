"""Query field validation and `Query.load_image`: transparency, 16-bit greyscale, colour modes and
the pixel limit checked from the header before decoding."""

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile

import probing.query as query_module
from probing import errors
from probing.query import MAX_IMAGE_PIXELS, Query, QueryError

from .conftest import noise_image


def test_query_error_is_the_one_from_errors():
    assert QueryError is errors.QueryError and issubclass(QueryError, (ValueError, errors.InputError))
    assert MAX_IMAGE_PIXELS == 50_000_000


@pytest.mark.parametrize("qid,expected", [("a", "a"), (7, "7"), (0, "0")])
def test_ids_are_strings_or_ints(qid, expected):
    assert Query(qid, "text").id == expected


@pytest.mark.parametrize("qid", [None, 1.5, True, ["a"], b"a", "", "  "])
def test_bad_ids(qid):
    with pytest.raises(QueryError, match="query id must"):
        Query(qid, "text")


def test_text_image_and_meta_types(tmp_path):
    assert Query("a", None, image="x.png").text == ""
    with pytest.raises(QueryError, match="query 'a': text must be a string, got int"):
        Query("a", 0)
    with pytest.raises(QueryError, match=r"query 'a': text has an invalid character '\\ud800' at position 2"):
        Query("a", "hi\ud800")
    for ok in ("x.png", tmp_path / "x.png", Image.new("RGB", (2, 2))):
        assert Query("a", "t", ok).image is ok
    for bad, name in ((3, "int"), (["x.png"], "list"), (b"x.png", "bytes"), (np.zeros((2, 2, 3)), "ndarray")):
        with pytest.raises(QueryError, match=f"query 'b': image must be None, a PIL image or a file path, got {name}"):
            Query("b", "t", bad)
    with pytest.raises(QueryError, match="query 'c': image path is empty"):
        Query("c", "t", "")
    with pytest.raises(QueryError, match="query 'd': meta must be a dict, got list"):
        Query("d", "t", meta=["x"])
    with pytest.raises(QueryError, match="query 'd': meta must be a dict, got NoneType"):
        Query("d", "t", meta=None)


def save(tmp_path: Path, im: Image.Image, name: str, **kw) -> Query:
    im.save(tmp_path / name, **kw)
    return Query(name, "", tmp_path / name)


def expected_on_white(alpha: np.ndarray, ink: int = 0) -> np.ndarray:
    """Colour `ink` at opacity alpha over white, as 8-bit."""
    a = alpha.astype(float) / 255
    return ink * a + 255 * (1 - a)


def test_transparent_png_of_black_text_is_black_on_white(tmp_path):
    im = Image.new("RGBA", (80, 24), (0, 0, 0, 0))  # transparent *black*: dropping alpha would give all black
    ImageDraw.Draw(im).text((4, 4), "REFUSE", fill=(0, 0, 0, 255), stroke_width=1)  # solid core
    got = np.asarray(save(tmp_path, im, "text.png").load_image(), dtype=float)
    alpha = np.asarray(im)[..., 3]
    assert (alpha == 0).mean() > 0.5 and (alpha == 255).any()
    assert np.array_equal(got[alpha == 0], np.full(((alpha == 0).sum(), 3), 255.0))
    assert np.array_equal(got[alpha == 255], np.zeros(((alpha == 255).sum(), 3)))
    assert np.abs(got - expected_on_white(alpha)[..., None]).max() <= 1  # anti-aliased edges blend


def test_la_and_palette_transparency_composite_onto_white(tmp_path):
    alpha = np.tile(np.array([0, 128, 255], dtype=np.uint8), (4, 1))
    la = Image.fromarray(np.stack([np.zeros_like(alpha), alpha], -1), mode="LA")
    got = np.asarray(save(tmp_path, la, "la.png").load_image(), dtype=float)
    assert np.abs(got[..., 0] - expected_on_white(alpha)).max() <= 1 and got[0, 0].tolist() == [255, 255, 255]
    pal = Image.new("P", (4, 2), 0)
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    rgb = save(tmp_path, pal, "p.png", transparency=0).load_image()
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 0)) == (200, 0, 0)
    gif = save(tmp_path, pal, "p.gif", transparency=0).load_image()
    assert gif.getpixel((0, 1)) == (255, 255, 255) and gif.getpixel((1, 0)) == (200, 0, 0)
    # an in-memory image is composited the same way
    assert Query("m", "", Image.new("RGBA", (2, 2), (0, 0, 0, 0))).load_image().getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)
    q = save(tmp_path, Image.fromarray(ramp), "g16.png")
    with Image.open(q.image) as im:
        assert im.mode.startswith("I")  # Pillow keeps the 16 bits ("I;16" or "I")
    got = np.asarray(q.load_image())
    assert np.array_equal(got[..., 0], np.rint(ramp / 257).astype(np.uint8))
    assert np.array_equal(got[..., 0], got[..., 2]) and got.max() == 255 and got.min() == 0
    assert np.array_equal(got[..., 0].ravel(), np.arange(256))  # the ramp stays a ramp, not mostly 255
    as_int32 = Query("i", "", Image.fromarray(ramp.astype(np.int32), mode="I")).load_image()
    assert np.array_equal(np.asarray(as_int32), got)


def test_colour_modes_become_rgb(tmp_path):
    cmyk = save(tmp_path, Image.new("CMYK", (2, 2), (255, 0, 0, 0)), "c.jpg", quality=100).load_image()
    assert cmyk.mode == "RGB" and np.abs(np.asarray(cmyk, dtype=int) - [0, 255, 255]).max() <= 3
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert save(tmp_path, pal, "pal.png").load_image().getpixel((1, 1)) == (10, 20, 30)
    assert save(tmp_path, Image.new("L", (2, 2), 77), "l.png").load_image().getpixel((0, 0)) == (77, 77, 77)
    assert save(tmp_path, Image.new("1", (2, 2), 1), "b.png").load_image().getpixel((0, 0)) == (255, 255, 255)
    rgb = noise_image(3, size=(5, 4))
    assert np.array_equal(np.asarray(save(tmp_path, rgb, "n.png").load_image()), np.asarray(rgb))


def png_1bit(path: Path, width: int, height: int) -> Path:
    """A valid all-black 1-bit PNG, written directly: a tiny file that declares a huge image."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = bytes((1 + (width + 7) // 8) * height)  # filter byte 0 + packed bits per row
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows, 1)) + chunk(b"IEND", b""))
    return path


def test_pixel_limit_refuses_before_decoding(tmp_path, monkeypatch):
    path = png_1bit(tmp_path / "bomb.png", 10_000, 10_000)
    assert path.stat().st_size < 100_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow's own check, above 89M
        with Image.open(path) as im:
            assert im.size == (10_000, 10_000) and im.mode == "1"

    def no_decoding(self):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not surface
        with pytest.raises(QueryError, match=r"query 'bomb': image .*bomb\.png is 10000x10000 = 100,000,000 pixels, "
                                             r"over the limit of 50,000,000.*MECHPROBE_MAX_IMAGE_PIXELS") as err:
            Query("bomb", "", path).load_image()
    assert err.value.__context__ is None  # no chained Pillow traceback


def test_pixel_limit_overrides(tmp_path, monkeypatch):
    q = save(tmp_path, noise_image(0, size=(20, 10)), "small.png")
    assert q.load_image().size == (20, 10)
    with pytest.raises(QueryError, match="200 pixels, over the limit of 199"):
        q.load_image(max_pixels=199)
    monkeypatch.setenv("MECHPROBE_MAX_IMAGE_PIXELS", "100")
    with pytest.raises(QueryError, match="over the limit of 100 "):
        q.load_image()
    assert q.load_image(max_pixels=200).size == (20, 10)  # the argument wins over the environment
    monkeypatch.setenv("MECHPROBE_MAX_IMAGE_PIXELS", "many")
    with pytest.raises(errors.InputError, match="MECHPROBE_MAX_IMAGE_PIXELS='many'"):
        q.load_image()
    monkeypatch.delenv("MECHPROBE_MAX_IMAGE_PIXELS")
    monkeypatch.setattr(query_module, "MAX_IMAGE_PIXELS", 50)
    with pytest.raises(QueryError, match="over the limit of 50 "):
        q.load_image()


def test_pillows_own_ceiling_is_a_query_error(tmp_path, monkeypatch):
    q = save(tmp_path, noise_image(0, size=(20, 10)), "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # Pillow refuses at twice its limit
    with pytest.raises(QueryError, match=r"query 'small.png': image .*small\.png is over Pillow's size limit.*"
                                         r"PIL\.Image\.MAX_IMAGE_PIXELS"):
        q.load_image()


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(QueryError, match=r"query 'gone': image file not found: .*gone\.png"):
        Query("gone", "", tmp_path / "gone.png").load_image()
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(QueryError, match=r"query 'broken': cannot read image .*broken\.jpg"):
        Query("broken", "", tmp_path / "broken.jpg").load_image()
    noise_image(0, size=(64, 64)).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:200])
    with pytest.raises(QueryError, match=r"query 'cut': cannot read image .*cut\.png"):
        Query("cut", "", tmp_path / "cut.png").load_image()


def test_check_images_names_every_unreadable_file_at_once(tmp_path):
    from probing.query import check_images

    noise_image(0, size=(64, 48)).save(tmp_path / "ok.png")
    noise_image(1, size=(64, 48)).save(tmp_path / "ok.jpg", quality=90)
    full = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(full[:len(full) // 2])  # opens (header intact), fails to decode
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:200])
    (tmp_path / "text.png").write_text("not an image")
    with Image.open(tmp_path / "cut.jpg") as im:  # what a loader's checks cannot see
        assert im.size == (64, 48)
    queries = [Query("fine", "a", image=tmp_path / "ok.png"), Query("fine2", "b", image=tmp_path / "ok.jpg"),
               Query("j", "c", image=tmp_path / "cut.jpg"), Query("p", "d", image=tmp_path / "cut.png"),
               Query("t", "e", image=tmp_path / "text.png"), Query("j2", "f", image=tmp_path / "cut.jpg"),
               Query("mem", "g", image=noise_image(2)), Query("txt", "h")]
    with pytest.raises(QueryError) as err:
        check_images(queries)
    message = str(err.value)
    assert message.startswith("3 of 5 image files cannot be used: ")
    for qid, name in (("j", "cut.jpg"), ("p", "cut.png"), ("t", "text.png")):
        assert f"query {qid!r}" in message and name in message
    assert "'j2'" not in message  # a file is checked once, under its first query
    check_images([q for q in queries if q.id in ("fine", "fine2", "mem", "txt")])  # readable: no error


def test_a_corrupt_image_stops_an_experiment_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import json

    from experiments import common
    from experiments.cli import main

    noise_image(0, size=(64, 48)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    rows = [{"id": f"q{i}", "text": "How do I do it?", "image": "bad.png" if i == 3 else "ok.png",
             "label": "harmful" if i % 2 else "benign"} for i in range(4)]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["mechanisms", "--dataset", f"jsonl:{tmp_path / 'q.jsonl'}", "--defenses", "sr_self_reminder",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "query 'q3'" in err[0] and "bad.png" in err[0], err
    from experiments import study

    monkeypatch.setattr(study, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["study", "--dataset", f"jsonl:{tmp_path / 'q.jsonl'}", "--defenses", "sr_self_reminder",
                 "--ensembles", "", "--out", str(tmp_path / "study")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "query 'q3'" in err[0] and "bad.png" in err[0], err
