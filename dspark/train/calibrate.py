"""Sequential Temperature Scaling (STS) of the DSpark confidence head (docs/method.md,
"Confidence").

Data: rounds decoded on held-out prompts with full-length proposals (no scheduler) at the serving
temperature. Round n has raw confidence logits z_{n,1..gamma}, a proposal length L_n (gamma, or
shorter when an accepted draft was a stop token) and accepted count acc_n; the prefix label is
y_{n,k} = [acc_n >= k] for k <= L_n.

Fit, left to right: P_n = 1; for k = 1..gamma, over S_k = {n : L_n >= k}, pick T_k on a log grid
(0.1..10, 201 points) minimizing the ECE (20 equal-width bins) of q_n = P_n sigmoid(z_{n,k} / T)
against y_{n,k}; ties go to the T closest to 1 (in |log T|); then freeze P_n *= sigmoid(z / T_k).
Temperature scaling is monotone per position: the within-position ranking of c_k is unchanged.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch


class Rounds(NamedTuple):
    z: torch.Tensor  # [N, G] raw confidence logits
    lengths: torch.Tensor  # [N] proposal length L_n (1..G)
    accepted: torch.Tensor  # [N] accepted drafts (0..L_n)


def log_grid(lo: float = 0.1, hi: float = 10.0, n: int = 201) -> torch.Tensor:
    g = torch.logspace(math.log10(lo), math.log10(hi), n, dtype=torch.float64)
    g[g.log().abs() < 1e-9] = 1.0  # exactly 1 when the grid contains it
    return g


def ece(pred: torch.Tensor, label: torch.Tensor, bins: int = 20) -> torch.Tensor:
    """Expected calibration error; pred [..., N] in [0, 1], label [N] -> [...]
    (sum over equal-width bins of |bin| / N * |mean pred - mean label|)."""
    N = pred.shape[-1]
    if N == 0:
        return torch.zeros(pred.shape[:-1], dtype=torch.float64)
    pred = pred.double()
    idx = (pred * bins).floor().clamp(0, bins - 1).long()
    lab = label.double().expand_as(pred)
    shape = pred.shape[:-1] + (bins,)
    s_pred = torch.zeros(shape, dtype=torch.float64).scatter_add_(-1, idx, pred)
    s_lab = torch.zeros(shape, dtype=torch.float64).scatter_add_(-1, idx, lab)
    return (s_pred - s_lab).abs().sum(-1) / N


def roc_auc(score: torch.Tensor, label: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN when only one
    class is present."""
    score, label = score.double().flatten(), label.bool().flatten()
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = score.argsort()
    s = score[order]
    _, inverse, counts = torch.unique_consecutive(s, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg = ends - (counts.double() - 1) / 2  # average 1-based rank of each tie group
    ranks = avg[inverse]
    r_pos = ranks[label[order]].sum()
    return float((r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fit_sts(rounds: Rounds, grid: Optional[torch.Tensor] = None, bins: int = 20) -> list:
    """Per-position temperatures T_1..T_G (see the module doc)."""
    z, L, acc = rounds.z.double(), rounds.lengths, rounds.accepted
    N, G = z.shape
    grid = log_grid() if grid is None else grid.double()
    closeness = grid.log().abs()
    P = torch.ones(N, dtype=torch.float64)
    temps = []
    for k in range(1, G + 1):
        S = L >= k
        if not bool(S.any()):
            temps.append(1.0)
            continue
        y = (acc[S] >= k).double()
        q = P[S][None, :] * torch.sigmoid(z[S, k - 1][None, :] / grid[:, None])  # [grid, n]
        e = ece(q, y, bins)
        best = e.min()
        tied = (e - best).abs() <= 1e-12
        i = int(torch.where(tied, closeness, torch.full_like(closeness, math.inf)).argmin())
        T = float(grid[i])
        temps.append(T)
        P[S] = P[S] * torch.sigmoid(z[S, k - 1] / T)
    return temps


def report(rounds: Rounds, temps: Optional[Sequence[float]] = None, bins: int = 20) -> list:
    """Per position k: rounds n_k, observed prefix acceptance, mean predicted a_k, ECE and AUROC
    of the cumulative a_k = prod_{i<=k} c_i against y_k, raw (T = 1) and with ``temps``; and the
    AUROC of the conditional c_k against acceptance at k given k-1 accepted (unchanged by STS)."""
    z, L, acc = rounds.z.double(), rounds.lengths, rounds.accepted
    N, G = z.shape
    out = []
    raw, cal = torch.ones(N, dtype=torch.float64), torch.ones(N, dtype=torch.float64)
    for k in range(1, G + 1):
        T = float(temps[k - 1]) if temps is not None and k - 1 < len(temps) else 1.0
        raw = raw * torch.sigmoid(z[:, k - 1])
        cal = cal * torch.sigmoid(z[:, k - 1] / T)
        S = L >= k
        n = int(S.sum())
        row = {"position": k, "rounds": n, "temperature": T}
        if n:
            y = (acc[S] >= k)
            reached = S & (acc >= k - 1)
            row.update(observed=float(y.double().mean()),
                       predicted_raw=float(raw[S].mean()), predicted_sts=float(cal[S].mean()),
                       ece_raw=float(ece(raw[S], y, bins)), ece_sts=float(ece(cal[S], y, bins)),
                       auc_raw=roc_auc(raw[S], y), auc_sts=roc_auc(cal[S], y),
                       auc_conditional=roc_auc(z[reached, k - 1], acc[reached] >= k))
        out.append(row)
    return out


def format_report(rows: list) -> str:
    lines = ["pos  rounds  observed  pred(raw->sts)   ECE raw -> STS    AUROC raw -> STS  "
             "cond.AUROC  T"]
    for r in rows:
        if not r["rounds"]:
            lines.append(f"{r['position']:>3}  {0:>6}  (no rounds)")
            continue
        lines.append(f"{r['position']:>3}  {r['rounds']:>6}  {r['observed']:>8.3f}  "
                     f"{r['predicted_raw']:.3f}->{r['predicted_sts']:.3f}  "
                     f"{100 * r['ece_raw']:6.2f}% -> {100 * r['ece_sts']:5.2f}%  "
                     f"{r['auc_raw']:.3f} -> {r['auc_sts']:.3f}   {r['auc_conditional']:.3f}  "
                     f"{r['temperature']:.3f}")
    return "\n".join(lines)


@torch.inference_mode()
def record_rounds(engine, prompts: Sequence, temperature: float = 1.0, max_new_tokens: int = 128,
                  batch_size: int = 16, seed: int = 0) -> Rounds:
    """Decode ``prompts`` with the engine's DSpark drafter (full-length proposals) and collect
    the per-round confidence logits, proposal lengths and accepted counts."""
    d = engine.drafter
    if getattr(d, "model", None) is None or d.model.confidence is None:
        raise ValueError("calibration needs a drafter with a confidence head (method dspark)")
    d.recorder = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = list(prompts[i:i + batch_size])
            engine.generate(chunk, max_new_tokens=max_new_tokens, temperature=temperature,
                            seed=[seed + i + j for j in range(len(chunk))])
        recs = d.recorder
    finally:
        d.recorder = None
    if not recs:
        raise ValueError("no rounds were recorded")
    z = torch.cat([r[0] for r in recs])
    return Rounds(z, torch.cat([r[1] for r in recs]), torch.cat([r[2] for r in recs]))


def calibrate_drafter(model, target, prompts: Sequence, temperature: float = 1.0,
                      max_new_tokens: int = 128, batch_size: int = 16) -> list:
    """Fit STS for the DSpark ``model`` on held-out ``prompts`` decoded with ``target`` at the
    serving ``temperature``; store the temperatures and the report in ``model.spec`` (saved
    with the drafter) and return the per-position report."""
    from ..drafters import make_drafter
    from ..engine import SpeculativeEngine
    rounds = record_rounds(SpeculativeEngine(target, make_drafter(model)), prompts, temperature,
                           max_new_tokens, batch_size)
    temps = fit_sts(rounds)
    rep = report(rounds, temps)
    spec = model.spec
    spec.sts_temperatures = temps
    spec.calibration = {"temperature": temperature, "rounds": int(rounds.z.shape[0]),
                        "prompts": len(prompts), "per_position": rep}
    return rep
