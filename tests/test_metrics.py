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


def test_paired_difference_counts_the_disagreements_and_brackets_the_lead():
    from facessl.common.metrics import paired_top1_difference

    # 1,000 images: both right on 400, only B on 120, only A on 20, both wrong on 460
    a = [True] * 400 + [False] * 120 + [True] * 20 + [False] * 460
    b = [True] * 400 + [True] * 120 + [False] * 20 + [False] * 460
    got = paired_top1_difference(a, b)
    assert (got["n"], got["a_only"], got["b_only"]) == (1000, 20, 120)
    assert got["difference"] == pytest.approx(0.10)
    low, high = got["ci95"]
    # the paired standard error is sqrt((120 + 20) / 1000 - 0.1**2) / sqrt(1000) = 0.0114: about +-2.2 points
    assert 0.075 < low < 0.085 and 0.115 < high < 0.125
    assert got["mcnemar_p"] < 1e-15
    # the same seed gives the same interval
    assert paired_top1_difference(a, b)["ci95"] == got["ci95"]


def test_paired_difference_of_arms_that_differ_by_chance_is_not_significant():
    from facessl.common.metrics import paired_top1_difference

    # as many images only A got right as only B: no difference, an interval around zero
    a = [True] * 30 + [False] * 30 + [True] * 40
    b = [False] * 30 + [True] * 30 + [True] * 40
    got = paired_top1_difference(a, b)
    assert got["difference"] == 0.0 and got["mcnemar_p"] == pytest.approx(1.0)
    assert got["ci95"][0] < 0 < got["ci95"][1]
    same = paired_top1_difference(a, a)
    assert same["ci95"] == [0.0, 0.0] and same["mcnemar_p"] == 1.0


def test_paired_difference_refuses_results_of_different_test_sets():
    from facessl.common.metrics import paired_top1_difference

    with pytest.raises(ValueError, match="one non-empty test set"):
        paired_top1_difference([True, False], [True])
    with pytest.raises(ValueError, match="one non-empty test set"):
        paired_top1_difference([], [])
