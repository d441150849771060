"""params.yaml, read and validated once into frozen, typed objects.

Every stage calls `load_params()` first, before doing any work. A bad value
stops the stage with one `ParamsError` whose message names the full key path,
the value found and what is allowed, e.g.

    data.val_size: must be an integer between 0 and 49999, got -5

Each section is a frozen dataclass; each field declares its own check through
`_field(...)`, so the schema and its validation live in one place.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from pipeline import paths
from pipeline.errors import PipelineError

CIFAR10_TRAIN_IMAGES = 50_000  # images in the canonical training batches


class ParamsError(PipelineError):
    """A params.yaml value is missing, unknown, of the wrong type or out of range."""


# --- value checks: each returns the cleaned value or raises ParamsError ----------------------


Check = Callable[[str, Any], Any]


def _fail(path: str, allowed: str, value: Any) -> ParamsError:
    return ParamsError(f"{path}: must be {allowed}, got {_as_yaml(value)}")


def _as_yaml(value: Any) -> str:
    """A value as params.yaml spells it (`null`, `true`), not as Python does (None, True)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)


def integer(low: int | None = None, high: int | None = None) -> Check:
    if low is not None and high is not None:
        allowed = f"an integer between {low} and {high}"
    elif low is not None:
        allowed = "a positive integer" if low == 1 else f"an integer >= {low}"
    else:
        allowed = "an integer"

    def check(path: str, value: Any) -> int:
        # bool is an int subclass in Python; `epochs: true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(path, allowed, value)
        if (low is not None and value < low) or (high is not None and value > high):
            raise _fail(path, allowed, value)
        return value

    return check


