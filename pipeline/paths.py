"""Every file the pipeline reads or writes, declared once.

Paths are relative to the repository root (where `dvc.yaml` lives); the stages
run from there. `dvc.yaml` names the same paths as deps and outs, and
`tests/test_dvc_yaml.py` fails if the two ever disagree.
"""

from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")
DVC_LOCK = Path("dvc.lock")  # DVC's record of each stage's deps and outs, by md5

RAW_DIR = Path("data/raw")  # download's out: the archive as served
PREPARED_DIR = Path("data/prepared")  # prepare's out: uint8 arrays + stats

# Inside PREPARED_DIR: one uncompressed .npz per split holding `images` (N, S, S, 3)
# uint8, S = data.image_size (32 for CIFAR-10), and `labels` (N,) int32, plus meta.json
# with the class names, split sizes and the training split's per-channel mean/std
# (0-255 units).
SPLITS = ("train", "val", "test")
META_FILE = "meta.json"


def split_file(prepared_dir: Path, split: str) -> Path:
    return prepared_dir / f"{split}.npz"


MODELS_DIR = Path("models")
MODEL_FILE = MODELS_DIR / "model.keras"  # takes raw uint8 pixels, outputs probabilities
# The model's MLflow run and model URI (for evaluate), its class names and input size.
MODEL_INFO = MODELS_DIR / "model_info.json"

METRICS_DIR = Path("metrics")
TRAIN_METRICS = METRICS_DIR / "train.json"  # final train/val figures, wall time, img/s
HISTORY_FILE = METRICS_DIR / "history.csv"  # one row per epoch, drawn by `dvc plots`
TEST_METRICS = METRICS_DIR / "test.json"  # accuracy, loss, macro P/R/F1, per-class figures
CONFUSION_FILE = METRICS_DIR / "confusion.csv"  # (actual, predicted) per test image
MISCLASSIFIED_PNG = METRICS_DIR / "misclassified.png"
PER_CLASS_PNG = METRICS_DIR / "per_class_accuracy.png"
CONFUSION_PNG = METRICS_DIR / "confusion_matrix.png"

# Training's crash-recovery state: not a DVC out, so `dvc repro` keeps it.
TRAIN_STATE_DIR = Path(".train-state")
