import numpy as np
import pytest
from PIL import Image

from edgevpr.data.images import ImageLoadError, list_images, load_image


def _exif_rotated(path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(path, exif=exif)


def test_exif_orientation_applied(tmp_path):
    _exif_rotated(tmp_path / "r.jpg")
    img = load_image(tmp_path / "r.jpg")
    assert img.size == (20, 40)  # portrait after applying the orientation
    top = np.asarray(img)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the blue half is now on top


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA"])
def test_modes_become_rgb(tmp_path, mode):
    img = Image.new("RGB", (16, 8), (10, 200, 30)).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (16, 8)


def test_16bit_png_scaled(tmp_path):
    arr = np.full((8, 8), 65535, np.uint16)
    arr[:, :4] = 0
    Image.fromarray(arr).save(tmp_path / "d.png")
    out = np.asarray(load_image(tmp_path / "d.png"))
    assert out.dtype == np.uint8 and out[0, 7, 0] == 255 and out[0, 0, 0] == 0


def test_transparent_pixels_on_white(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "t.png")
    assert np.asarray(load_image(tmp_path / "t.png")).min() == 255


def test_truncated_and_fake_files_name_the_file(tmp_path):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "ok.jpg", quality=95)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    for name in ("cut.jpg", "text.jpg", "missing.jpg"):
        with pytest.raises(ImageLoadError) as e:
            load_image(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)


def test_pixel_limit(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match="exceeds the limit"):
        load_image(tmp_path / "big.png", max_pixels=5000)
    assert load_image(tmp_path / "big.png", max_pixels=10000).size == (100, 100)


def test_list_images_sorted_and_filtered(tmp_path):
    for n in ("b.jpg", "a.png", "c.txt", "sub/d.jpeg"):
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["a.png", "b.jpg", "sub/d.jpeg"]
