"""params.yaml validation: every kind of error names the key, the value and what is allowed."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys

import pytest
import yaml

from pipeline.config import ParamsError, flatten, load_params, parse_params
from tests.conftest import ROOT


def test_shipped_params_are_valid_and_typed(tmp_path):
    """params.yaml as committed: the tutorial's recipe, whatever the workspace copy holds
    now (the README's offline mirror in data.url, a `-S` value left behind)."""
    shown = subprocess.run(
        ["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, text=True
    )
    committed = tmp_path / "params.yaml"
    committed.write_text(
        shown.stdout if shown.returncode == 0 else (ROOT / "params.yaml").read_text()
    )
    params = load_params(committed)
    assert params.data.format == "cifar10-python" and params.data.image_size == 32
    assert params.data.val_size == 5000
    assert params.data.md5 == "c58f30108f718f92721af3b95e74349a"
    assert params.model.filters == (32, 64, 128, 256)
    assert params.train.augment.shift == pytest.approx(5 / 32)
    assert isinstance(params.train.learning_rate, float)


def with_value(raw: dict, dotted: str, value) -> dict:
    raw = copy.deepcopy(raw)
    *parents, last = dotted.split(".")
    node = raw
    for key in parents:
        node = node[key]
    node[last] = value
    return raw


BAD_VALUES = [
    ("data.val_size", -5, "data.val_size: must be an integer between 0 and 49999, got -5"),
    (
        "data.val_size",
        50000,
        "data.val_size: must be an integer between 0 and 49999, got 50000",
    ),
    ("data.val_size", "5000", "data.val_size: must be an integer, got '5000'"),
    ("data.val_size", 5000.0, "data.val_size: must be an integer, got 5000.0"),
    ("data.format", "folder", "data.format: must be one of cifar10-python, imagefolder"),
    ("data.image_size", 4, "data.image_size: must be an integer between 8 and 1024, got 4"),
    ("data.test_size", -1, "data.test_size: must be an integer >= 0, got -1"),
    ("data.on_bad_image", "warn", "data.on_bad_image: must be one of fail, skip, got 'warn'"),
    ("train.epochs", -3, "train.epochs: must be an integer between 1 and 100000, got -3"),
    ("train.epochs", True, "train.epochs: must be an integer between 1 and 100000, got true"),
    ("train.learning_rate", 0, "train.learning_rate: must be a number in (0, 10], got 0"),
    (
        "train.lr_schedule",
        "step",
        "train.lr_schedule: must be one of constant, cosine, onecycle",
    ),
    ("train.optimizer", "rmsprop", "train.optimizer: must be one of adam, sgd, got 'rmsprop'"),
    (
        "evaluate.registered_model",
        "pets' or name = 'x",  # would end the registry's search filter early
        "evaluate.registered_model: must be a name of letters, digits, '-', '_' and '.'",
    ),
    ("train.weight_decay", -0.1, "train.weight_decay: must be a number in [0, 1], got -0.1"),
    (
        "train.label_smoothing",
        1,
        "train.label_smoothing: must be a number in [0, 1), got 1.0",
    ),
    ("train.augment.flip", "yes", "train.augment.flip: must be true or false, got 'yes'"),
    (
        "train.augment.interpolation",
        "cubic",
        "train.augment.interpolation: must be one of bilinear, nearest, got 'cubic'",
    ),
    (
        "train.augment.fill",
        "wrap",
        "train.augment.fill: must be one of nearest, reflect, got 'wrap'",
    ),
    ("train.augment.cutout", 2.5, "train.augment.cutout: must be an integer between 0 and"),
    ("model.filters", [32, 0], "model.filters: must be a list of at least 1 integers"),
    ("model.dropout", 1.0, "model.dropout: must be a number in [0, 1), got 1.0"),
    ("data.url", "ftp://x/y.tar.gz", "data.url: must be a URL starting with https://"),
    ("data.md5", "abc", 'data.md5: must be an md5 checksum of 32 hex digits or "", got'),
    ("train.augment", 3, "train.augment: must be a mapping of keys to values, got 3"),
    # NaN passes every comparison, so it needs its own check.
    ("train.learning_rate", float("nan"), "train.learning_rate: must be a number in (0, 10]"),
    ("train.learning_rate", True, "train.learning_rate: must be a number in (0, 10], got true"),
    pytest.param(
        "train.learning_rate",
        10**400,
        "train.learning_rate: must be a number in (0, 10], got 1",
        id="int-beyond-float-range",
    ),
    ("data.md5", "z" * 32, "data.md5: must be an md5 checksum of 32 hex digits"),
    ("data.seed", -1, "data.seed: must be an integer between 0 and 4294967295, got -1"),
    ("model.stem_filters", 0, "model.stem_filters: must be an integer between 1 and"),
    ("model.units_per_stage", 0, "model.units_per_stage: must be an integer between 1 and"),
    ("train.epochs", 10**19, "train.epochs: must be an integer between 1 and 100000, got"),
    ("train.batch_size", 0, "train.batch_size: must be an integer between 1 and 1000000"),
    ("train.warmup", 1, "train.warmup: must be a number in [0, 1), got 1.0"),
    ("train.weight_decay_scope", "bn", "train.weight_decay_scope: must be one of all, kernels"),
    ("train.sam_rho", -0.05, "train.sam_rho: must be a number in [0, 10], got -0.05"),
    ("train.sam_from_epoch", 0, "train.sam_from_epoch: must be a positive integer, got 0"),
    ("train.seed", 2**32, "train.seed: must be an integer between 0 and 4294967295, got"),
    ("train.precision", "fp16", "train.precision: must be one of auto, float32, mixed_float16"),
    ("train.deterministic", 1, "train.deterministic: must be true or false, got 1"),
    ("train.augment.rotation", -1, "train.augment.rotation: must be a number in [0, 180]"),
    ("train.augment.shift", 1, "train.augment.shift: must be a number in [0, 1), got 1.0"),
    ("evaluate.batch_size", 0, "evaluate.batch_size: must be an integer between 1 and"),
    ("evaluate.misclassified", 401, "evaluate.misclassified: must be an integer between 0 an"),
    ("evaluate.shift_tta", 1.5, "evaluate.shift_tta: must be an integer between 0 and 1024"),
    ("evaluate.flip_tta", "no", "evaluate.flip_tta: must be true or false, got 'no'"),
    ("evaluate.register", None, "evaluate.register: must be true or false, got null"),
    (
        "data.url",
        "/data/cifar mirror.tar.gz",
        "data.url: must be a URL starting with https://, http:// or file://, got "
        "'/data/cifar mirror.tar.gz'; for that local file or folder: "
        "file:///data/cifar%20mirror.tar.gz",
    ),
    (  # not a path: no file:// guess at it (a relative one would depend on the folder)
        "data.url",
        "www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "data.url: must be a URL starting with https://, http:// or file://, got "
        "'www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'$",
    ),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD_VALUES)
def test_bad_value_names_key_value_and_allowed(raw_params, key, value, message):
    with pytest.raises(ParamsError) as error:
        parse_params(with_value(raw_params, key, value))
    if message.endswith("$"):  # the whole message
        assert str(error.value) == message[:-1]
    else:
        assert str(error.value).startswith(message)


def test_every_param_has_a_bad_value_test(raw_params):
    """A new key without a row in BAD_VALUES fails here, so its check cannot go untested."""
    tested = {row.values[0] if hasattr(row, "values") else row[0] for row in BAD_VALUES}
    assert set(flatten(parse_params(raw_params))) - tested == set()


IMAGEFOLDER = {"data.format": "imagefolder", "data.url": "file:///data/pets", "data.md5": ""}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"data.test_size": 1000},
            "data.test_size: must be 0 for data.format cifar10-python, whose archive has its own "
            "test batch",
        ),
        (
            {"data.image_size": 64},
            "data.image_size: must be 32 for data.format cifar10-python (its images are 32x32",
        ),
        ({"data.md5": ""}, 'data.md5: may be "" only for a local folder (data.format imagefolder'),
        ({**IMAGEFOLDER, "data.url": "https://x/pets.zip"}, 'data.md5: may be "" only for a'),
        ({**IMAGEFOLDER, "data.val_size": -1}, "data.val_size: must be an integer >= 0, got -1"),
        (
            {"train.augment.cutout": 33},
            "train.augment.cutout: must be at most data.image_size (32 pixels): a larger square "
            "erases most or all of every training image, got 33",
        ),
        (
            {**IMAGEFOLDER, "data.image_size": 16, "train.augment.cutout": 20},
            "train.augment.cutout: must be at most data.image_size (16 pixels)",
        ),
        (
            {"evaluate.shift_tta": 32},
            "evaluate.shift_tta: must be less than data.image_size (32 pixels): the image must "
            "stay in view, got 32",
        ),
        ({"evaluate.shift_tta": -1}, "evaluate.shift_tta: must be an integer between 0 and"),
        (
            {"train.augment.interpolation": "nearest", "train.augment.shift": 0.02},
            "train.augment.shift: must be a whole number of pixels with interpolation nearest, "
            "which shifts by whole pixels: 0.02 of 32 pixels is 0.64; 0/32 = 0 or 1/32 = 0.03125, "
            "got 0.02",
        ),
        (
            {"train.augment.interpolation": "nearest", "train.augment.shift": 0.1},
            "train.augment.shift: must be a whole number of pixels with interpolation nearest, "
            "which shifts by whole pixels: 0.1 of 32 pixels is 3.2; 3/32 = 0.09375 or "
            "4/32 = 0.125, got 0.1",
        ),
        (
            {
                **IMAGEFOLDER,
                "data.image_size": 96,
                "train.augment.interpolation": "nearest",
                "train.augment.shift": 0.1,
            },
            "train.augment.shift: must be a whole number of pixels with interpolation nearest, "
            "which shifts by whole pixels: 0.1 of 96 pixels is 9.6; 9/96 = 0.09375 or "
            "10/96 = 0.104167, got 0.1",
        ),  # fmt: skip
        (
            {
                **IMAGEFOLDER,
                "data.image_size": 224,
                "train.augment.interpolation": "nearest",
                "train.augment.shift": 0.45,
            },
            "train.augment.shift: must be a whole number of pixels with interpolation nearest, "
            "which shifts by whole pixels: 0.45 of 224 pixels is 100.8; 100/224 = 0.446429 or "
            "101/224 = 0.450893, got 0.45",
        ),  # fmt: skip (100.8, not 3 significant digits' 101: a whole number, said to be none)
        (
            {"train.learning_rate": 2, "train.weight_decay": 0.5},
            "train.weight_decay: must be below 1 / train.learning_rate (0.5): each step shrinks "
            "every weight by learning_rate * weight_decay of itself, got 0.5",
        ),
    ],
)
def test_checks_that_depend_on_the_format(raw_params, overrides, message):
    for key, value in overrides.items():
        raw_params = with_value(raw_params, key, value)
    with pytest.raises(ParamsError) as error:
        parse_params(raw_params)
    assert str(error.value).startswith(message)


