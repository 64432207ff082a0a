"""Model confidence: how sure the network was of each structure it found, from its own probabilities.

Two figures per label, on the model grid, from the channel the label reads (softmax: its class ``value``;
sigmoid: its ``output_channel``) and the label's mask on that grid:

* ``mean_probability``: the channel's mean probability inside the mask, over the voxels the network itself put
  there (at least 0.3: holes that post-processing filled, such as the lungs inside an External, are not its claim);
* ``uncertain_share``: of the channel's voxels with a probability of at least 0.3, the share at most 0.7
  (0.3 <= p <= 0.7 over p >= 0.3; labels reading one channel, left and right, share this figure).

A network seeing what it was trained on is sure of most of what it finds; one working far outside its training
data (another normalisation, another modality, another body region) is not, and these figures show it.
Everything runs one channel at a time, never on a copy of all channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from gateway.inference.labels import LabelMasks
from gateway.inference.manifest import Label

__all__ = ["Confidence", "from_logits", "from_probabilities", "measure"]

#: The band of probabilities called uncertain.
UNCERTAIN = (0.3, 0.7)


@dataclass(frozen=True)
class Confidence:
    """One label's confidence: mean probability inside its mask, and the share of uncertain voxels of its channel."""

    mean_probability: float
    uncertain_share: float


def measure(probability: np.ndarray, mask: np.ndarray) -> Confidence | None:
    """The :class:`Confidence` of one channel's *probability* for *mask* (same grid); ``None`` for an empty mask."""
    low, high = UNCERTAIN
    if not mask.any():
        return None
    inside = probability[mask & (probability >= low)]  # what the network itself put there, not holes filled after
    candidates = int(np.count_nonzero(probability >= low))
    uncertain = candidates - int(np.count_nonzero(probability > high))
    mean = float(inside.mean(dtype=np.float64)) if inside.size else 0.0
    return Confidence(mean, uncertain / candidates if candidates else 0.0)


def from_probabilities(probabilities: np.ndarray, masks: LabelMasks, labels: Sequence[Label],
                       kind: str) -> dict[str, Confidence]:
    """Each label's confidence from the activated channels ``[channels, *grid]`` and the label masks on the
    same grid (after post-processing)."""
    found = {}
    for label in labels:
        channel = label.value if kind == "softmax" else label.output_channel
        figures = measure(probabilities[channel], masks.mask(label.value))
        if figures is not None:
            found[label.name] = figures
    return found


def from_logits(logits: np.ndarray, labels: Sequence[Label], kind: str, threshold: float) -> dict[str, Confidence]:
    """Each label's confidence from logits ``[channels, *grid]`` (left unchanged), the mask being the raw decision:
    the winning class (softmax) or the channel at or above *threshold* (sigmoid). Probabilities are computed one
    channel at a time: softmax keeps the largest logit, the winner and the sum of exponentials beside them."""
    found = {}
    if kind == "softmax":
        largest = logits[0].copy()
        winner = np.zeros(largest.shape, dtype=np.uint8 if len(logits) <= 256 else np.uint16)
        for index in range(1, len(logits)):  # the first largest wins, as argmax
            winner[logits[index] > largest] = index
            np.maximum(largest, logits[index], out=largest)
        total = np.zeros(largest.shape, dtype=np.float32)
        for channel in logits:
            total += np.exp(channel - largest)
        for label in labels:
            figures = measure(np.exp(logits[label.value] - largest) / total, winner == label.value)
            if figures is not None:
                found[label.name] = figures
        return found
    for label in labels:
        probability = expit(logits[label.output_channel])
        figures = measure(probability, probability >= threshold)
        if figures is not None:
            found[label.name] = figures
    return found
