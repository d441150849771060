"""What a recovery state must match to be resumed: the resume key.

A training killed mid-way resumes from its last epoch only if nothing it computes has
changed since: its params (the sections dvc.yaml's train stage lists), its data by
content, the precision and replicas it ran on, and the code that computes it
(TRAINING_CODE, as syntax trees: comments and docstrings may change). pipeline/resume.py
keeps the states by this key's fingerprint.
"""

from __future__ import annotations

import hashlib

from pipeline.config import Params, flatten
from pipeline.prepared import Split

# The params sections training reads; dvc.yaml's train stage lists the same, so editing one
# re-runs training. data.* reach training only through data/prepared, a dep by content (and
# the recovery state is keyed by its content too, see resume_key), so a mirror URL serving
# the same archive re-runs no training. evaluate.* must not restart a training either.
TRAINING_SECTIONS = ("model", "train")


def training_params(params: Params) -> dict:
    """The dotted values of the sections training reads: with meta.json, the resume key."""
    return {k: v for k, v in flatten(params).items() if k.split(".")[0] in TRAINING_SECTIONS}


# The code that decides what a training computes, by module: the network and its loss,
# the input and augmentation, the optimizer and schedule, SAM, the compiled model, the
# seeds, the fit and the multi-worker step. Only these functions, classes and constants
# (a constant a function reads is not in the function's source) of model.py,
# optimizer.py, distributed.py and train.py: a fix in their logging, progress lines,
# loading or recovery code (restored_model, agreeing) keeps a recovery state (a crash
# fixed after 40 epochs must not cost the 40), and so do edits of comments and
# docstrings: the digest is of the code's syntax tree without them.
TRAINING_CODE = {
    "pipeline/model.py": (
        "build_model", "_conv", "_residual_unit", "crossentropy", "SmoothedCrossentropy",
    ),
    "pipeline/data.py": None,  # None: the whole module
    "pipeline/optimizer.py": (
        "AgreedLossScaleOptimizer", "make_schedule", "make_optimizer", "decay_only",
        "NOT_KERNELS",
    ),
    "pipeline/sam.py": None,
    "pipeline/distributed.py": ("agree_on_overflow", "fit_workers"),
    "pipeline/train.py": ("compiled_model", "build_network", "seed_everything", "fit_epochs"),
}  # fmt: skip


def code_digest() -> dict[str, str]:
    """pipeline/<module>: the sha256 (16 hex digits) of its TRAINING_CODE, as syntax trees
    without docstrings (comments and layout are not in a tree)."""
    import importlib
    import inspect

    digest = {}
    for path, names in TRAINING_CODE.items():
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        parts = [module] if names is None else [getattr(module, name) for name in names]
        trees = [
            _without_docstrings(inspect.getsource(part))
            if inspect.ismodule(part) or inspect.isclass(part) or inspect.isfunction(part)
            else _literal(part)
            for part in parts
        ]
        digest[path] = hashlib.sha256("".join(trees).encode()).hexdigest()[:16]
    return digest


def _literal(constant) -> str:
    """A constant as text that is the same in every process: plain values only (a set's
    order changes with the hash seed, an object's default repr with its address)."""
    if isinstance(constant, tuple | list):
        return "(" + ",".join(_literal(c) for c in constant) + ")"
    if constant is None or isinstance(constant, str | int | float | bool):
        return repr(constant)
    raise TypeError(f"TRAINING_CODE: {constant!r} is not a plain constant to digest")


def _without_docstrings(source: str) -> str:
    """The syntax tree of `source` (ast.dump), every docstring left out."""
    import ast
    import textwrap

    tree = ast.parse(textwrap.dedent(source))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and body and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)
        ):  # fmt: skip
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def resume_basis(
    params: Params, meta: dict, train: Split, val: Split, precision: str, workers: int,
    replicas: int | None = None,
) -> dict:  # fmt: skip
    """What a recovery state must match to be resumed: training params, data, precision,
    workers, replicas (GPUs in sync over all workers: each replica's batch-norm statistics
    are over its share of the batch) and the code that computes the training.

    The data by content (data.url or data.md5 may change with the same images);
    evaluate.* not at all, so an evaluation edit never restarts a training. The code,
    since dvc.yaml reruns this stage after an edit of it: resuming a checkpoint of other
    code would fail at export after all the epochs (a changed layer), or mix two
    networks in one model without a word (a changed pooling, say).
    """
    from pipeline.prepared import training_data_digest

    data = training_data_digest(train, val)
    settings = training_params(params)
    # Values that change nothing this training computes: the precision is in the basis as
    # `auto` resolved it, a warm-up only under onecycle, SAM's first epoch only with SAM on,
    # the weight decay's scope only with a weight decay.
    del settings["train.precision"]
    if params.train.lr_schedule != "onecycle":
        del settings["train.warmup"]
    if not params.train.sam_rho:
        del settings["train.sam_from_epoch"]
    if not params.train.weight_decay:
        del settings["train.weight_decay_scope"]
    return {
        "params": settings, "meta": meta, "data": data,
        "precision": precision, "workers": workers, "replicas": replicas or workers,
        "code": code_digest(),
    }  # fmt: skip


def resume_key(basis: dict) -> str:
    """The recovery state's fingerprint: a hash of its basis."""
    from pipeline.resume import fingerprint

    return fingerprint(*basis.values())