def test_a_suggested_whole_pixel_shift_is_accepted_as_printed(raw_params):
    """The message's six digits of 10/96 are 10.00003 px: within the check's slack."""
    for key, value in {**IMAGEFOLDER, "data.image_size": 96,
                       "train.augment.interpolation": "nearest",
                       "train.augment.shift": 0.104167}.items():  # fmt: skip
        raw_params = with_value(raw_params, key, value)
    assert parse_params(raw_params).train.augment.shift == 0.104167


def test_imagefolder_takes_any_size_and_leaves_the_val_size_bound_to_prepare(raw_params):
    for key, value in {**IMAGEFOLDER, "data.val_size": 80_000, "data.image_size": 96}.items():
        raw_params = with_value(raw_params, key, value)
    data = parse_params(raw_params).data
    assert (data.format, data.md5, data.val_size, data.image_size) == (
        "imagefolder",
        "",
        80_000,
        96,
    )


def test_unknown_key_is_named_with_its_full_path(raw_params):
    raw_params["train"]["augment"]["zoom"] = 0.1
    with pytest.raises(ParamsError, match=r"^train\.augment\.zoom: unknown key; allowed keys"):
        parse_params(raw_params)


@pytest.mark.parametrize(
    ("section", "typo", "meant"),
    [
        ("train", "learnin_rate", "train.learning_rate"),
        ("train", "learning-rate", "train.learning_rate"),
        ("evaluate", "flip_tta_", "evaluate.flip_tta"),
        (None, "trian", "train"),
        ("train", "zoom", None),  # nothing close: no guess
    ],
)
def test_a_misspelt_key_is_met_with_the_key_it_was_meant_to_be(raw_params, section, typo, meant):
    # As `dvc exp run -S +train.learnin_rate=0.01` leaves it: the typo beside the real key.
    (raw_params[section] if section else raw_params)[typo] = 0.01
    with pytest.raises(ParamsError) as error:
        parse_params(raw_params)
    name = f"{section}.{typo}" if section else typo
    hint = f" (did you mean {meant}?)" if meant else ""
    assert str(error.value).startswith(f"{name}: unknown key{hint}; allowed keys in ")


