"""pipeline.predict on bad input: one clear line each, no traceback, no side effect."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.images import load_image
from pipeline.predict import load_predictor


def png(path, size=(32, 32)):
    pixels = np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_an_image_too_large_to_decode_is_refused_not_a_crash(tmp_path, monkeypatch):
    # Pillow refuses images over twice MAX_IMAGE_PIXELS (a decompression bomb); shrink
    # the limit rather than write a 180-megapixel file.
    image = png(tmp_path / "huge.png")
    assert load_image(image, 32).shape == (32, 32, 3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match="^too large to decode safely"):
        load_image(image, 32)


def test_a_damaged_model_file_or_model_info_names_the_file_and_the_fix(tmp_path):
    model = tmp_path / "model.keras"
    model.write_bytes(b"PK\x03\x04 not really a zip")  # a truncated download, say
    info = tmp_path / "model_info.json"
    info.write_text(json.dumps({"class_names": ["cat", "dog"], "image_size": 32}))
    with pytest.raises(PipelineError, match=r"model.keras: cannot load the model \(") as error:
        load_predictor(str(model))
    assert "`dvc repro train` or `dvc pull`" in str(error.value)

    info.write_text("{not json")
    with pytest.raises(PipelineError, match=r"model_info.json: not the model info train writes"):
        load_predictor(str(model))
    info.write_text(json.dumps({"classes": ["cat"]}))  # valid JSON, wrong keys
    with pytest.raises(PipelineError, match=r"KeyError: 'class_names'"):
        load_predictor(str(model))


def test_a_registry_uri_outside_the_repository_creates_no_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    with pytest.raises(PipelineError) as error:
        load_predictor("models:/cifar10-resnet@champion")
    assert str(error.value) == (
        f"cannot load model models:/cifar10-resnet@champion: no MLflow store at "
        f"{tmp_path / 'mlflow.db'}; run this from the repository root, or set "
        "MLFLOW_TRACKING_URI to the tracking server"
    )
    assert list(tmp_path.iterdir()) == []


def test_model_argument_picks_keras_file_or_mlflow_model(tmp_path):
    from pipeline.predict import _is_mlflow_model

    uris = ["models:/cifar10-resnet@champion", "runs:/0a1b/model", "s3://bucket/model",
            "mlflow-artifacts:/1/2/artifacts/model", "file:///m"]  # fmt: skip
    for uri in uris:
        assert _is_mlflow_model(uri), uri
    logged = tmp_path / "logged"  # a downloaded MLflow model folder
    logged.mkdir()
    (logged / "MLmodel").write_text("flavors: {}\n")
    assert _is_mlflow_model(str(logged))
    odd = tmp_path / "v1:best.keras"  # a file, whatever its name
    odd.write_bytes(b"")
    assert not _is_mlflow_model(str(odd))
    assert not _is_mlflow_model("models/model.keras")
    assert not _is_mlflow_model("C:/models/model.keras")
    assert not _is_mlflow_model("v2:typo.keras")  # missing, so "no such model"


def test_a_logged_model_folder_loads_outside_the_repository(tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException

    loaded = []

    def load_model(uri, **options):  # MLflow's loader, reached: no store is needed for a folder
        loaded.append(uri)
        raise MlflowException("stand-in loader")

    # The module itself: `mlflow.pyfunc` is a lazy proxy that swaps itself out on first use.
    monkeypatch.setattr(importlib.import_module("mlflow.pyfunc"), "load_model", load_model)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logged = tmp_path / "logged"
    logged.mkdir()
    (logged / "MLmodel").write_text("flavors: {}\n")
    for model in (str(logged), logged.as_uri()):
        with pytest.raises(PipelineError, match="stand-in loader"):
            load_predictor(model)
    assert loaded == [str(logged), logged.as_uri()]
    assert not (tmp_path / "mlflow.db").exists()


def test_a_logged_model_mlflow_cannot_parse_is_one_line(tmp_path, monkeypatch):
    """A damaged MLmodel raises YAML's own error out of MLflow's loader, not MLflow's."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logged = tmp_path / "logged"
    logged.mkdir()
    (logged / "MLmodel").write_text("flavors: [unclosed\n")
    with pytest.raises(PipelineError) as error:
        load_predictor(str(logged))
    assert str(error.value).startswith(f"cannot load model {logged}: ParserError: ")
    assert "\n" not in str(error.value)