def number(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    allowed = f"a number in {left}{low:g}, {high:g}{right}"

    def check(path: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(path, allowed, value)
        try:
            value = float(value)
        except OverflowError:  # an int beyond float's range, 1e309 written out
            raise _fail(path, allowed, value) from None
        if not math.isfinite(value):
            raise _fail(path, allowed, value)
        if (
            value < low
            or value > high
            or (low_open and value == low)
            or (high_open and value == high)
        ):
            raise _fail(path, allowed, value)
        return value

    return check


def boolean() -> Check:
    def check(path: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise _fail(path, "true or false", value)
        return value

    return check


def choice(*options: str) -> Check:
    allowed = "one of " + ", ".join(options)

    def check(path: str, value: Any) -> str:
        if value not in options:
            raise _fail(path, allowed, value)
        return value

    return check


def model_name() -> Check:
    """A name MLflow shows and searches by: letters, digits, '-', '_' and '.'."""
    allowed = "a name of letters, digits, '-', '_' and '.' (at most 100, starting alphanumeric)"

    def check(path: str, value: Any) -> str:
        if not isinstance(value, str) or not re.fullmatch(
            r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", value
        ):
            raise _fail(path, allowed, value)
        return value

    return check


def url() -> Check:
    schemes = ("https://", "http://", "file://")

    def check(path: str, value: Any) -> str:
        if isinstance(value, str) and value.startswith(("/", "~")):  # an absolute path
            local = Path(value).expanduser().as_uri()
            raise ParamsError(
                f"{path}: must be a URL starting with https://, http:// or file://, got "
                f"{value!r}; for that local file or folder: {local}"
            )
        if not isinstance(value, str) or not value.startswith(schemes):
            raise _fail(path, "a URL starting with https://, http:// or file://", value)
        return value

    return check


def md5(allow_empty: bool = False) -> Check:
    allowed = "an md5 checksum of 32 hex digits" + (' or ""' if allow_empty else "")

    def check(path: str, value: Any) -> str:
        if allow_empty and value == "":
            return value
        if (
            not isinstance(value, str)
            or len(value) != 32
            or any(c not in "0123456789abcdef" for c in value.lower())
        ):
            raise _fail(path, allowed, value)
        return value.lower()

    return check


def integer_list(low: int, high: int, min_length: int = 1) -> Check:
    allowed = f"a list of at least {min_length} integers between {low} and {high}"
    item = integer(low, high)

    def check(path: str, value: Any) -> tuple[int, ...]:
        if not isinstance(value, list) or len(value) < min_length:
            raise _fail(path, allowed, value)
        for i, element in enumerate(value):
            try:
                item(f"{path}[{i}]", element)
            except ParamsError:
                raise _fail(path, allowed, value) from None
        return tuple(value)

    return check


def _field(check: Check) -> Any:
    return dataclasses.field(metadata={"check": check})


# --- the schema ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DataParams:
    format: str = _field(choice("cifar10-python", "imagefolder"))
    url: str = _field(url())
    md5: str = _field(md5(allow_empty=True))  # "": a local folder, which has no single md5
    image_size: int = _field(integer(8, 1024))  # pixels per side
    test_size: int = _field(integer(0))
    val_size: int = _field(integer())  # its range depends on format: checked below
    seed: int = _field(integer(0, 2**32 - 1))
    on_bad_image: str = _field(choice("fail", "skip"))

    def __post_init__(self) -> None:
        """Checks that depend on `format`, run once every field has passed its own."""
        if self.format == "cifar10-python":
            integer(0, CIFAR10_TRAIN_IMAGES - 1)("data.val_size", self.val_size)
            if self.test_size != 0:
                raise _fail(
                    "data.test_size",
                    "0 for data.format cifar10-python, whose archive has its "
                    "own test batch (test_size splits one off an imagefolder without test/)",
                    self.test_size,
                )
            if self.image_size != 32:
                raise _fail(
                    "data.image_size",
                    "32 for data.format cifar10-python (its images are "
                    "32x32; imagefolder resizes to any size)",
                    self.image_size,
                )
        else:
            # The real upper bound is the folder's image count: prepare checks it.
            integer(0)("data.val_size", self.val_size)
        if self.md5 == "" and not (self.format == "imagefolder" and self.url.startswith("file:")):
            raise ParamsError(
                'data.md5: may be "" only for a local folder (data.format imagefolder, '
                "data.url file:///path/to/folder); give the md5 of the archive at data.url"
            )


@dataclass(frozen=True)
class ModelParams:
    stem_filters: int = _field(integer(1, 4096))
    filters: tuple[int, ...] = _field(integer_list(1, 4096))
    units_per_stage: int = _field(integer(1, 64))
    dropout: float = _field(number(0.0, 1.0, high_open=True))


@dataclass(frozen=True)
class AugmentParams:
    rotation: float = _field(number(0.0, 180.0))  # degrees, each way
    shift: float = _field(number(0.0, 1.0, high_open=True))  # fraction of the image side
    flip: bool = _field(boolean())  # random horizontal flips
    # How rotated and shifted images are resampled. bilinear (the tutorial's) blends
    # neighbouring pixels at fractional shifts, so training images come out blurred
    # against the test images; nearest shifts by whole pixels, which with rotation 0
    # copies pixels unchanged (a random crop).
    interpolation: str = _field(choice("bilinear", "nearest"))
    # What fills the pixels that rotations and shifts uncover: nearest repeats the
    # edge pixel outwards (ImageDataGenerator's default, streaks at large shifts);
    # reflect mirrors the image about its edge (with shifts only, the usual
    # pad-and-random-crop of CIFAR training recipes).
    fill: str = _field(choice("nearest", "reflect"))
    # Side in pixels of one square erased per training image at a random position
    # (it may hang off the edge), painted the training images' mean colour (0 = none).
    cutout: int = _field(integer(0, 1024))


@dataclass(frozen=True)
class TrainParams:
    # Upper bounds far past any real run, so a stray digit fails here, not inside TensorFlow.
    epochs: int = _field(integer(1, 100_000))
    batch_size: int = _field(integer(1, 1_000_000))
    optimizer: str = _field(choice("adam", "sgd"))  # sgd: momentum 0.9, Nesterov
    learning_rate: float = _field(number(0.0, 10.0, low_open=True))
    lr_schedule: str = _field(choice("constant", "cosine", "onecycle"))
    # onecycle only: fraction of the training steps spent warming up linearly from
    # learning_rate / 25 to learning_rate; the rest anneals on a cosine.
    warmup: float = _field(number(0.0, 1.0, high_open=True))
    # Decoupled: each step every trainable weight shrinks by (the step's scheduled learning
    # rate) * weight_decay of itself: AdamW with adam. With sgd the decay bypasses the
    # momentum, so it is about 10x weaker than the same number as an L2 penalty under
    # momentum 0.9 (PyTorch's SGD weight_decay): 5e-3 here matches their usual 5e-4.
    weight_decay: float = _field(number(0.0, 1.0))
    # all: every trainable weight. kernels: the convolution and dense kernels only; no
    # decay of BatchNorm's scales and shifts nor of biases, as many CIFAR-10 recipes do.
    weight_decay_scope: str = _field(choice("all", "kernels"))
    label_smoothing: float = _field(number(0.0, 1.0, high_open=True))  # fraction of the target
    # Sharpness-aware minimization (pipeline/sam.py): each step also takes the gradient at
    # the weights moved this far (L2 norm over all weights) up the loss, and applies that
    # one; twice the compute per step. 0 = off; 0.05 is the usual value on CIFAR-10.
    sam_rho: float = _field(number(0.0, 10.0))
    sam_from_epoch: int = _field(integer(1))  # 1-based: SAM in this epoch and later ones
    seed: int = _field(integer(0, 2**32 - 1))
    augment: AugmentParams = _field(AugmentParams)
    precision: str = _field(choice("auto", "float32", "mixed_float16", "mixed_bfloat16"))
    deterministic: bool = _field(boolean())


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = _field(integer(1, 1_000_000))
    misclassified: int = _field(integer(0, 400))  # images in the error grid
    flip_tta: bool = _field(boolean())  # also score the mean prediction on image + mirror
    # Pixels: also score the mean prediction over 10 views, the image and its mirror each
    # as is and moved this far left, right, up and down (0 = off).
    shift_tta: int = _field(integer(0, 1024))
    register: bool = _field(boolean())
    # The registered model its versions join; a model of another dataset needs its own.
    registered_model: str = _field(model_name())


@dataclass(frozen=True)
class Params:
    data: DataParams = _field(DataParams)
    model: ModelParams = _field(ModelParams)
    train: TrainParams = _field(TrainParams)
    evaluate: EvaluateParams = _field(EvaluateParams)

    def __post_init__(self) -> None:
        """Checks across sections, run once every section has passed its own."""
        side, cutout = self.data.image_size, self.train.augment.cutout
        if cutout > side:
            # Squares are centred uniformly over the image: one as wide as the image
            # erases 56% of it on average, one twice as wide all of it.
            raise _fail(
                "train.augment.cutout",
                f"at most data.image_size ({side} pixels): a larger square erases "
                "most or all of every training image",
                cutout,
            )
        augment = self.train.augment
        pixels = augment.shift * side
        # 1e-3 px of slack: 10/96 typed as 0.104167 is 10.00003 px (pipeline.data rounds).
        if augment.interpolation == "nearest" and abs(pixels - round(pixels)) > 1e-3:
            below, above = math.floor(pixels), math.ceil(pixels)
            raise _fail(
                "train.augment.shift",
                f"a whole number of pixels with interpolation nearest, which shifts by whole "
                f"pixels: {augment.shift} of {side} pixels is {round(pixels, 3):g}; "
                f"{below}/{side} = {below / side:.6g} or {above}/{side} = {above / side:.6g}",
                augment.shift,
            )
        train = self.train
        if train.learning_rate * train.weight_decay >= 1:
            # Keras decays every weight by lr * weight_decay of itself per step: at 1 or
            # more each step zeroes or flips the sign of every weight.
            raise _fail(
                "train.weight_decay",
                f"below 1 / train.learning_rate ({1 / train.learning_rate:g}): each step "
                "shrinks every weight by learning_rate * weight_decay of itself",
                train.weight_decay,
            )
        if train.sam_rho > 0 and train.sam_from_epoch > train.epochs:
            raise _fail(
                "train.sam_from_epoch",
                f"at most train.epochs ({train.epochs}) with train.sam_rho above 0: "
                "SAM would never run",
                train.sam_from_epoch,
            )
        if self.evaluate.shift_tta >= side:
            raise _fail(
                "evaluate.shift_tta",
                f"less than data.image_size ({side} pixels): the image must stay in view",
                self.evaluate.shift_tta,
            )


# --- parsing ------------------------------------------------------------------------------


def _build(cls: type, raw: Any, path: str) -> Any:
    """Build dataclass `cls` from mapping `raw`, checking every field; `path` names it."""
    where = path or str(paths.PARAMS)
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{where}: must be a mapping of keys to values, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        name = f"{path}.{unknown[0]}" if path else str(unknown[0])
        # A typo, by hand or through `dvc exp run -S +key=value` (a plain -S to a key that
        # params.yaml lacks is refused by DVC itself): name the key it was probably meant to be.
        close = difflib.get_close_matches(str(unknown[0]), list(fields), n=1, cutoff=0.75)
        hint = f" (did you mean {path + '.' if path else ''}{close[0]}?)" if close else ""
        raise ParamsError(
            f"{name}: unknown key{hint}; allowed keys in {where}: {', '.join(fields)}"
        )
    values = {}
    for name, field in fields.items():
        full = f"{path}.{name}" if path else name
        if name not in raw:
            raise ParamsError(f"{full}: missing; add it to params.yaml")
        check = field.metadata["check"]
        if dataclasses.is_dataclass(check):
            values[name] = _build(check, raw[name], full)
        else:
            values[name] = check(full, raw[name])
    return cls(**values)


def parse_params(raw: Any) -> Params:
    """Validate a params mapping (as loaded from YAML) into `Params`."""
    return _build(Params, raw, "")


def load_params(path: Path | str = paths.PARAMS) -> Params:
    """Read and validate params.yaml; the one place any stage reads its knobs."""
    return parse_params(read_yaml(path))


def read_yaml(path: Path | str) -> Any:
    """params.yaml as plain data, parsed as DVC parses it (ruamel.yaml's safe loader, YAML
    1.2), so a value means here what `dvc params diff` and `dvc exp show` show: `1e-3` is a
    number, `yes`/`on` are words (YAML 1.1's booleans), `010` is ten, a repeated key is an
    error. PyYAML alone reads YAML 1.1, where all four differ."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run from the repository root") from None
    except UnicodeDecodeError as error:
        reason = f"{error.reason} at byte {error.start}"
        raise ParamsError(f"{path}: not UTF-8 text ({reason})") from None
    try:
        return YAML(typ="safe").load(text)
    except YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {_yaml_problem(error)}") from None


def _yaml_problem(error: YAMLError) -> str:
    """The parser's complaint in one line: what it found where (1-based), and what it
    was reading, from where: the `[` left open, not only the line it gave up on."""

    def at(mark) -> str:
        return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""

    problem = getattr(error, "problem", None)
    if problem is None:  # a ReaderError (bytes that are not text) says where itself
        return " ".join(str(error).split())
    line = f"{problem}{at(getattr(error, 'problem_mark', None))}"
    context = getattr(error, "context", None)
    if context:
        line += f", {context}{at(getattr(error, 'context_mark', None))}"
    return line


def flatten(params: Params) -> dict[str, Any]:
    """Every value with its dotted key (`train.augment.flip`), as MLflow logs them."""
    flat: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            key = f"{prefix}.{field.name}" if prefix else field.name
            if dataclasses.is_dataclass(value):
                walk(value, key)
            else:
                flat[key] = list(value) if isinstance(value, tuple) else value

    walk(params, "")
    return flat
