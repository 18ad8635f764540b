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


def test_class_map_is_numpy_argmax_with_ties_and_nonfinite_scores():
    """The validation masks: per pixel the first class of highest score (numpy's argmax), in float32
    and bfloat16, with tied classes, NaN (counted as the maximum, as numpy does) and infinities."""
    from dptune.metrics.segmentation import class_map

    rng = np.random.default_rng(0)
    scores = rng.integers(-3, 4, size=(3, 7, 9, 11)).astype(np.float32)  # small integers: many ties
    scores[0, 4, 0, 0] = np.nan
    scores[1, :, 2, 3] = -np.inf
    scores[2, 5, 1, 1] = np.inf
    for dtype in (torch.float32, torch.bfloat16):
        got = class_map(torch.from_numpy(scores).to(dtype))
        assert got.dtype == torch.long
        np.testing.assert_array_equal(got.numpy(), np.argmax(scores, axis=1))
    one = class_map(torch.from_numpy(scores[0]), dim=0)  # one image (C, H, W)
    np.testing.assert_array_equal(one.numpy(), np.argmax(scores[0], axis=0))
    scores[2, 1, 4, 4] = scores[2, 6, 4, 4] = np.nan  # two NaNs at one pixel: the first
    laid = torch.from_numpy(scores).contiguous(memory_format=torch.channels_last)  # as validation's logits are
    np.testing.assert_array_equal(class_map(laid).numpy(), np.argmax(scores, axis=1))


def test_finite_rows_flags_exactly_the_samples_holding_nan_or_inf():
    """Which samples' scores hold a NaN or +-inf, including samples of finite values whose float sum
    overflows (the fast path sums first): the same as numpy's isfinite over each sample."""
    from dptune.metrics import finite_rows

    x = np.random.default_rng(1).standard_normal((6, 3, 5, 5)).astype(np.float32)
    x[1, 0, 2, 2] = np.nan
    x[2, 2, 4, 4] = np.inf
    x[3, 1, 0, 0] = -np.inf
    x[4] = 3.0e38  # finite values; their sum is inf in float32
    x[5, 0, 0, 0], x[5, 0, 0, 1] = np.inf, -np.inf
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = torch.from_numpy(x).to(dtype)
        expected = torch.isfinite(t).reshape(6, -1).all(1).numpy()
        np.testing.assert_array_equal(finite_rows(t).numpy(), expected)
    np.testing.assert_array_equal(finite_rows(torch.from_numpy(x)).numpy(), [True, False, False, False, True, False])


def test_finite_rows_reads_channels_last_batches_as_they_are():
    """bfloat16 validation logits come out of the model channels-last: the check gives the same
    answer on that layout, a NaN in one sample flagging that sample only."""
    from dptune.metrics import finite_rows

    x = torch.randn(3, 4, 6, 5).contiguous(memory_format=torch.channels_last)
    x[1, 2, 3, 4] = float("nan")
    assert not x.is_contiguous()
    assert finite_rows(x).tolist() == [True, False, True]
    assert finite_rows(torch.tensor([1.0, float("inf"), 0.0])).tolist() == [True, False, True]


def test_the_kernel_timing_table_runs(monkeypatch, capsys):
    """``python -m dptune.tools.eval_kernels`` (the figures of docs/benchmarks.md "Validation cost")
    prints one row per kernel with positive times."""
    from dptune.tools import eval_kernels

    monkeypatch.setattr(eval_kernels, "ROUNDS", 1)
    eval_kernels.main([])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert len(lines) == 6
    for line in lines:
        before, now = (float(v) for v in line.split("|")[3:5])
        assert before > 0 and now > 0
