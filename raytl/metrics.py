"""What a classifier is scored by: accuracy, balanced accuracy, macro-F1 (scikit-learn's
definitions) and top-5 accuracy, per unit and trial in a search, on the test split in a refit,
and in ``raytl evaluate``; the per-class table; the ``class_weight: balanced`` loss weights.

An evaluation reduces to one vector of counts (:func:`evaluation_counts`: the summed loss, the
correct and top-5 correct images, the image count and the confusion matrix), so the ranks that
share a unit sum their shares with one all-reduce and every score follows from the sums
(:func:`scored`). Balanced accuracy and macro-F1 come from the confusion matrix exactly as
scikit-learn computes them from the predictions (``balanced_accuracy_score``, ``f1_score(average=
"macro")``): both over the classes that occur, as the true or (macro-F1) the predicted class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from raytl.errors import RaytlError

if TYPE_CHECKING:  # pandas and scikit-learn are imported where used: the per-unit trainer runs
    import pandas as pd  # where they are missing (a bare GPU machine) and they slow a worker's start

TOP_K = 5  # top-5 accuracy is recorded only with more classes than this (else it is always 1)
TOP5 = "val_top5_accuracy"
# what every unit records per epoch on its validation split, and the search can select by
# (search.metric); the top-5 accuracy only where the data has more than TOP_K classes
VAL_METRICS = ("val_accuracy", "val_loss", "val_balanced_accuracy", "val_macro_f1", TOP5)


@dataclass(frozen=True)
class EvalResult:
    """A model's scores on some images (NaN where undefined: top-5 with at most
    :data:`TOP_K` classes, balanced accuracy and macro-F1 without images) and its predictions."""

    loss: float
    accuracy: float
    predictions: np.ndarray  # predicted class per image, in the order of the indices given
    balanced_accuracy: float = math.nan
    macro_f1: float = math.nan
    top5_accuracy: float = math.nan

    @classmethod
    def nothing(cls) -> EvalResult:
        """No images to score (a refit has no validation split)."""
        return cls(math.nan, math.nan, np.empty(0, dtype=np.int64))

    def metrics(self, prefix: str = "val_") -> dict[str, float]:
        """The scores named ``prefix + name`` (:data:`VAL_METRICS` for ``val_``); top-5 accuracy
        only where it is defined."""
        values = {
            "accuracy": self.accuracy,
            "loss": self.loss,
            "balanced_accuracy": self.balanced_accuracy,
            "macro_f1": self.macro_f1,
        }
        if not math.isnan(self.top5_accuracy):
            values["top5_accuracy"] = self.top5_accuracy
        return {prefix + name: value for name, value in values.items()}


def evaluation_counts(logits: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """One float vector that sums over ranks: the summed (unweighted) cross-entropy, the correct
    images, the images, the top-5 correct images (0 with at most :data:`TOP_K` classes) and the
    confusion matrix (true by predicted, row-major)."""
    counts = torch.zeros(4 + n_classes * n_classes, device=labels.device)
    if not len(labels):
        return counts
    logits = logits.float()
    predicted = logits.argmax(1)
    counts[0] = F.cross_entropy(logits, labels, reduction="sum")
    counts[1] = (predicted == labels).sum()
    counts[2] = len(labels)
    if n_classes > TOP_K:
        counts[3] = (logits.topk(TOP_K, dim=1).indices == labels[:, None]).any(1).sum()
    counts[4:] = torch.bincount(labels * n_classes + predicted, minlength=n_classes * n_classes)
    return counts


def balanced_accuracy(confusion: np.ndarray) -> float:
    """The mean recall over the classes that occur as a true class (scikit-learn's
    ``balanced_accuracy_score``); NaN without images."""
    support = confusion.sum(1)
    present = support > 0
    if not present.any():
        return math.nan
    return float(np.mean(np.diag(confusion)[present] / support[present]))


def macro_f1(confusion: np.ndarray) -> float:
    """The mean F1 over the classes that occur as a true or a predicted class (scikit-learn's
    ``f1_score(average="macro")``): per class 2 TP / (2 TP + FP + FN); NaN without images."""
    occurrences = confusion.sum(1) + confusion.sum(0)  # = 2 TP + FP + FN
    present = occurrences > 0
    if not present.any():
        return math.nan
    return float(np.mean(2 * np.diag(confusion)[present] / occurrences[present]))


def scored(counts: torch.Tensor, n_classes: int, predictions: np.ndarray) -> EvalResult:
    """The scores that :func:`evaluation_counts` (summed over ranks, maybe) add up to."""
    values = counts.detach().double().cpu().numpy()
    loss, correct, images, top5 = (float(v) for v in values[:4])
    confusion = values[4:].reshape(n_classes, n_classes)
    n = max(1.0, images)
    return EvalResult(
        loss / n,
        correct / n,
        predictions,
        balanced_accuracy(confusion),
        macro_f1(confusion),
        top5 / n if n_classes > TOP_K and images else math.nan,
    )


def confusion_matrix(true: npt.ArrayLike, predicted: npt.ArrayLike, n_classes: int) -> np.ndarray:
    """Counts of (true, predicted) class pairs, ``n_classes`` square."""
    pairs = np.asarray(true, dtype=np.int64) * n_classes + np.asarray(predicted, dtype=np.int64)
    return np.bincount(pairs, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def classification_figures(true: npt.ArrayLike, predicted: npt.ArrayLike) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro-F1 of class indices (NaN without images)."""
    truth, guess = np.asarray(true, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    n_classes = int(max(truth.max(initial=-1), guess.max(initial=-1))) + 1
    confusion = confusion_matrix(truth, guess, n_classes)
    return {
        "accuracy": float(np.mean(truth == guess)) if len(truth) else math.nan,
        "balanced_accuracy": balanced_accuracy(confusion),
        "macro_f1": macro_f1(confusion),
    }


def per_class_table(
    true: npt.ArrayLike, predicted: npt.ArrayLike, class_names: list[str]
) -> pd.DataFrame:
    """class, precision, recall, f1, support (scikit-learn's): one row per class that occurs as
    a true or a predicted class, in ``class_names`` order."""
    import pandas as pd
    from sklearn.metrics import precision_recall_fscore_support

    labels = sorted(set(np.asarray(true).tolist()) | set(np.asarray(predicted).tolist()))
    precision, recall, f1, support = precision_recall_fscore_support(
        true, predicted, labels=labels, zero_division=0
    )
    return pd.DataFrame(
        {
            "class": pd.Series([class_names[i] for i in labels], dtype="string"),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": np.asarray(support, dtype=np.int64),
        }
    )


def balanced_class_weights(labels: npt.ArrayLike, n_classes: int) -> np.ndarray:
    """scikit-learn's ``compute_class_weight("balanced")`` over the classes in ``labels``:
    ``n_samples / (n_present_classes * count_c)``; a class absent from ``labels`` weighs 0 (no
    training target carries it, and nothing is divided by its zero count)."""
    targets = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(targets, minlength=n_classes).astype(float)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = len(targets) / (present.sum() * counts[present])
    return weights


def loss_weights(
    class_weight: str, labels: np.ndarray, n_classes: int, device: torch.device
) -> torch.Tensor | None:
    """The training loss's class weights for ``class_weight`` (``none``: None, unweighted;
    ``balanced``: :func:`balanced_class_weights` of the unit's own training labels)."""
    if class_weight == "none":
        return None
    weights = balanced_class_weights(labels, n_classes)
    return torch.tensor(weights, dtype=torch.float32, device=device)


def check_metric(metric: str, n_classes: int) -> None:
    """Refuse to select by top-5 accuracy on data of :data:`TOP_K` classes or fewer, where
    every image's class is among any model's top 5 (the score is always 1)."""
    if metric == TOP5 and n_classes <= TOP_K:
        raise RaytlError(
            f"search.metric: {TOP5} needs more than {TOP_K} classes, and the data has "
            f"{n_classes} (the true class is always among the top {TOP_K}); select by "
            "val_accuracy, val_balanced_accuracy, val_macro_f1 or val_loss"
        )