def test_missing_key_is_named(raw_params):
    del raw_params["data"]["seed"]
    with pytest.raises(ParamsError, match=r"^data\.seed: missing"):
        parse_params(raw_params)


def test_unknown_section_is_named(raw_params):
    raw_params["optimizer"] = {"name": "sgd"}
    with pytest.raises(ParamsError, match=r"^optimizer: unknown key"):
        parse_params(raw_params)


def test_params_are_frozen(raw_params):
    params = parse_params(raw_params)
    with pytest.raises(AttributeError):
        params.train.epochs = 1  # type: ignore[misc]


def test_flatten_uses_dotted_names(raw_params):
    flat = flatten(parse_params(raw_params))
    assert flat["train.learning_rate"] == 0.001
    assert flat["train.augment.flip"] is True
    assert flat["model.filters"] == [32, 64, 128, 256]
    assert flat["data.format"] == "cifar10-python"
    assert flat["train.optimizer"] == "adam"
    assert len(flat) == 38


def test_invalid_yaml_is_reported_in_one_line_with_where(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  url: [unclosed\ntrain:\n  epochs: 3\n")
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert str(error.value) == (  # where it gave up, and the `[` left open
        f"{path}: not valid YAML: expected ',' or ']', but got ':' at line 3, column 6, "
        "while parsing a flow sequence at line 2, column 8"
    )
    path.write_text("train:\n\tepochs: 3\n")
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert str(error.value) == (
        f"{path}: not valid YAML: found character '\\t' that cannot start any token at line 2, "
        "column 1, while scanning for the next token"
    )
    path.write_bytes(b"train:\n  epochs: 3 \x80\n")  # Latin-1, say
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert str(error.value) == f"{path}: not UTF-8 text (invalid start byte at byte 19)"


@pytest.mark.parametrize("stage", ["train", "evaluate"])
def test_a_bad_param_stops_train_and_evaluate_before_tensorflow_loads(tmp_path, stage):
    """`dvc exp run -S train.epochs=0` reruns only train: its error takes a second, not the
    20 s of importing TensorFlow."""
    text = (ROOT / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(re.sub(r"(?m)^  epochs: .*$", "  epochs: 0", text))
    script = (
        f"import sys; from pipeline import {stage}; code = {stage}.main([]); "
        "print(code, 'tensorflow' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.stdout.split() == ["1", "False"], result.stderr
    assert result.stderr == "error: train.epochs: must be an integer between 1 and 100000, got 0\n"


def test_values_mean_what_dvc_reads_them_as(tmp_path):
    """DVC reads params.yaml as YAML 1.2, where `1e-3` is a float (YAML 1.1: a string),
    `yes` a word (1.1: true) and `010` ten (1.1: eight), written in the file by hand.
    (`dvc exp run -S train.seed=010` gives the string '010', written quoted, and refused.)"""
    text = (ROOT / "params.yaml").read_text()
    text = re.sub(r"(?m)^  learning_rate: .*$", "  learning_rate: 1e-3", text)
    text = re.sub(r"(?m)^  weight_decay: .*$", "  weight_decay: 5E-4", text)
    (tmp_path / "params.yaml").write_text(text)
    params = load_params(tmp_path / "params.yaml")
    assert params.train.learning_rate == 1e-3 and params.train.weight_decay == 5e-4
    text = re.sub(r"(?m)^  learning_rate: .*$", "  learning_rate: 1e-3x", text)
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match=r"train.learning_rate: must be a number .*got '1e-3x'"):
        load_params(tmp_path / "params.yaml")
    text = re.sub(r"(?m)^  learning_rate: .*$", "  learning_rate: 1e-3", text)
    text = re.sub(r"(?m)^  seed: 42 .*$", "  seed: 010", text)  # data.seed and train.seed
    (tmp_path / "params.yaml").write_text(text)
    params = load_params(tmp_path / "params.yaml")
    assert params.data.seed == params.train.seed == 10  # as `dvc exp show` shows them
    (tmp_path / "params.yaml").write_text(re.sub(r"(?m)^    flip: .*$", "    flip: yes", text))
    with pytest.raises(ParamsError, match="train.augment.flip: must be true or false, got 'yes'"):
        load_params(tmp_path / "params.yaml")  # DVC records the word, so it is refused
    (tmp_path / "params.yaml").write_text(text.replace("  epochs: 50", "  epochs: 50\n  epochs: 3"))
    with pytest.raises(ParamsError, match=r'not valid YAML: found duplicate key "epochs" with value'
                       r' "3" \(original value: "50"\) at line \d+'):  # fmt: skip
        load_params(tmp_path / "params.yaml")


def test_stage_stops_with_one_line_and_no_traceback(tmp_path, raw_params):
    """What a user sees from `dvc repro` when params.yaml is wrong."""
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(with_value(raw_params, "data.val_size", -5))
    )
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.prepare"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: data.val_size: must be an integer between 0 and 49999, got -5"
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()
