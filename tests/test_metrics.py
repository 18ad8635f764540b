import numpy as np
import torch

from dptune.metrics.segmentation import ConfusionMatrix, metrics_from_confmat


def numpy_reference(preds, target, c):
    v = target != 255
    cm = np.zeros((c, c), np.int64)
    for t, p in zip(target[v].ravel(), preds[v].ravel(), strict=True):
        cm[t, p] += 1
    iou = []
    acc = []
    for k in range(c):
        tp = cm[k, k]
        union = cm[k, :].sum() + cm[:, k].sum() - tp
        if union > 0:
            iou.append(tp / union)
        if cm[k, :].sum() > 0:
            acc.append(tp / cm[k, :].sum())
    return cm, np.mean(iou), np.diag(cm).sum() / cm.sum(), np.mean(acc)


def test_confusion_metrics_match_numpy_over_batches():
    rng = np.random.default_rng(0)
    c = 5
    metric = ConfusionMatrix(c)
    all_p, all_t = [], []
    for _ in range(4):
        t = rng.integers(0, c, (2, 17, 23))
        t[rng.random(t.shape) < 0.2] = 255
        t[t == 4] = 3  # class 4 never in the labels...
        p = rng.integers(0, c - 1, t.shape)  # ...nor in the predictions: excluded from the mean
        p[0, 0, :3] = 0
        metric.update(torch.from_numpy(p), torch.from_numpy(t))
        all_p.append(p)
        all_t.append(t)
    cm_ref, miou, pacc, macc = numpy_reference(np.concatenate(all_p), np.concatenate(all_t), c)
    cm = metric.compute()
    assert np.array_equal(cm.numpy(), cm_ref)
    m = metrics_from_confmat(cm)
    assert abs(m["mIoU"].item() - miou) < 1e-12
    assert abs(m["pixel_acc"].item() - pacc) < 1e-12
    assert abs(m["mAcc"].item() - macc) < 1e-12
    assert torch.isnan(m["IoU"][4])


def test_class_only_in_predictions_counts_with_zero_iou():
    cm = torch.tensor([[5, 2], [0, 0]])  # class 1 predicted twice, never labelled
    m = metrics_from_confmat(cm)
    assert m["IoU"][1].item() == 0.0
    assert abs(m["mIoU"].item() - (5 / 7 + 0) / 2) < 1e-12
    assert abs(m["mAcc"].item() - 5 / 7) < 1e-12
