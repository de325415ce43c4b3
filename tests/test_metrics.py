import pytest
import torch

from facessl.common.metrics import classification_summary, topk_accuracy


def test_topk_accuracy_known_values():
    logits = torch.tensor(
        [
            # target 0: top-1
            [0.9, 0.05, 0.03, 0.02],
            # target 1: rank 3
            [0.1, 0.2, 0.3, 0.4],
            # target 1: rank 2
            [0.5, 0.4, 0.05, 0.05],
            [0.1, 0.2, 0.3, 0.4],
        ]
        # target 0: rank 4
    )
    targets = torch.tensor([0, 1, 1, 0])
    acc = topk_accuracy(logits, targets, (1, 2, 3, 4))
    assert acc == {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0}


def test_topk_larger_than_classes_counts_all():
    assert topk_accuracy(torch.tensor([[0.0, 1.0]]), torch.tensor([0]), (3,))[3] == 1.0


def test_topk_rejects_bad_shapes():
    with pytest.raises(ValueError):
        topk_accuracy(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        topk_accuracy(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))


def test_classification_summary_counts_and_confusion():
    logits = torch.eye(3)[[0, 1, 1, 2, 2, 0]]
    targets = torch.tensor([0, 1, 2, 2, 2, 1])
    s = classification_summary(logits, targets, ["a b", "ç", "x"])
    assert s["top1"] == pytest.approx(4 / 6)
    assert s["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 1, 2]]
    assert s["per_class"]["x"]["recall"] == pytest.approx(2 / 3)
    assert s["per_class"]["x"]["precision"] == pytest.approx(1.0)
    assert s["per_class"]["ç"]["support"] == 2
