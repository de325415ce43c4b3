"""Classification metrics: top-k accuracy, per-class report, confusion matrix and plots."""

from __future__ import annotations

import torch


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks=(1, 3)) -> dict[int, float]:
    """Fraction of rows whose target is among the k highest scores, for each k.

    Args:
        logits: float (N, C) scores. targets: int64 (N,) class indices.
    Returns:
        {k: accuracy in [0, 1]}; k larger than C counts every row as correct.
    Raises:
        ValueError: shapes do not match or N == 0.
    """
    if logits.dim() != 2 or targets.dim() != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"expected logits (N, C) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError("no samples")
    out = {}
    for k in ks:
        top = logits.topk(min(k, logits.shape[1]), dim=1).indices
        out[k] = (top == targets.view(-1, 1)).any(dim=1).float().mean().item()
    return out


def classification_summary(logits: torch.Tensor, targets: torch.Tensor, class_names: list[str]) -> dict:
    """Top-1/top-3, macro-F1, per-class precision/recall/F1/support (scikit-learn), the confusion matrix
    (rows: true class, columns: predicted) and each row's top-1 class index (``predicted``, N ints), as
    JSON-ready values."""
    from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

    topk = topk_accuracy(logits, targets, (1, 3))
    pred = logits.argmax(dim=1).numpy()
    true = targets.numpy()
    labels = list(range(len(class_names)))
    # per-class arrays by index: identity names such as "accuracy" or "macro avg" cannot collide with keys
    precision, recall, f1, support = precision_recall_fscore_support(true, pred, labels=labels, zero_division=0)
    text = classification_report(true, pred, labels=labels, target_names=class_names, zero_division=0, digits=3)
    return {
        "top1": topk[1],
        "top3": topk[3],
        "macro_f1": float(f1.mean()),
        "n": int(len(true)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(true, pred, labels=labels).tolist(),
        "report_text": text,
        "predicted": pred.tolist(),
    }


def plot_confusion_matrix(matrix: list[list[int]], class_names: list[str], path: str, title: str) -> None:
    """Write the confusion matrix as a PNG (scikit-learn's display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    n = len(class_names)
    # no matplotlib mathtext from names
    class_names = [name.replace("$", r"\$") for name in class_names]
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * n + 3), max(4, 0.45 * n + 2)))
    ConfusionMatrixDisplay(np.array(matrix), display_labels=class_names).plot(
        ax=ax, xticks_rotation="vertical", colorbar=False, include_values=n <= 30
    )
    ax.set_title(title.replace("$", r"\$"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(history: list[dict], keys: list[str], path: str, title: str) -> None:
    """Line plot of ``keys`` of per-epoch records (x: ``epoch``) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def paired_top1_difference(correct_a, correct_b, resamples: int = 10_000, seed: int = 0) -> dict:
    """Top-1 of arm B minus arm A on one test set, with a 95% interval over the test images and McNemar's test.

    Both arms were scored on the same images, so their results are paired: the interval is a paired bootstrap
    (the percentile interval of the mean per-image difference over ``resamples`` resamples of the images;
    Efron and Tibshirani, "An Introduction to the Bootstrap", 1993, with ``scipy.stats.bootstrap``), and the
    test counts only the images on which the arms disagree (McNemar 1947, in its exact binomial form). Both
    measure what the choice of test images does to the difference; the randomness of training is not in them
    (a retrained arm moves further).

    Args:
        correct_a, correct_b: bool sequences (N,), whether each test image's top-1 was right, in one order.
        resamples: bootstrap resamples. seed: the bootstrap's random seed (the interval is reproducible).
    Returns:
        {"n": N, "difference": mean(B) - mean(A) as a fraction, "ci95": [low, high] (fractions),
        "a_only": images only A got right, "b_only": images only B got right, "mcnemar_p": two-sided p}.
    Raises:
        ValueError: the sequences differ in length or are empty.
    """
    import numpy as np
    from scipy.stats import binomtest, bootstrap

    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"expected two results of one non-empty test set, got {a.shape} and {b.shape} images")
    per_image = b.astype(float) - a.astype(float)
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    if a_only + b_only == 0:
        # the arms agree on every image: no resample can differ
        low = high = 0.0
        p = 1.0
    else:
        interval = bootstrap(
            (per_image,), np.mean, n_resamples=resamples, method="percentile", random_state=seed
        ).confidence_interval
        low, high = float(interval.low), float(interval.high)
        p = float(binomtest(b_only, a_only + b_only, 0.5).pvalue)
    return {
        "n": int(a.size),
        "difference": float(per_image.mean()),
        "ci95": [low, high],
        "a_only": a_only,
        "b_only": b_only,
        "mcnemar_p": p,
    }
