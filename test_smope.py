"""Tests of the SMoPE project. CPU only, tiny sizes: `python3 -m pytest -q test_smope.py`."""
import math

import pytest
import torch
import torch.nn.functional as F

from smope import SMoPE

# ----------------------------------------------------------------------------- smope.py

L, H, N, D, E, K = 2, 3, 5, 4, 6, 2


def make_prompt(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(layers=L, heads=H, head_dim=D, experts=E, top_k=K, eps=0.4)
    cfg.update(kw)
    p = SMoPE(**cfg)
    with torch.no_grad():  # centred keys give spread-out scores, so noise and exclusion actually matter
        p.keys.sub_(0.5)
    return p


def qkv(B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g) for _ in range(3)]


def loop_attention(p, i, q, k, v):
    """Eqs. 1-3 one sample, one head, one expert at a time (tokens vectorised)."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(H):
            q_mean = sum(q[b, h, n] for n in range(N)) / N
            s = [float(q_mean @ p.keys[i, h, j]) for j in range(E)]
            if p.dense:
                S = list(range(E))
            else:
                spread = max(s) - min(s)
                if p.training:
                    eps = [p.eps if p.frequent[i, h, j] else 0.0 for j in range(E)]
                else:
                    eps = [2.0 if p.usage[i, h, j] == 0 else 0.0 for j in range(E)]
                noisy = [s[j] - eps[j] * spread for j in range(E)]
                S = sorted(range(E), key=lambda j: -noisy[j])[:K]
            gate = []
            for j in S:
                g = s[j] / math.sqrt(D)
                if p.gate != 'linear':
                    act = {'tanh': math.tanh, 'sigmoid': lambda x: 1 / (1 + math.exp(-x)),
                           'gelu': lambda x: 0.5 * x * (1 + math.erf(x / math.sqrt(2)))}[p.gate]
                    g = g + float(p.alpha[i]) * act(float(p.tau[i]) * g)
                gate.append(g)
            tok = q[b, h] @ k[b, h].T / math.sqrt(D)                          # (N, N)
            logits = torch.cat([torch.tensor(gate).expand(N, len(S)), tok], 1)
            w = logits.softmax(-1)
            vals = torch.cat([p.values[i, h, S], v[b, h]], 0)
            out[b, h] = w @ vals
    return out


def set_state(p):
    """Some experts frequently used (noise applies), some never used (excluded at test time)."""
    g = torch.Generator().manual_seed(3)
    p.frequent.copy_(torch.rand(L, H, E, generator=g) < 0.4)
    p.usage.copy_(torch.randint(0, 3, (L, H, E), generator=g) * (torch.rand(L, H, E, generator=g) < 0.6))


@pytest.mark.parametrize('mode', ['dense', 'train', 'eval'])
@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('gate', ['linear', 'tanh'])
def test_attention_matches_loop(mode, fused, gate):
    p = make_prompt(gate=gate, fused=fused)
    if gate != 'linear':
        with torch.no_grad():
            p.alpha.copy_(torch.tensor([0.7, -1.3]))
            p.tau.copy_(torch.tensor([1.5, 0.4]))
    set_state(p)
    p.dense = mode == 'dense'
    p.train(mode == 'train')
    q, k, v = qkv(6)
    with torch.no_grad():
        for i in range(L):
            assert (p(i, q, k, v) - loop_attention(p, i, q, k, v)).abs().max() <= 1e-6


def test_noise_and_exclusion_change_selection():
    """Guards the loop test against a state in which noise or exclusion never bites."""
    p = make_prompt()
    set_state(p)
    q, k, v = qkv(6)
    with torch.no_grad():
        p.train()
        noisy = p(0, q, k, v)
        p.eps = 0.0
        clean = p(0, q, k, v)
        p.eval()
        p.usage.fill_(1)
        all_used = p(0, q, k, v)
        set_state(p)
        excluded = p(0, q, k, v)
    assert (noisy - clean).abs().max() > 1e-3, "eps changed nothing"
    assert (all_used - clean).abs().max() == 0, "eps=0 training must equal un-excluded eval"
    assert (excluded - all_used).abs().max() > 1e-3, "exclusion changed nothing"


def test_eps_zero_is_no_noise():
    p = make_prompt(eps=0.0)
    p.frequent.fill_(True)
    q, k, v = qkv(4)
    p.train()
    out = p(0, q, k, v)
    p.frequent.fill_(False)
    assert torch.equal(out, p(0, q, k, v))


def test_batch_independence():
    p = make_prompt()
    set_state(p)
    q, k, v = qkv(8)
    for mode in ['dense', 'train', 'eval']:
        p.dense, _ = mode == 'dense', p.train(mode == 'train')
        with torch.no_grad():
            full = p(1, q, k, v)
            for b in [0, 5]:
                one = p(1, q[b:b + 1], k[b:b + 1], v[b:b + 1])
                assert (one[0] - full[b]).abs().max() <= 1e-6


def test_unselected_values_get_zero_gradient():
    p = make_prompt()
    p.train()
    q, k, v = qkv(1)
    out = p(0, q, k, v)
    F.cross_entropy(out.flatten(1), torch.tensor([3])).backward()
    selected = p._route[0][1][0]                    # (H, E)
    grad = p.values.grad[0].abs().sum(-1)           # (H, E)
    assert (grad[~selected] == 0).all() and (grad[selected] > 0).all()
    assert (p.values.grad[1] == 0).all()            # layer 1 was never run


def loop_router_loss(p, route):
    total = 0.0
    for s, selected, spread in route:              # one prompted layer each
        for h in range(H):
            per_sample = []
            for b in range(s.shape[0]):
                m = torch.tensor([0.0 if selected[b, h, j] else p.eps * float(spread[b, h, 0]) for j in range(E)])
                logits = s[b, h] + m
                per_sample.append(sum(F.cross_entropy(logits[None], torch.tensor([j]))
                                      for j in range(E) if selected[b, h, j]))
            total = total + sum(per_sample) / len(per_sample)
    return total


def test_router_loss_matches_loop():
    p = make_prompt()
    set_state(p)
    p.train()
    q, k, v = qkv(5)
    x = q
    for i in range(L):
        x = p(i, x, k, v)
    assert len(p._route) == L
    ours = p.router_loss()
    assert torch.allclose(ours, loop_router_loss(p, p._route), atol=1e-5, rtol=1e-6)
    ours.backward()
    assert p.keys.grad.abs().sum() > 0
    p.dense = True
    assert p.router_loss() == 0
    p.dense = False
    p.eval()
    assert p.router_loss() == 0


def loop_prototype_loss(p):
    total = 0.0
    for l in range(L):
        for h in range(H):
            rows = [j for j in range(E) if p.frequent[l, h, j]]
            if not rows:
                continue
            old, cur = p.keys_old[l, h], p.keys[l, h]
            per_row = []
            for j in rows:
                targets = sorted(range(E), key=lambda e: -float(old[j] @ old[e]))[:K]
                logits = torch.stack([old[j] @ cur[e] for e in range(E)])
                per_row.append(sum(F.cross_entropy(logits[None], torch.tensor([t])) for t in targets))
            total = total + sum(per_row) / len(per_row)
    return total


def test_prototype_loss_matches_loop():
    p = make_prompt()
    assert p.prototype_loss() == 0                 # before any task
    p.begin_task()
    assert p.prototype_loss() == 0                 # task 1: no prototypes
    p.usage.copy_(torch.randint(0, 5, (L, H, E)))
    p.begin_task()                                 # task 2: U from the counts, keys snapshotted
    assert p.frequent.any() and torch.equal(p.keys_old, p.keys.detach())
    with torch.no_grad():
        p.keys.add_(0.3 * torch.randn_like(p.keys))
    ours = p.prototype_loss()
    assert torch.allclose(ours, loop_prototype_loss(p), atol=1e-5, rtol=1e-6)
    ours.backward()
    assert p.keys.grad.abs().sum() > 0 and p.values.grad is None


def test_frequent_set_grows_and_stays():
    p = SMoPE(layers=1, heads=1, head_dim=2, experts=5, top_k=2)
    p.begin_task()
    p.usage.copy_(torch.tensor([[[0, 2, 4, 6, 1]]]))   # mean over used experts = 13/4 = 3.25
    p.begin_task()
    assert p.frequent[0, 0].tolist() == [False, False, True, True, False]
    p.usage.copy_(torch.tensor([[[9, 0, 0, 1, 0]]]))   # mean over used = 5: expert 0 joins, 2 and 3 stay
    p.begin_task()
    assert p.frequent[0, 0].tolist() == [True, False, True, True, False]
    assert p.task == 3


def test_usage_counts_raw_top_k():
    p = make_prompt()
    set_state(p)
    p.eval()
    before = p.usage.clone()
    q, k, v = qkv(7)
    p.counting = True
    with torch.no_grad():
        p(1, q, k, v)
    s = torch.einsum('bhd,hed->bhe', q.mean(2), p.keys[1].detach())
    expected = torch.zeros(H, E, dtype=torch.long)
    for b in range(7):
        for h in range(H):
            for j in s[b, h].topk(K).indices:
                expected[h, j] += 1
    assert torch.equal(p.usage, before) and torch.equal(p.hits[1], expected) and (p.hits[0] == 0).all()
    p.end_usage_pass()
    assert torch.equal(p.usage[1] - before[1], expected) and torch.equal(p.usage[0], before[0])
    assert (p.hits == 0).all() and 'hits' not in p.state_dict()


def test_state_dict_round_trip():
    p = make_prompt(gate='gelu')
    p.begin_task()
    p.usage.copy_(torch.randint(0, 5, (L, H, E)))
    p.begin_task()
    q = make_prompt(seed=9, gate='gelu')
    q.load_state_dict(p.state_dict())
    for name in ['usage', 'frequent', 'keys_old', 'task', 'keys', 'values', 'alpha', 'tau']:
        assert torch.equal(getattr(q, name), getattr(p, name)), name


def test_norga_alpha_zero_is_linear():
    q_, k_, v_ = qkv(4)
    lin = make_prompt()
    for gate in ['tanh', 'sigmoid', 'gelu']:
        p = make_prompt(gate=gate)
        with torch.no_grad():
            p.alpha.zero_()
        p.train()
        lin.train()
        assert torch.equal(p(0, q_, k_, v_), lin(0, q_, k_, v_))
        p.alpha.data.fill_(1.0)
        assert not torch.equal(p(0, q_, k_, v_), lin(0, q_, k_, v_))


def test_paper_sizes_and_bad_arguments():
    p = SMoPE()
    assert p.keys.numel() + p.values.numel() == 230_400
    assert sum(t.numel() for t in p.parameters()) == 230_400
    assert sum(t.numel() for t in SMoPE(gate='tanh').parameters()) == 230_400 + 12
    for kw, msg in [(dict(top_k=26), 'top_k'), (dict(top_k=0), 'top_k'), (dict(gate='relu'), 'gate')]:
        with pytest.raises(ValueError, match=msg):
            SMoPE(**kw)
