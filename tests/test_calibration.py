"""Per-head threshold calibration: statistics, the two choice rules, the file round trip, and calibrate() end to end.

Independent references used here: exact attention probabilities in float64 with token masks built by indexing (not the
library's ``true_block_scores``), visible-block counts by formula, brute force over every threshold assignment for
``choose_thresholds``, and a q/k capture hook written in this file for the tiny Llama model.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import sys
import types

import pytest
import torch

from xattention import XAttention
from xattention import calibration as cal
from xattention.calibration import calibrate, choose_thresholds, head_statistics

HAVE_THRESHOLDS = importlib.util.find_spec("xattention.thresholds") is not None
HAVE_HF = importlib.util.find_spec("xattention.integrations.hf") is not None
HAVE_MODELS = importlib.util.find_spec("xattention.models") is not None
HAVE_TASKS = importlib.util.find_spec("xattention.evaluation.tasks") is not None


# ---------------------------------------------------------------------------------------------------------------------
# independent references
# ---------------------------------------------------------------------------------------------------------------------


def token_mask(mask: torch.Tensor, block_size: int, q_len: int, k_len: int) -> torch.Tensor:
    """bool [B, H, Lq, Lk]: block kept and key position <= query position (queries aligned to the end of the keys)."""
    qb = torch.arange(q_len) // block_size
    kb = torch.arange(k_len) // block_size
    tok = mask.cpu()[:, :, qb][:, :, :, kb]
    return tok & (torch.arange(k_len)[None, :] <= (k_len - q_len) + torch.arange(q_len)[:, None])


def exact_probs(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """float64 causal softmax probabilities [B, Hq, Lq, Lk] (K heads repeated for GQA)."""
    hq, hkv, lq, lk, d = q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3]
    kd = k.double().repeat_interleave(hq // hkv, dim=1)
    logits = q.double() @ kd.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(d))
    causal = torch.arange(lk)[None, :] <= (lk - lq) + torch.arange(lq)[:, None]
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)


def expected_statistics(q, k, candidates, *, stride, block_size, scale=None):
    """(density [Hq, C], mass [Hq, C]) from the public XAttention method, fp64 probabilities and counted blocks."""
    lq, lk = q.shape[2], k.shape[2]
    probs = exact_probs(q, k, scale)
    qb = -(-lq // block_size)
    # visible blocks per row: key blocks up to the one holding the row's last query position
    visible = sum((lk - lq + min(r * block_size + block_size - 1, lq - 1)) // block_size + 1 for r in range(qb))
    dens, mass = [], []
    for tau in candidates:
        bm = XAttention(threshold=tau, stride=stride, block_size=block_size).estimate(q, k, scale=scale, backend="reference")
        tok = token_mask(bm.mask, block_size, lq, lk)
        mass.append((probs * tok).sum(dim=(-1, -2)).mean(dim=0) / lq)
        per_head = torch.zeros(q.shape[1], dtype=torch.float64)
        for h in range(q.shape[1]):
            n = 0
            for r in range(qb):
                hi = (lk - lq + min(r * block_size + block_size - 1, lq - 1)) // block_size
                n += int(bm.mask[:, h, r, : hi + 1].sum())
            per_head[h] = n / (visible * q.shape[0])
        dens.append(per_head)
    return torch.stack(dens, dim=-1), torch.stack(mass, dim=-1)


def brute_force(density, mass, budget=None, min_mass=None):
    """Best assignment over all C^N choices: (total mass, total density) — max mass under the budget, or min density
    with every head reaching min_mass."""
    d = density.reshape(-1, density.shape[-1]).tolist()
    m = mass.reshape(-1, mass.shape[-1]).tolist()
    n, c = len(d), len(d[0])
    best = None
    for combo in itertools.product(range(c), repeat=n):
        td = sum(d[h][combo[h]] for h in range(n))
        tm = sum(m[h][combo[h]] for h in range(n))
        if budget is not None:
            if td <= budget * n + 1e-12 and (best is None or tm > best[0]):
                best = (tm, td)
        elif all(m[h][combo[h]] >= min_mass for h in range(n)) and (best is None or td < best[1]):
            best = (tm, td)
    return best


def pick(table: torch.Tensor, thresholds: torch.Tensor, candidates) -> torch.Tensor:
    idx = torch.tensor([[candidates.index(float(t)) for t in row] for row in thresholds.tolist()])
    return table.gather(-1, idx[..., None])[..., 0]


# ---------------------------------------------------------------------------------------------------------------------
# head_statistics
# ---------------------------------------------------------------------------------------------------------------------

L_SYN, D_SYN, B_SYN, S_SYN = 256, 32, 32, 4
CANDS = [0.5, 0.7, 0.8, 0.9, 0.95, 1.0]


def synthetic_heads() -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [1, 3, 256, 32] with known attention: head 0 local (a band of ~8 tokens behind each query), head 1 vertical
    (every query attends to key 40, in key block 1), head 2 uniform (q = 0)."""
    pos = torch.arange(L_SYN, dtype=torch.float32)
    ang = pos[:, None] * torch.linspace(0.02, 0.2, D_SYN // 2)[None, :]
    k_loc = torch.cat([ang.cos(), ang.sin()], dim=-1)  # q_i . k_j = 4 sum_f cos(w_f (i - j)): peaked at j = i
    q_loc = 4.0 * k_loc
    v = torch.nn.functional.normalize(torch.randn(D_SYN), dim=0)
    k_ver = 0.1 * torch.randn(L_SYN, D_SYN)
    k_ver[40] = 20 * v
    q_ver = (20 * v).expand(L_SYN, D_SYN).clone()
    q_uni, k_uni = torch.zeros(L_SYN, D_SYN), torch.randn(L_SYN, D_SYN)
    return torch.stack([q_loc, q_ver, q_uni])[None], torch.stack([k_loc, k_ver, k_uni])[None]


def test_synthetic_heads_statistics_and_thresholds() -> None:
    q, k = synthetic_heads()
    density, mass = head_statistics({0: (q, k)}, candidates=CANDS, stride=S_SYN, block_size=B_SYN)
    assert density.shape == mass.shape == (1, 3, len(CANDS))
    exp_d, exp_m = expected_statistics(q, k, CANDS, stride=S_SYN, block_size=B_SYN)
    torch.testing.assert_close(density[0], exp_d, atol=1e-6, rtol=0)
    torch.testing.assert_close(mass[0], exp_m, atol=1e-5, rtol=0)

    qb = L_SYN // B_SYN
    visible, forced = qb * (qb + 1) / 2, 1 + 2 * (qb - 1)  # sink + diagonal per row (row 0: one block)
    # tau = 1 keeps every block with a non-zero score: all the mass; density and mass never fall as tau grows
    assert torch.all(mass[..., -1] > 1 - 1e-5)
    assert torch.all(density.diff(dim=-1) >= 0) and torch.all(mass.diff(dim=-1) >= -1e-12)
    # vertical head: key block 1 is kept in every row below it and holds all the mass, already at the smallest tau
    assert density[0, 1, 0].item() == pytest.approx((forced + (qb - 2)) / visible)
    assert mass[0, 1, 0].item() > 0.999
    # local head: the sink and diagonal blocks are all that any tau < 1 keeps (the band barely crosses a block edge)
    assert torch.allclose(density[0, 0, :-1], torch.full((len(CANDS) - 1,), forced / visible, dtype=torch.float64))
    assert 0.9 < mass[0, 0, 0].item() < 0.99
    # uniform head: mass grows with tau and is below 0.9 at the smallest one
    assert mass[0, 2, 0].item() < 0.9
    assert torch.all((mass[0, 2].diff() > 0) | (mass[0, 2, 1:] > 1 - 1e-6))

    # min_mass: per head the smallest tau reaching the target (density is monotone in tau here), from the reference
    for target in (0.9, 0.99):
        thr = choose_thresholds(density, mass, CANDS, min_mass=target)
        for h in range(3):
            reach = [c for c, mm in zip(CANDS, exp_m[h].tolist(), strict=True) if mm >= target - 1e-6]
            assert thr[0, h].item() == pytest.approx(min(reach)), (target, h)
    # what that means for these heads: vertical always the smallest, uniform a larger tau, local needs tau=1 for 0.99
    thr = choose_thresholds(density, mass, CANDS, min_mass=0.99)
    assert thr[0, 1].item() == pytest.approx(0.5) and thr[0, 2].item() > 0.5 and thr[0, 0].item() == 1.0


def test_statistics_gqa_batch_awkward_lengths_match_reference() -> None:
    torch.manual_seed(1)
    q = torch.randn(2, 4, 75, 16) * 2
    k = torch.randn(2, 2, 110, 16) * 2  # Lq < Lk, neither a multiple of the block size
    scale = 0.3
    cands = [0.6, 0.9, 1.0]
    density, mass = head_statistics({3: (q, k), 1: (q * 0.5, k)}, candidates=cands, stride=4, block_size=16, scale=scale)
    assert density.shape == (2, 4, 3)
    for row, (qq, kk) in enumerate([(q * 0.5, k), (q, k)]):  # rows follow sorted layer indices: 1 then 3
        exp_d, exp_m = expected_statistics(qq, kk, cands, stride=4, block_size=16, scale=scale)
        torch.testing.assert_close(density[row], exp_d, atol=1e-6, rtol=0)
        torch.testing.assert_close(mass[row], exp_m, atol=1e-5, rtol=0)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_statistics_triton_backend_matches_reference() -> None:
    """The Triton scorer/selector path (interpreted on CPU, compiled on a GPU) gives the reference's tables."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(2)
    q = torch.randn(1, 4, 96, 16, device=device) * 2
    k = torch.randn(1, 2, 96, 16, device=device) * 2
    cands = [0.5, 0.9, 1.0]
    ref = head_statistics({0: (q, k)}, candidates=cands, stride=4, block_size=16, backend="reference")
    tri = head_statistics({0: (q, k)}, candidates=cands, stride=4, block_size=16, backend="triton")
    torch.testing.assert_close(tri[0], ref[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(tri[1], ref[1], atol=1e-5, rtol=0)


def test_statistics_bad_input() -> None:
    q, k = torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8)
    with pytest.raises(ValueError, match="candidate"):
        head_statistics({0: (q, k)}, candidates=[0.0, 0.5], stride=4, block_size=16)
    with pytest.raises(ValueError, match="empty"):
        head_statistics({}, candidates=[0.5], stride=4, block_size=16)
    with pytest.raises(ValueError, match="multiple of stride"):
        head_statistics({0: (q, k)}, candidates=[0.5], stride=3, block_size=16)
    with pytest.raises(ValueError, match="query heads"):
        head_statistics({0: (q, k), 1: (torch.randn(1, 4, 32, 8), k)}, candidates=[0.5], stride=4, block_size=16)
    meta = torch.empty(1, 2, 32, 8, device="meta")  # used to fail copying the tables ("no data")
    with pytest.raises(ValueError, match="meta device"):
        head_statistics({0: (meta, meta)}, candidates=[0.5], stride=4, block_size=16)


# ---------------------------------------------------------------------------------------------------------------------
# choose_thresholds on hand-made tables
# ---------------------------------------------------------------------------------------------------------------------

HAND_CANDS = [0.5, 0.8, 0.9, 1.0]
# [L=1, Hq=3, C=4]. Head 2's tau=0.9 point (0.5, 0.85) lies below the chord (0.4, 0.80) -> (0.6, 0.99): off the hull.
HAND_D = torch.tensor([[[0.10, 0.20, 0.30, 0.50], [0.10, 0.15, 0.20, 0.40], [0.20, 0.40, 0.50, 0.60]]], dtype=torch.float64)
HAND_M = torch.tensor([[[0.60, 0.95, 0.97, 1.00], [0.90, 0.92, 0.93, 1.00], [0.50, 0.80, 0.85, 0.99]]], dtype=torch.float64)


def test_choose_min_mass_hand_table() -> None:
    thr = choose_thresholds(HAND_D, HAND_M, HAND_CANDS, min_mass=0.9)
    # head 0: 0.8 is the first with mass >= 0.9; head 1: 0.5 already; head 2 never reaches 0.9 -> largest (1.0)
    assert thr.tolist() == [[0.8, 0.5, 1.0]]
    thr = choose_thresholds(HAND_D, HAND_M, HAND_CANDS, min_mass=0.8)
    assert thr.tolist() == [[pytest.approx(0.8), 0.5, pytest.approx(0.8)]]
    # min_mass = 1: only tau = 1 reaches it (head 2 falls back to it)
    assert choose_thresholds(HAND_D, HAND_M, HAND_CANDS, min_mass=1.0).tolist() == [[1.0, 1.0, 1.0]]
    # brute force: no assignment with every head >= 0.8 has less total density
    chosen = pick(HAND_D, choose_thresholds(HAND_D, HAND_M, HAND_CANDS, min_mass=0.8), HAND_CANDS).sum().item()
    assert chosen == pytest.approx(brute_force(HAND_D, HAND_M, min_mass=0.8)[1])


def test_choose_min_mass_prefers_least_density_not_least_tau() -> None:
    # a (made-up) head whose density falls between tau 0.8 and 0.9: the rule is least density, not least tau
    d = torch.tensor([[[0.3, 0.5, 0.4, 0.6]]])
    m = torch.tensor([[[0.5, 0.95, 0.95, 1.0]]])
    assert choose_thresholds(d, m, HAND_CANDS, min_mass=0.9).tolist() == [[pytest.approx(0.9)]]


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        # least densities sum to 0.40 (mean 0.1333): exactly feasible, nothing else fits
        (0.40 / 3, [0.5, 0.5, 0.5]),
        # greedy by slope: head 0 0.5->0.8 (slope 3.5, +0.1), head 2 0.5->0.8 (1.5, +0.2), head 2 0.8->1.0 (0.95, +0.2):
        # total 0.9 lands exactly on hull vertices, so the greedy is optimal (brute force agrees below)
        (0.90 / 3, [0.8, 0.5, 1.0]),
        # 0.95: the leftover 0.05 buys head 1's 0.5->0.8 step (slope 0.4)
        (0.95 / 3, [0.8, 0.8, 1.0]),
        # everything fits: the most mass everywhere
        (1.0, [1.0, 1.0, 1.0]),
    ],
)
def test_choose_budget_hand_table(budget: float, expected: list[float]) -> None:
    thr = choose_thresholds(HAND_D, HAND_M, HAND_CANDS, density_budget=budget)
    assert thr[0].tolist() == pytest.approx(expected)
    chosen_d, chosen_m = pick(HAND_D, thr, HAND_CANDS), pick(HAND_M, thr, HAND_CANDS)
    assert chosen_d.mean().item() <= budget + 1e-9
    assert chosen_m.sum().item() == pytest.approx(brute_force(HAND_D, HAND_M, budget=budget)[0])


def test_choose_budget_skips_points_below_the_hull() -> None:
    # head 2's tau=0.9 point is never a stop of the greedy (it is below the hull) while the budget can afford 1.0
    for budget in (0.50 / 3 + 0.20 / 3, 0.90 / 3):
        thr = choose_thresholds(HAND_D, HAND_M, HAND_CANDS, density_budget=budget)
        assert thr[0, 2].item() != pytest.approx(0.9)


def test_choose_budget_infeasible_raises() -> None:
    with pytest.raises(ValueError, match="below the least mean density"):
        choose_thresholds(HAND_D, HAND_M, HAND_CANDS, density_budget=0.1)


def test_choose_budget_random_tables_against_brute_force() -> None:
    """Random monotone tables (2 layers x 2 heads x 4 candidates): the budget holds, the result is never better than
    the optimum, and it is short of it by less than one head's largest step in mass (the documented bound)."""
    gen = torch.Generator().manual_seed(7)
    cands = [0.6, 0.8, 0.9, 1.0]
    for _ in range(40):
        d = torch.rand(2, 2, 4, generator=gen, dtype=torch.float64).cumsum(-1) / 4
        m = (torch.rand(2, 2, 4, generator=gen, dtype=torch.float64) + 0.1).cumsum(-1)
        m = m / m[..., -1:]
        lo, hi = d[..., 0].mean().item(), d[..., -1].mean().item()
        for frac in (0.0, 0.2, 0.5, 0.8, 1.0):
            budget = lo + frac * (hi - lo)
            thr = choose_thresholds(d, m, cands, density_budget=budget)
            got_d, got_m = pick(d, thr, cands).sum().item(), pick(m, thr, cands).sum().item()
            best_m, _ = brute_force(d, m, budget=budget)
            assert got_d <= budget * 4 + 1e-9
            assert got_m <= best_m + 1e-9
            max_step = (m[..., 1:] - m[..., :-1]).max().item()
            assert got_m >= best_m - max_step - 1e-9
        # min_mass on the same tables: matches brute force's least total density
        for target in (0.5, 0.8, 0.95):
            thr = choose_thresholds(d, m, cands, min_mass=target)
            best = brute_force(d, m, min_mass=target)
            if best is not None:
                assert pick(d, thr, cands).sum().item() == pytest.approx(best[1])


def test_choose_bad_input() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        choose_thresholds(HAND_D, HAND_M, HAND_CANDS)
    with pytest.raises(ValueError, match="exactly one"):
        choose_thresholds(HAND_D, HAND_M, HAND_CANDS, min_mass=0.9, density_budget=0.2)
    with pytest.raises(ValueError, match="candidates"):
        choose_thresholds(HAND_D, HAND_M, HAND_CANDS[:3], min_mass=0.9)
    with pytest.raises(ValueError, match=r"\[L, Hq, C\]"):
        choose_thresholds(HAND_D[0], HAND_M[0], HAND_CANDS, min_mass=0.9)
    with pytest.raises(ValueError, match="min_mass"):
        choose_thresholds(HAND_D, HAND_M, HAND_CANDS, min_mass=1.5)
    with pytest.raises(ValueError, match="meta device"):  # used to be Tensor.item()'s RuntimeError
        choose_thresholds(HAND_D.to("meta"), HAND_M.to("meta"), HAND_CANDS, min_mass=0.9)


# ---------------------------------------------------------------------------------------------------------------------
# calibrate() end to end on a tiny random Llama
# ---------------------------------------------------------------------------------------------------------------------


class CharTokenizer:
    """One token per character (ids 2..257), BOS = 1 in front when special tokens are asked for."""

    bos_token_id = 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [2 + (ord(ch) % 254) for ch in text]


def tiny_llama(num_layers: int = 2):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # peakier attention than the 0.02-std init gives, so heads differ
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    return model


def hook_capture_qk(model, input_ids, attention_mask=None, layers=None):
    """Post-RoPE q/k per layer via forward pre-hooks on the attention modules (this test's own capture)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    out, handles = {}, []

    def hook(module, args, kwargs):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        shape = (*h.shape[:-1], -1, module.head_dim)
        q = module.q_proj(h).view(shape).transpose(1, 2)
        k = module.k_proj(h).view(shape).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        out[module.layer_idx] = tuple(t.detach() for t in apply_rotary_pos_emb(q, k, cos, sin))

    for i, layer in enumerate(model.model.layers):
        if layers is None or i in layers:
            handles.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return out


TEXT = " ".join(f"Sentence {i} talks about item {i * 7 % 13} and colour {['red', 'blue', 'green'][i % 3]}." for i in range(40))


def _independent_tables(model, lengths, cands):
    """Per-length fp64 statistics of the text prompts calibrate() builds (BOS + first L-1 characters), averaged."""
    tok = CharTokenizer()
    ds, ms = [], []
    for n in lengths:
        ids = torch.tensor([tok.encode(TEXT[: n - 1])])
        qk = hook_capture_qk(model, ids)
        per = [expected_statistics(*qk[i], cands, stride=4, block_size=32) for i in sorted(qk)]
        ds.append(torch.stack([p[0] for p in per]))
        ms.append(torch.stack([p[1] for p in per]))
    return sum(ds) / len(ds), sum(ms) / len(ms)


def test_calibrate_end_to_end_min_mass() -> None:
    model = tiny_llama()
    cands = [0.5, 0.7, 0.8, 0.9, 0.95, 1.0]
    thr, report = calibrate(
        model, CharTokenizer(), lengths=[96, 160], target="mass=0.9", stride=4, block_size=32, candidates=cands,
        samples=1, text=TEXT, progress=False, capture=hook_capture_qk,
    )  # fmt: skip
    assert thr.shape == (2, 4) and thr.dtype == torch.float64
    d, m = _independent_tables(model, [96, 160], cands)
    chosen_m = pick(m, thr, cands)
    for layer in range(2):
        for h in range(4):
            c = cands.index(thr[layer, h].item())
            if m[layer, h, c] >= 0.9 - 1e-5:  # reached: no smaller tau reaches it (both grow with tau)
                assert all(m[layer, h, j] < 0.9 + 1e-5 for j in range(c)), (layer, h)
            else:  # not reachable: the fallback is the largest candidate
                assert c == len(cands) - 1 and m[layer, h].max() < 0.9 + 1e-5
    assert len(set(thr.flatten().tolist())) > 1, "the heads of this model should not all need the same tau"
    assert report["calibrated"]["density"] == pytest.approx(pick(d, thr, cands).mean().item(), abs=1e-5)
    assert report["calibrated"]["mass"] == pytest.approx(chosen_m.mean().item(), abs=1e-5)
    # the global comparison is the tau whose mean density is closest to the calibrated one
    g = min(range(len(cands)), key=lambda c: abs(d[..., c].mean().item() - report["calibrated"]["density"]))
    assert report["global"]["tau"] == cands[g]
    assert report["global"]["mass"] == pytest.approx(m[..., g].mean().item(), abs=1e-5)
    # the single tau that alone keeps 0.9 in every head
    reach = [c for c in range(len(cands)) if m[..., c].min() >= 0.9 - 1e-5]
    assert report["global_at_target"]["tau"] == cands[min(reach)]
    assert report["global_at_target"]["density"] >= report["calibrated"]["density"] - 1e-9
    assert report["dense_layers"] == [] and report["calibrated_layers"] == [0, 1]
    assert set(report["per_length"]) == {"96", "160"} and len(report["layers"]) == 2
    json.dumps(report)  # the report is what goes into the file's metadata


def test_calibrate_end_to_end_density_budget_haystack() -> None:
    model = tiny_llama()
    cands = [0.5, 0.8, 0.9, 0.95, 1.0]
    thr, report = calibrate(
        model, CharTokenizer(), lengths=[256], target={"density": 0.7}, stride=4, block_size=32, candidates=cands,
        samples=2, tasks="haystack", progress=False, capture=hook_capture_qk,
    )  # fmt: skip
    density = torch.tensor(report["tables"]["density"], dtype=torch.float64)
    assert pick(density, thr, cands).mean().item() <= 0.7 + 1e-4  # tables are rounded to 5 decimals
    assert report["calibrated"]["density"] <= 0.7 + 1e-9


def test_calibrate_layers_without_full_attention_get_one() -> None:
    """Layers capture_qk leaves out (sliding-window layers) are dense: threshold 1.0, listed in the report."""

    def capture(model, ids, attention_mask=None):
        return hook_capture_qk(model, ids, layers={1})

    model = tiny_llama(num_layers=3)
    thr, report = calibrate(
        model, CharTokenizer(), lengths="96", target="mass=0.95", stride=4, block_size=32, candidates=[0.5, 0.9, 1.0],
        samples=1, text=TEXT, progress=False, capture=capture,
    )  # fmt: skip
    assert thr.shape == (3, 4)
    assert torch.all(thr[0] == 1.0) and torch.all(thr[2] == 1.0)
    assert report["dense_layers"] == [0, 2] and report["calibrated_layers"] == [1]


@pytest.mark.skipif(not HAVE_HF, reason="xattention.integrations.hf (capture_qk) is not written yet")
def test_calibrate_with_library_capture_matches_hook_capture() -> None:
    model = tiny_llama()
    kwargs = dict(lengths=[96], target="mass=0.9", stride=4, block_size=32, candidates=[0.5, 0.9, 1.0], samples=1, text=TEXT)
    thr_lib, rep_lib = calibrate(model, CharTokenizer(), progress=False, **kwargs)  # the default: hf.capture_qk
    thr_hook, rep_hook = calibrate(model, CharTokenizer(), progress=False, capture=hook_capture_qk, **kwargs)
    torch.testing.assert_close(thr_lib, thr_hook)
    torch.testing.assert_close(
        torch.tensor(rep_lib["tables"]["mass"]), torch.tensor(rep_hook["tables"]["mass"]), atol=1e-4, rtol=0
    )


def test_calibrate_bad_arguments() -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"mass=0\.9"):
        calibrate(model, CharTokenizer(), lengths=[96], target="0.9", progress=False, capture=hook_capture_qk)
    with pytest.raises(ValueError, match="kind"):
        calibrate(model, CharTokenizer(), lengths=[96], target="recall=0.9", progress=False, capture=hook_capture_qk)
    with pytest.raises(ValueError, match="fewer than"):
        calibrate(
            model, CharTokenizer(), lengths=[4096], target="mass=0.9", text="short text", progress=False,
            capture=hook_capture_qk,
        )  # fmt: skip


@pytest.mark.skipif(not HAVE_TASKS, reason="xattention.evaluation.tasks (the prompt generators) is not written yet")
def test_calibrate_on_evaluation_tasks() -> None:
    model = tiny_llama()
    thr, report = calibrate(
        model, CharTokenizer(), lengths=[600], target="mass=0.9", stride=4, block_size=32, candidates=[0.5, 0.9, 1.0],
        samples=2, tasks="passkey,niah_single_1", progress=False, capture=hook_capture_qk,
    )  # fmt: skip
    used = report["prompts"]["600"]
    assert [p["source"] for p in used] == ["passkey", "niah_single_1"]
    assert all(300 < p["tokens"] <= 600 for p in used), used
    assert thr.shape == (2, 4)


def test_prompts_have_the_requested_length() -> None:
    tok = CharTokenizer()
    for n in (64, 100, 333):
        ids = cal.haystack_prompt(tok, n, seed=3)
        assert len(ids) == n and ids[0] == 1
        assert cal.haystack_prompt(tok, n, seed=3) == ids  # seeded
    assert "pass key" in "".join(chr(i - 2) for i in cal.haystack_prompt(tok, 2000, seed=0)[1:])
    windows = cal.text_prompts(tok, TEXT, 100, 3)
    assert [len(w) for w in windows] == [100, 100, 100] and windows[0] != windows[-1]
    assert cal.parse_lengths("4k,1500, 2.5k") == [1500, 2560, 4096]


# ---------------------------------------------------------------------------------------------------------------------
# the thresholds file
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAVE_THRESHOLDS, reason="xattention.thresholds (save/load_thresholds) is not written yet")
def test_thresholds_file_round_trip_and_shape_mismatch(tmp_path) -> None:
    from xattention.thresholds import load_thresholds, save_thresholds

    model = tiny_llama()
    thr, report = calibrate(
        model, CharTokenizer(), lengths=[96], target="mass=0.9", stride=4, block_size=32, candidates=[0.5, 0.8, 1.0],
        samples=1, text=TEXT, progress=False, capture=hook_capture_qk,
    )  # fmt: skip
    path = tmp_path / "thresholds.json"
    save_thresholds(path, thr, model_name="tiny-llama", metadata=report)
    loaded = load_thresholds(path, num_layers=2, num_heads=4)
    torch.testing.assert_close(loaded.double(), thr)
    data = json.loads(path.read_text())
    assert data["model"] == "tiny-llama" and data["num_layers"] == 2 and data["num_heads"] == 4
    with pytest.raises(ValueError):
        load_thresholds(path, num_layers=3, num_heads=4)
    with pytest.raises(ValueError):
        load_thresholds(path, num_layers=2, num_heads=8)


@pytest.mark.skipif(not (HAVE_THRESHOLDS and HAVE_HF), reason="xattention.thresholds / integrations.hf are not written yet")
def test_applied_thresholds_file_reproduces_calibrated_density(tmp_path) -> None:
    """The file, applied with xattention.apply(..., thresholds=path), gives the first layer (whose input the sparse
    attention cannot change) the density and mass calibration reported for the same prompt."""
    from xattention.integrations.hf import apply, collected_stats, remove
    from xattention.thresholds import save_thresholds

    model = tiny_llama()
    thr, report = calibrate(
        model, CharTokenizer(), lengths=[256], target="mass=0.9", stride=4, block_size=32, candidates=[0.5, 0.8, 0.9, 1.0],
        samples=1, text=TEXT, progress=False, capture=hook_capture_qk,
    )  # fmt: skip
    path = tmp_path / "thr.json"
    save_thresholds(path, thr, model_name="tiny", metadata=report)
    method = XAttention(stride=4, block_size=32, min_seq_len=0)
    apply(model, method, thresholds=path, record_stats=True, record_mass=True)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([CharTokenizer().encode(TEXT[:255])]))
        first = next(s for s in collected_stats(model) if s["layer"] == 0)
    finally:
        remove(model)
    assert first["density"] == pytest.approx(report["layers"][0]["density"], abs=1e-6)
    assert first["mass_kept"] == pytest.approx(report["layers"][0]["mass"], abs=1e-5)


def test_per_head_thresholds_of_another_shape_fail_clearly() -> None:
    """A layer's row of calibrated thresholds used on a model with another head count is a ValueError."""
    thr = torch.full((2, 4), 0.9)
    method = XAttention(threshold=thr[0], stride=4, block_size=16)
    with pytest.raises(ValueError, match="heads"):
        method.estimate(torch.randn(1, 8, 32, 8), torch.randn(1, 8, 32, 8))


def test_cli_writes_a_thresholds_file(tmp_path, monkeypatch) -> None:
    """`xattention calibrate ...` with the model loader (and, until it exists, the file writer) replaced by fakes; q/k
    come from the library's own capture, as on the command line."""
    from xattention import cli

    model = tiny_llama()

    def load_model(name_or_path="smollm2", *, device=None, dtype=None):
        return model, CharTokenizer()

    if HAVE_MODELS:
        import xattention.models

        monkeypatch.setattr(xattention.models, "load_model", load_model)
    else:  # the real module is not written yet: a stand-in that the CLI router can also register
        models = types.ModuleType("xattention.models")
        models.load_model = load_model
        models.add_arguments = lambda parser: None
        models.main = lambda args: 0
        monkeypatch.setitem(sys.modules, "xattention.models", models)
    if not HAVE_THRESHOLDS:
        fake = types.ModuleType("xattention.thresholds")

        def save_thresholds(path, thresholds, *, model_name, metadata=None):
            payload = {"model": model_name, "thresholds": thresholds.tolist(), "metadata": metadata}
            with open(path, "w") as f:
                json.dump(payload, f)

        fake.save_thresholds = save_thresholds
        monkeypatch.setitem(sys.modules, "xattention.thresholds", fake)
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    out = tmp_path / "thr.json"
    rc = cli.main(
        ["calibrate", "--model", "tiny", "--lengths", "96,128", "--target", "density=0.9", "--out", str(out),
         "--stride", "4", "--block-size", "32", "--candidates", "0.5,0.9,1.0", "--samples", "1", "--text", str(text_file),
         "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["model"] == "tiny" and len(data["thresholds"]) == 2 and len(data["thresholds"][0]) == 4
    assert data["metadata"]["target"] == {"density": 0.9} and data["metadata"]["lengths"] == [96, 128]
    assert cli.main(["calibrate", "--target", "mass=2", "--out", str(out)]) == 2  # bad target: one-line error
