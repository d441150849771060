"""pipeline.predict on bad input: one clear line each, no traceback, no side effect."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.predict import load_image, load_predictor


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
