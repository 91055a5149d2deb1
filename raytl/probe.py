"""A linear probe trained to convergence inside one report.

A head on cached features costs milliseconds per pass, so judging it after the 2-3 epochs a
fine-tuning trial gets would judge it underfit, not bad (ASHA then stopped it). Instead the probe
phase (``Phase.converge``) runs passes until the validation loss has not improved for
:data:`PATIENCE` passes (at most :data:`MAX_PASSES`) and keeps the head of its best pass, as
scikit-learn's ``MLPClassifier(early_stopping=True)`` or Keras' ``EarlyStopping(restore_best_
weights=True)`` do. The validation split that scores the trial also stops it (as for every epoch
count picked on validation data); the refit, which has no validation split, runs the number of
passes the search's trial kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

MAX_PASSES = 100  # a cap: a head that still improves after this many passes is kept as it is
PATIENCE = 5  # passes without a lower validation loss before the probe stops
MIN_IMPROVEMENT = 1e-4  # a validation loss lower by less than this is no improvement
PASSES_WITHOUT_VALIDATION = 20  # when neither a validation split nor a searched count says


def train_to_convergence(
    train_pass: Callable[[int], tuple[torch.Tensor, int]],
    validation_loss: Callable[[], float] | None,
    head: nn.Module,
    passes: int | None = None,
) -> tuple[torch.Tensor, int, int]:
    """Run ``train_pass(p)`` for p = 0, 1, ... and keep ``head`` as it was after its best pass.

    With ``validation_loss``: early stopping on it (``passes``, if given, is ignored). Without
    (a refit): exactly ``passes`` passes, or :data:`PASSES_WITHOUT_VALIDATION`. Returns the last
    pass's summed train figures, the images this rank saw in it, and the passes kept.
    """
    if validation_loss is None:
        fixed = max(1, passes or PASSES_WITHOUT_VALIDATION)
        for p in range(fixed):
            sums, images = train_pass(p)
        return sums, images, fixed
    best, kept, best_state = math.inf, 0, None
    for p in range(MAX_PASSES):
        sums, images = train_pass(p)
        loss = validation_loss()
        if loss < best - MIN_IMPROVEMENT:
            best, kept = loss, p + 1
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        elif p + 1 - kept >= PATIENCE:
            break
    if best_state is not None:
        head.load_state_dict(best_state)
    return sums, images, kept
