"""The score a model's outputs get against labels: top-1 accuracy for class labels (N,), mean
intersection over union (mIoU) for dense labels (N, H, W), accumulated over batches."""

from __future__ import annotations

import torch


class Score:
    """``update(logits, labels)`` batch by batch, then ``value()``. Logits are (N, C) or (N, C, H, W);
    top-1 accuracy for (N,) labels, mIoU for (N, H, W) labels: per class, the pixels predicted and
    labelled that class over those either predicted or labelled it, averaged over the classes that
    appear in the labels or the predictions (a class absent from both has no IoU)."""

    def __init__(self):
        self.correct = self.total = 0
        self.confusion: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return "accuracy" if self.confusion is None else "mIoU"

    def update(self, logits, labels) -> None:
        logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)  # torch tensors or numpy arrays
        pred = logits.argmax(1)
        if labels.dim() == 1:
            self.correct += int((pred == labels).sum())
            self.total += labels.numel()
            return
        classes = logits.shape[1]
        pair = (labels.flatten().long() * classes + pred.flatten().long()).cpu()
        counts = torch.bincount(pair, minlength=classes * classes).view(classes, classes)
        self.confusion = counts if self.confusion is None else self.confusion + counts

    def value(self) -> float:
        if self.confusion is None:
            return self.correct / max(self.total, 1)
        c = self.confusion.double()
        union = c.sum(0) + c.sum(1) - c.diag()
        present = union > 0
        return float((c.diag()[present] / union[present]).mean()) if present.any() else 0.0


def score(logits, labels) -> float:
    """Top-1 accuracy, or mIoU for dense labels, of one set of outputs."""
    s = Score()
    s.update(logits, labels)
    return s.value()
