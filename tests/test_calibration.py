"""Sequential Temperature Scaling: ECE / AUROC metrics, and the fit on synthetic heads."""
import math

import pytest
import torch

from dspark.train.calibrate import Rounds, ece, fit_sts, format_report, log_grid, report, roc_auc


def test_ece_and_auc_by_hand():
    pred = torch.tensor([0.11, 0.13, 0.91, 0.96], dtype=torch.float64)
    label = torch.tensor([0, 1, 1, 1])
    # bins of width 0.05: {0.11, 0.13} (mean .12 vs .5), {0.91}, {0.96}
    assert float(ece(pred, label, 20)) == pytest.approx((2 * 0.38 + 0.09 + 0.04) / 4)
    # 2 bins: [0, .5): mean pred .12, mean label .5; [.5, 1]: .935 vs 1
    assert float(ece(pred, label, 2)) == pytest.approx(0.5 * 0.38 + 0.5 * 0.065)
    assert roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    assert roc_auc(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0, 1, 1])) == 0.5  # ties
    assert math.isnan(roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))
    grid = log_grid()
    assert len(grid) == 201 and float(grid[0]) == pytest.approx(0.1)
    assert float(grid[100]) == pytest.approx(1.0) and float(grid[-1]) == pytest.approx(10.0)


def _synthetic(N=4000, G=5, over=3.0, seed=0):
    """Per-position true acceptance logits; the head reports them `over` times too sharp."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(N, G, generator=g) * 1.5 + 1.0
    acc_k = torch.rand(N, G, generator=g) < torch.sigmoid(true)
    accepted = acc_k.long().cumprod(1).sum(1)
    lengths = torch.full((N,), G)
    lengths[: N // 10] = torch.randint(1, G, (N // 10,), generator=g)  # EOS-shortened rounds
    accepted = torch.minimum(accepted, lengths)
    return Rounds(true * over, lengths, accepted)


def test_sts_calibrates_an_overconfident_head_and_keeps_rankings():
    rounds = _synthetic()
    temps = fit_sts(rounds)
    assert len(temps) == 5 and all(2.0 < t < 4.5 for t in temps), temps
    rows = report(rounds, temps)
    for r in rows:
        assert r["ece_sts"] < 0.5 * r["ece_raw"] and r["ece_sts"] < 0.03, r
        assert r["auc_raw"] > 0.7
    # within a position the ranking of c_k is unchanged (scaling is monotone)
    for k, T in enumerate(temps):
        z = rounds.z[:, k].double()
        assert torch.equal(torch.sigmoid(z).argsort(stable=True),
                           torch.sigmoid(z / T).argsort(stable=True))
    assert rows[0]["auc_sts"] == pytest.approx(rows[0]["auc_raw"])  # a_1 = c_1: same ranking
    assert all(r["auc_conditional"] == pytest.approx(
        roc_auc(rounds.z[(rounds.lengths >= r["position"]) & (rounds.accepted >= r["position"] - 1),
                         r["position"] - 1],
                rounds.accepted[(rounds.lengths >= r["position"])
                                & (rounds.accepted >= r["position"] - 1)] >= r["position"]))
               for r in rows)
    assert "ECE" in format_report(rows)


def test_sts_underconfident_head_and_ties():
    rounds = _synthetic(over=0.4, seed=1)
    assert all(t < 0.7 for t in fit_sts(rounds))
    # a head whose outputs carry no information beyond a constant: every T with the same ECE
    # ties, and the tie goes to T = 1
    z = torch.zeros(100, 3)
    acc = torch.tensor([3] * 50 + [0] * 50)
    assert fit_sts(Rounds(z, torch.full((100,), 3), acc)) == [1.0, 1.0, 1.0]
    # positions nobody reached get T = 1
    assert fit_sts(Rounds(torch.randn(10, 3), torch.ones(10, dtype=torch.long),
                          torch.zeros(10, dtype=torch.long)))[1:] == [1.0, 1.0]