def test_a_path_through_a_file_or_unreadable_is_not_called_corrupt(tmp_path):
    image = png(tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"^no such file \(a folder in its path is a file\)$"):
        load_image(image / "y.png", 32)
    with pytest.raises(ValueError, match=r"^cannot be read \(File name too long\)$"):
        load_image(tmp_path / ("y" * 300 + ".png"), 32)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(image.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"^corrupt image \("):
        load_image(truncated, 32)


def save_pyfunc(folder, inputs, classes=3, names=("a", "b", "c")):
    """A pyfunc model with this input schema and `classes` outputs, in `folder`: equal
    probability for each class."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    class Model(mlflow.pyfunc.PythonModel):
        def __init__(self, classes):
            self.classes = classes

        def predict(self, context, model_input, params=None):
            return np.full((len(model_input), self.classes), 1 / self.classes, np.float32)

    output = Schema([TensorSpec(np.dtype(np.float32), (-1, classes))])
    mlflow.pyfunc.save_model(
        folder, python_model=Model(classes), signature=ModelSignature(inputs, output),
        metadata={"class_names": list(names)}, pip_requirements=[],
    )  # fmt: skip
    return str(folder)


@pytest.mark.filterwarnings("ignore::UserWarning")  # MLflow's advice on logging
def test_a_logged_model_must_take_images_as_train_logs_them(tmp_path, monkeypatch):
    """README: --model takes any MLflow model URI; one that is not a logged image classifier
    is refused in one line, before any image is read."""
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    images = Schema([TensorSpec(np.dtype(np.uint8), (-1, 8, 8, 3))])
    predictor = load_predictor(save_pyfunc(tmp_path / "good", images))
    assert predictor.image_size == 8 and predictor.class_names == ["a", "b", "c"]
    probabilities = predictor.predict(np.zeros((2, 8, 8, 3), np.uint8))
    assert probabilities.shape == (2, 3)
    refused = {
        "table": Schema([ColSpec("double", "x")]),
        "float": Schema([TensorSpec(np.dtype(np.float32), (-1, 8, 8, 3))]),
        "gray": Schema([TensorSpec(np.dtype(np.uint8), (-1, 8, 8, 1))]),
        "any_size": Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
    }
    for name, schema in refused.items():
        model = save_pyfunc(tmp_path / name, schema)
        with pytest.raises(PipelineError) as error:
            load_predictor(model)
        assert str(error.value).startswith(f"{model}: the model has input [")
        assert str(error.value).endswith(
            "not the uint8 images (-1, S, S, 3) a model logged by train takes; pass one that "
            "train logged"
        )
    two_names = save_pyfunc(tmp_path / "names", images, classes=3, names=("a", "b"))
    with pytest.raises(PipelineError, match="has 3 outputs but its metadata names 2 classes"):
        load_predictor(two_names)


def save_tiny_model(folder, class_names, image_size=32):
    """A one-unit network as train saves it: model.keras and model_info.json in `folder`."""
    import dataclasses

    from pipeline.config import load_params
    from pipeline.model import build_model
    from tests.repo import ROOT

    model_params = dataclasses.replace(
        load_params(ROOT / "params.yaml").model, stem_filters=8, filters=(8,), units_per_stage=1
    )
    model = build_model(
        model_params,
        num_classes=len(class_names),
        image_size=image_size,
        mean=[0.0] * 3,
        std=[1.0] * 3,
    )
    model.save(folder / "model.keras")
    info = {"class_names": class_names, "image_size": image_size}
    (folder / "model_info.json").write_text(json.dumps(info))
    return folder / "model.keras"


def test_a_model_info_that_is_missing_or_of_another_model_is_refused(tmp_path):
    model = save_tiny_model(tmp_path, ["cat", "dog", "frog"])
    (tmp_path / "model_info.json").unlink()  # copied without it
    with pytest.raises(PipelineError, match="copy the model_info.json train wrote with this"):
        load_predictor(str(model))
    for classes, size in ((["cat", "dog"], 32), (["cat", "dog", "frog"], 64)):
        info = {"class_names": classes, "image_size": size}
        (tmp_path / "model_info.json").write_text(json.dumps(info))
        with pytest.raises(PipelineError, match=rf"\({len(classes)} classes, {size} px\) "
                           r"does not belong to .*model.keras \(3 classes, 32 px\)"):  # fmt: skip
            load_predictor(str(model))


def test_table_shows_each_failure_once_and_stderr_counts_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")  # main sets it; restored after the test
    from pipeline.predict import main

    save_tiny_model(tmp_path, ["cat", "dog", "frog"])
    image = png(tmp_path / "cat.png")
    missing = tmp_path / "missing.png"

    argv = ["--model", str(tmp_path / "model.keras"), str(image), str(missing)]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out.count("error: no such file") == 1 and "missing.png" in out
    assert err.strip() == "error: 1 of 2 images failed"
    assert main(["--json", *argv]) == 1
    out, err = capsys.readouterr()
    assert [r.get("error") for r in json.loads(out)] == [None, "no such file"]
    assert err.strip() == f"error: {missing}: no such file"


def test_a_missing_default_model_says_where_to_run_and_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError) as error:
        load_predictor("models/model.keras")
    assert "from the repository root), or pass --model" in str(error.value)


def test_images_are_read_as_a_viewer_shows_them(tmp_path):
    """EXIF orientation, 16-bit greyscale and a transparent colour key, each as it looks."""
    # Stored 40x20 with red left and blue right; orientation 6 (rotate 90 degrees
    # clockwise to view) makes it a portrait photo with red on top.
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(stored).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    upright = load_image(tmp_path / "phone.jpg", 8).astype(int)
    assert (upright[0, :, 0] > 200).all() and (upright[0, :, 2] < 60).all()  # top row red
    assert (upright[-1, :, 2] > 200).all() and (upright[-1, :, 0] < 60).all()  # bottom blue

    # 16-bit greyscale: mid-grey stays mid-grey (Pillow's convert alone gives white), and
    # a level marked transparent becomes white; 8-bit values in a 32-bit TIFF stay as they are.
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "scan.png")
    assert (load_image(tmp_path / "scan.png", 4) == 128).all()
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp_path / "keyed16.png", transparency=0)
    assert (load_image(tmp_path / "keyed16.png", 4) == 255).all()
    Image.fromarray(np.full((8, 8), 200, np.int32)).save(tmp_path / "wide.tiff")
    assert (load_image(tmp_path / "wide.tiff", 4) == 200).all()
    # A float image has no known range: refused by name rather than guessed.
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "map.tiff")
    with pytest.raises(ValueError, match="^a 32-bit floating-point image"):
        load_image(tmp_path / "map.tiff", 4)

    # An RGB PNG whose black is marked transparent (no alpha channel): white, as RGBA is.
    Image.new("RGB", (4, 4), (0, 0, 0)).save(tmp_path / "keyed.png", transparency=(0, 0, 0))
    assert (load_image(tmp_path / "keyed.png", 4) == 255).all()


def test_a_folder_stands_for_the_images_in_it(tmp_path):
    from pipeline.predict import expand_folders

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("b.JPG", "a.png", "c.tiff"):
        png(photos / name)  # Pillow reads the content whatever the extension says
    (photos / ".hidden.png").write_bytes(b"")
    (photos / "notes.txt").write_text("not an image")
    (photos / "model.h5").write_bytes(b"HDF")  # a format Pillow knows, but no photo
    (photos / "nested").mkdir()  # not descended into
    png(photos / "nested" / "d.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    single = png(tmp_path / "single.png")
    expanded = expand_folders([single, photos, empty])
    # The formats prepare reads from a class folder; a TIFF is classified when named.
    assert expanded == [single, photos / "a.png", photos / "b.JPG", empty]
    with pytest.raises(ValueError, match=r"^a folder with no PNG, JPEG, BMP or GIF files direc"):
        load_image(empty, 32)


def odd_exif_photo(path, orientation: int = 6):
    """A JPEG stored sideways (red left, blue right) whose EXIF also holds a Make tag typed
    FLOAT instead of text, as some cameras write: Pillow reads it, but its exif_transpose
    then raises AttributeError rewriting the EXIF (Pillow issues 6799, 8790)."""
    import io

    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "Acme"  # Make
    raw = bytearray(exif.tobytes())
    at = raw.index(b"\x01\x0f\x00\x02")  # big-endian entry: tag 0x010F, type 2 (ASCII)
    raw[at + 2 : at + 8] = b"\x00\x0b\x00\x00\x00\x01"  # type 11 (FLOAT), one value
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, "JPEG", quality=95, exif=bytes(raw))
    path.write_bytes(buffer.getvalue())
    return path


def test_a_photo_with_odd_exif_tags_is_still_turned_upright_and_classified(tmp_path):
    from PIL import ImageOps

    from pipeline.predict import Predictor, classify

    photo = odd_exif_photo(tmp_path / "odd.jpg")  # exif_transpose raised on it (Pillow 12)
    upright = load_image(photo, 8).astype(int)
    assert (upright[0, :, 0] > 200).all() and (upright[0, :, 2] < 60).all()  # top row red
    assert (upright[-1, :, 2] > 200).all() and (upright[-1, :, 0] < 60).all()  # bottom blue
    # An orientation written as a FLOAT is followed, as Pillow follows it.
    import io
    import struct

    exif = Image.Exif()
    exif[0x0112] = 6
    raw = bytearray(exif.tobytes())
    at = raw.index(b"\x01\x12\x00\x03")  # big-endian entry: tag 0x0112, type 3 (SHORT)
    raw[at + 2 : at + 12] = b"\x00\x0b\x00\x00\x00\x01" + struct.pack(">f", 6.0)
    with Image.open(photo) as image:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=95, exif=bytes(raw))
    (tmp_path / "float.jpg").write_bytes(buffer.getvalue())
    with Image.open(tmp_path / "float.jpg") as image:
        assert image.getexif()[0x0112] == 6.0 and not isinstance(image.getexif()[0x0112], int)
    turned = load_image(tmp_path / "float.jpg", 8).astype(int)
    assert (turned[0, :, 0] > 200).all() and (turned[-1, :, 2] > 200).all()  # red up, blue down
    # Every orientation turns as Pillow's exif_transpose turns it (on readable EXIF).
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored = np.random.default_rng(orientation).integers(0, 256, (6, 10, 3), np.uint8)
        Image.fromarray(stored).save(tmp_path / f"o{orientation}.png", exif=exif)
        with Image.open(tmp_path / f"o{orientation}.png") as image:
            turned = ImageOps.exif_transpose(image)
            expected = np.asarray(ImageOps.fit(turned, (5, 5), Image.Resampling.LANCZOS))
        assert (load_image(tmp_path / f"o{orientation}.png", 5) == expected).all(), orientation

    # A decoder failure of any kind is that file's error; the other images are classified.
    predictor = Predictor(lambda images: np.full((len(images), 2), 0.5), ["cat", "dog"], 8)
    broken = png(tmp_path / "broken.png")
    real_open = Image.open

    def failing_open(path, *args, **kwargs):
        if str(path) == str(broken):
            raise KeyError("an unexpected decoder failure")
        return real_open(path, *args, **kwargs)

    import PIL.Image

    PIL.Image.open = failing_open
    try:
        results = classify(predictor, [photo, broken], top=1)
    finally:
        PIL.Image.open = real_open
    assert results[0]["predictions"][0]["class"] == "cat"
    assert results[1]["error"] == "cannot be decoded (KeyError: 'an unexpected decoder failure')"


def test_a_diverged_model_is_refused_rather_than_printing_nan(tmp_path):
    from pipeline.predict import Predictor, classify

    predictor = Predictor(lambda images: np.full((len(images), 2), np.nan), ["cat", "dog"], 8)
    with pytest.raises(PipelineError, match="predicts NaN or infinite probabilities"):
        classify(predictor, [png(tmp_path / "cat.png")], top=1)
