import numpy as np
import pytest
from PIL import Image

from tinybeauty_cli.core import synthetic
from tinybeauty_cli.core.errors import ImageError
from tinybeauty_cli.core.images import builtin_test_set, load_folder, load_images, read_image, to_model_size
from tinybeauty_cli.core.quality import mean_psnr_db


def _save(path, array, mode=None):
    Image.fromarray(array, mode).save(path)


def test_folder_of_images_is_center_cropped_and_resized(tmp_path):
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, 20:60] = 200  # the centre square is bright
    _save(tmp_path / "a.png", wide)
    s = load_folder(tmp_path, 16)
    assert s.names == ["a"] and s.inputs.shape == (1, 16, 16, 3) and s.targets is None
    assert s.inputs.min() > 150


@pytest.mark.parametrize("dirs", [("input", "target"), ("before", "after")])
def test_pairs_are_matched_by_stem(tmp_path, dirs):
    for d in dirs:
        (tmp_path / d).mkdir()
    for stem, v in (("x", 10), ("y", 20)):
        _save(tmp_path / dirs[0] / f"{stem}.png", np.full((8, 8, 3), v, np.uint8))
        _save(tmp_path / dirs[1] / f"{stem}.jpg", np.full((8, 8, 3), v + 100, np.uint8))
    s = load_folder(tmp_path, 8)
    assert s.names == ["x", "y"] and s.has_targets
    assert s.targets[1].mean() == pytest.approx(120, abs=2)


def test_unmatched_pairs_are_reported(tmp_path):
    (tmp_path / "input").mkdir()
    (tmp_path / "target").mkdir()
    _save(tmp_path / "input" / "a.png", np.zeros((8, 8, 3), np.uint8))
    _save(tmp_path / "input" / "b.png", np.zeros((8, 8, 3), np.uint8))
    _save(tmp_path / "target" / "a.png", np.zeros((8, 8, 3), np.uint8))
    _save(tmp_path / "target" / "c.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ImageError, match=r"1 input\(s\) without a target \(e.g. b\).*1 target\(s\) without an input \(e.g. c\)"):
        load_folder(tmp_path, 8)


def test_modes_are_converted_to_rgb(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent -> white
    _save(tmp_path / "rgba.png", rgba, "RGBA")
    out = np.asarray(read_image(tmp_path / "rgba.png"))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[3, 0]) == (255, 255, 255)

    _save(tmp_path / "grey.png", np.full((4, 4), 77, np.uint8), "L")
    assert tuple(np.asarray(read_image(tmp_path / "grey.png"))[0, 0]) == (77, 77, 77)

    Image.fromarray(np.full((4, 4), 40000, np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    v = np.asarray(read_image(tmp_path / "deep.png"))[0, 0]
    assert tuple(v) == (156, 156, 156)  # 40000 / 65535 * 255, scaled, not clipped

    pal = Image.fromarray(np.full((4, 4, 3), (10, 200, 30), np.uint8)).quantize(colors=4)
    pal.save(tmp_path / "pal.png")
    assert tuple(np.asarray(read_image(tmp_path / "pal.png"))[0, 0]) == (10, 200, 30)


def test_corrupt_and_non_images_are_named(tmp_path):
    good = tmp_path / "good.png"
    _save(good, np.zeros((32, 32, 3), np.uint8))
    (tmp_path / "bad.png").write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageError, match="bad.png"):
        read_image(tmp_path / "bad.png")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ImageError, match="text.png is not an image"):
        read_image(tmp_path / "text.png")
    with pytest.raises(ImageError, match="text.png"):  # headers are checked first: no decoding before it
        load_folder(tmp_path, 8)
    (tmp_path / "text.png").unlink()
    with pytest.raises(ImageError, match="bad.png"):
        load_folder(tmp_path, 8)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    import tinybeauty_cli.core.images as images

    _save(tmp_path / "big.png", np.zeros((64, 64, 3), np.uint8))
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(ImageError, match="decompression bomb"):
        read_image(tmp_path / "big.png")


def test_empty_or_missing_folders_are_refused(tmp_path):
    with pytest.raises(ImageError, match="holds no images"):
        load_folder(tmp_path, 8)
    with pytest.raises(ImageError, match="does not exist"):
        load_images(tmp_path / "nope", 8)


def test_builtin_test_set_is_deterministic_and_makeup_is_strong():
    a = builtin_test_set(256, limit=6)
    b = synthetic.portraits(synthetic.TEST_SEED, 6, 256)
    assert np.array_equal(a.inputs, b[0]) and np.array_equal(a.targets, b[1])
    assert len(a) == 6 and a.has_targets
    # makeup changes the face clearly, but only part of it
    diff = np.abs(a.inputs.astype(int) - a.targets.astype(int)).max(axis=-1)
    changed = (diff > 8).mean()
    assert 0.02 < changed < 0.5
    assert mean_psnr_db(a.inputs, a.targets) < 32


def test_synthetic_portraits_vary_and_seeds_differ():
    p0 = synthetic.portrait(1, 0, 64)
    p1 = synthetic.portrait(1, 1, 64)
    assert not np.array_equal(p0.bare, p1.bare)
    assert np.array_equal(synthetic.portrait(1, 0, 64).bare, p0.bare)
    assert not np.array_equal(synthetic.portrait(2, 0, 64).bare, p0.bare)


def test_first_test_portrait_is_pinned():
    """Pinned figures: a change to the generator (or to numpy's generator) would move the test set."""
    p = synthetic.portrait(synthetic.TEST_SEED, 0, 256)
    assert p.bare.astype(np.float64).mean() == pytest.approx(98.8908, abs=2e-3)
    assert p.made_up.astype(np.float64).mean() == pytest.approx(99.7432, abs=2e-3)


def test_to_model_size_keeps_small_square_images_untouched():
    arr = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    assert np.array_equal(to_model_size(Image.fromarray(arr), 16), arr)


def test_bare_portraits_are_the_bare_half_of_the_pairs():
    bare, _ = synthetic.portraits(5, 3, 64)
    assert np.array_equal(synthetic.bare_portraits(5, 3, 64), bare)
    assert synthetic.portrait(5, 0, 64, bare_only=True).made_up is None
