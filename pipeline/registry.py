"""The MLflow model registry: every evaluated model a version, the best one `@champion`.

A trained model is registered once as a version of `evaluate.registered_model`
(`cifar10-resnet`; a re-evaluation of the same model reuses its version); the
version carries its latest test accuracy as the tag `test_accuracy` and a digest
of the test images it was scored on as `test_images` (prepared.digest_of_test_set:
the images and their class names, in any order). The alias `champion` moves
to it only when that accuracy beats the current champion's on the same test
images: a tie keeps the old one, a champion with no recorded accuracy (aliased
by hand) is replaced, and one scored on other test images (another dataset
registered under the same name) is not compared with and stays.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from pipeline.tracking import retry_locked, store_lock

# The version tag with the digest of its test images. Versions tagged before 2026-12-01
# carry `test_set`, a digest that depended on the images' order: not read, so such a
# champion counts as untagged and is compared with, as before the tag existed.
TEST_SET_TAG = "test_images"
CHAMPION = "champion"
# The test_accuracy tag's decimals. Accuracies are compared at them, so a model that
# ties the champion is a tie even when the tag rounded the champion's figure down
# (1001/1500 = 0.667333..., tagged 0.667333). Apart for test sets over a million images.
DECIMALS = 6


@dataclass(frozen=True)
class Decision:
    version: str
    accuracy: float
    champion_version: str | None  # the champion before this decision
    champion_accuracy: float | None
    promoted: bool
    name: str  # the registered model (evaluate.registered_model)
    other_test_set: bool = False  # the champion was scored on other test images

    def describe(self) -> str:
        name = f"{self.name} version {self.version} (test accuracy {self.accuracy:.4f})"
        if self.champion_version is None:
            return f"{name} is the first champion: @{CHAMPION} -> version {self.version}"
        if self.champion_version == self.version:
            return f"{name} is already @{CHAMPION}"
        if self.other_test_set:
            return (
                f"{name} is not compared with champion version {self.champion_version}, "
                f"scored on other test images: @{CHAMPION} stays on version "
                f"{self.champion_version} (a model of another dataset needs its own "
                "evaluate.registered_model; for new test images of the same dataset, move "
                f"@{CHAMPION} by hand in mlflow ui)"
            )
        if self.champion_accuracy is None:  # registered outside the pipeline, never scored
            before = f"champion version {self.champion_version} (no recorded test accuracy)"
        else:
            before = f"champion version {self.champion_version} ({self.champion_accuracy:.4f})"
        if self.promoted:
            return f"{name} beats {before}: @{CHAMPION} -> version {self.version}"
        return (
            f"{name} does not beat {before}: @{CHAMPION} stays on version {self.champion_version}"
        )

    def tags(self) -> dict[str, str]:
        return {
            "registry.model": self.name,
            "registry.version": self.version,
            "registry.champion_before": str(self.champion_version),
            "registry.promoted": str(self.promoted).lower(),
            "registry.decision": self.describe(),
        }


def should_promote(accuracy: float, champion_accuracy: float | None) -> bool:
    """Strictly better (at DECIMALS), or no champion (or one never scored) yet; a tie keeps
    the champion."""
    if champion_accuracy is None:
        return True
    return round(accuracy, DECIMALS) > round(champion_accuracy, DECIMALS)


def recorded_accuracy(client, champion) -> float | None:
    """The champion's test accuracy: its version tag, else its run's metric, else None.

    A version aliased by hand or registered outside the pipeline may carry neither;
    it then counts as unscored and the next evaluated model replaces it.
    """
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(TypeError, ValueError):  # a tag set by hand may be no number
        return float(champion.tags.get("test_accuracy"))  # None: TypeError
    if champion.run_id:
        try:
            metric = client.get_run(champion.run_id).data.metrics.get("test_accuracy")
        except MlflowException as error:
            if not _not_found(error):  # a store that fails must not unseat the champion
                raise
            metric = None  # its run was deleted
        if metric is not None:
            return float(metric)
    return None


def _not_found(error: Exception) -> bool:
    """An MLflow error that means "no such run, model or alias", not "store unavailable".

    MLflow 3.17 reports a missing run or model as RESOURCE_DOES_NOT_EXIST and a
    missing alias as INVALID_PARAMETER_VALUE, from SQL stores and servers alike.
    """
    return getattr(error, "error_code", "") in (
        "RESOURCE_DOES_NOT_EXIST",
        "INVALID_PARAMETER_VALUE",
    )


@retry_locked
def register(
    model_uri: str, run_id: str, accuracy: float, name: str, test_set: str = ""
) -> Decision:
    """Register (or find) the version of `model_uri` under `name` and decide on the champion
    alias; `test_set` is a digest of the test images `accuracy` was measured on."""
    from mlflow import MlflowClient, register_model
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    with store_lock():  # two experiments finishing together must not both become champion
        existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if existing:
            version = str(existing[0].version)
        else:
            version = str(register_model(model_uri, name).version)
        client.set_model_version_tag(name, version, "test_accuracy", f"{accuracy:.{DECIMALS}f}")
        if test_set:
            client.set_model_version_tag(name, version, TEST_SET_TAG, test_set)
        try:
            champion = client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException as error:
            if not _not_found(error):  # locked (retried) or unreachable: never "no champion"
                raise
            champion = None  # no alias yet
        champion_version = str(champion.version) if champion else None
        champion_accuracy = None
        if champion and champion_version != version:
            champion_accuracy = recorded_accuracy(client, champion)
        # Another version, tagged by its evaluation with other test images: not comparable.
        other = bool(
            champion
            and champion_version != version
            and test_set
            and champion.tags.get(TEST_SET_TAG, test_set) != test_set
        )
        if champion_version == version or other:
            promoted = False
        else:
            promoted = should_promote(accuracy, champion_accuracy)
        if promoted:
            client.set_registered_model_alias(name, CHAMPION, version)
    return Decision(version, accuracy, champion_version, champion_accuracy, promoted, name, other)
