"""Tests of the SMoPE project, CPU only, nothing downloaded: `python3 -m pytest -q test_smope.py`.
Sections: smope.py (the prompt, its losses, usage counts, NoRGa); smope.attach on other ViTs; vit.py (parity,
weights, backbones by name, their downloads); data.py (CIFAR-100, ImageNet-R, CUB-200-2011, archives and
downloads, batches and augmentation, unreadable images, a folder of your own); train.py (protocol and metrics,
schedules, run folder and checkpoints, flags, torchrun, GPU-readiness, pictures and outputs); bench.py; docs
(README and SPEC)."""
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.io import write_jpeg, write_png
from torchvision.models.vision_transformer import VisionTransformer
from torchvision.transforms.v2 import functional as TF

import bench
import data
import train
import vit
import smope
from smope import SMoPE, attach
from vit import ViT, load_weights

# torchvision 0.29 deprecates its image decoders, which the ImageNet-R tests use
pytestmark = pytest.mark.filterwarnings('ignore:The image decoding and encoding:DeprecationWarning')


def one_line_error(fn, *args, match=None, exc=ValueError, **kw):
    with pytest.raises(exc, match=match) as e:
        fn(*args, **kw)
    assert '\n' not in str(e.value)
    return str(e.value)


# ------------------------------------------------------------ smope.py

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


def prompt_in_state(heads, head_dim, layers=2, seed=5):
    """A prompt as on task 3: some experts frequent (noise bites in training), some never used (excluded in eval)."""
    torch.manual_seed(seed)
    p = SMoPE(layers, heads, head_dim, experts=6, top_k=2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        p.keys.sub_(0.5)
    p.begin_task()
    p.usage.copy_(torch.randint(0, 4, p.usage.shape, generator=g) * (torch.rand(p.usage.shape, generator=g) < 0.7))
    p.begin_task()
    p.usage.add_(torch.randint(0, 2, p.usage.shape, generator=g) * (p.usage > 0))
    p.begin_task()
    assert p.frequent.any() and (p.usage == 0).any()
    return p


def check_same(a, b, tol=1e-5):
    for u, w in zip(a, b):
        assert (u - w).abs().max() <= tol and w.abs().max() > 0


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


def test_usage_pass_routes_without_exclusion_and_top_k_equal_experts_is_dense():
    p = make_prompt()
    set_state(p)
    p.eval()
    q, k, v = qkv(4)
    with torch.no_grad():
        p.usage_pass = 'no-exclusion'
        counting = p(0, q, k, v)
        p.usage_pass = None
        p.usage.fill_(1)
        assert torch.equal(counting, p(0, q, k, v))
        full = make_prompt(top_k=E)
        full.train()
        full.frequent.fill_(True)
        sparse_path = full(0, q, k, v)
        full.dense = True
        assert torch.equal(sparse_path, full(0, q, k, v)) and full._route == []


@pytest.mark.parametrize('device', ['cpu'] + (['cuda'] if torch.cuda.is_available() else []))
def test_fused_gradients_match_reference(device):
    """Part of the keys' gradient flows only through the merged key's extra dimension in the fused path."""
    grads = []
    for fused in (True, False):
        p = make_prompt(fused=fused).to(device)
        set_state(p)
        p.train()
        q, k, v = (t.to(device).requires_grad_(True) for t in qkv(3))
        out = p(0, q, k, v)
        (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
        grads.append([p.keys.grad, p.values.grad, q.grad, k.grad, v.grad])
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-5 and b.abs().max() > 0


@pytest.mark.parametrize('device', ['cpu'] + (['cuda'] if torch.cuda.is_available() else []))
def test_training_step_uses_fused_attention(device):
    """With SDPA restricted to its fused kernels (CPU: its flash kernel; CUDA: flash and memory-efficient), a
    whole training step runs, prompted layers included, forward and backward; in fp32 it equals the
    materialised reference path to 1e-5."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    fused = [SDPBackend.FLASH_ATTENTION] + ([SDPBackend.EFFICIENT_ATTENTION] if device == 'cuda' else [])
    torch.manual_seed(0)
    vit = ViT(image_size=32, patch_size=8, width=64, depth=3, heads=4, mlp_dim=128).to(device).requires_grad_(False)
    x = torch.randn(4, 3, 32, 32, device=device)
    grads = {}
    for path, precision in [('reference', 'fp32'), ('fused', 'fp32'), ('fused', 'bf16')]:
        prompt = prompt_in_state(4, 16).to(device).train()
        prompt.fused = path == 'fused'
        attach(vit, prompt)
        with (sdpa_kernel(fused) if path == "fused" else contextlib.nullcontext()), \
                torch.autocast(device, dtype=torch.bfloat16, enabled=precision == 'bf16'):
            f = vit(x).float()
        loss = f.square().mean() + 1e-2 * prompt.router_loss() + 1e-2 * prompt.prototype_loss()
        with sdpa_kernel(fused) if path == "fused" else contextlib.nullcontext():
            loss.backward()
        grads[path, precision] = (f.detach(), prompt.keys.grad, prompt.values.grad)
    check_same(grads['fused', 'fp32'], grads['reference', 'fp32'])
    assert all(torch.isfinite(t).all() for t in grads['fused', 'bf16'])


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
    p.usage_pass = 'no-exclusion'
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


def test_prompt_copies_after_a_training_forward():
    prompt, q = prompt_in_state(H, D), qkv(2)
    prompt.train()(0, *q).sum().backward()
    twin = __import__('copy').deepcopy(prompt)
    assert twin._route == [] and torch.equal(twin.keys, prompt.keys) and len(prompt._route) == 1


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


# ------------------------------------------------------------ smope.attach on other ViTs

TV_TINY = dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128)


def tiny_ours(image_size=32):
    return ViT(image_size=image_size, patch_size=8, width=64, depth=2, heads=4, mlp_dim=128)


class FakePrompt(nn.Module):
    def __init__(self, layers, zero=False, heads=4, head_dim=16):
        super().__init__()
        self.layers, self.heads, self.head_dim, self.zero, self.calls = layers, heads, head_dim, zero, []

    def forward(self, i, q, k, v):
        self.calls.append((i, tuple(q.shape)))
        return torch.zeros_like(q) if self.zero else F.scaled_dot_product_attention(q, k, v)


def test_attach_routes_replaces_and_detaches():
    torch.manual_seed(0)
    m = ViT(image_size=32, patch_size=8, width=64, depth=3, heads=4, mlp_dim=128).eval()
    x = torch.randn(2, 3, 32, 32)
    keys = set(m.state_dict())
    with torch.no_grad():
        base, p = m(x), FakePrompt(1)
        assert attach(m, p) is m and m.smope is p
        assert torch.equal(m(x), base) and p.calls == [(0, (2, 4, 17, 16))]  # (B,H,N,d), block 0 only
        p2 = FakePrompt(2, zero=True)
        attach(attach(m, p2), p2)                               # again: replaces, never stacks
        assert not torch.allclose(m(x), base)
        assert [i for i, _ in p2.calls] == [0, 1] and len(p.calls) == 1
        attach(m, None)
        assert torch.equal(m(x), base) and not hasattr(m, 'smope') and len(p2.calls) == 2
    assert set(m.state_dict()) == keys
    attach(m, p)
    buf = __import__('io').BytesIO()
    torch.save(m, buf)  # a whole attached model pickles and comes back attached
    buf.seek(0)
    twin = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(twin(x), base) and len(twin.smope.calls) == 2 and twin.blocks[0].attn.smope_layer[0] is twin.smope


class TimmAttention(nn.Module):
    """timm's Attention, written here so that its layout is tested without timm: qk-norm, attn/proj dropout and
    the optional norm before proj. prompt: the wiring written out, for reference."""
    def __init__(self, dim, heads, qk_norm=True):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = heads, dim // heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.attn_drop, self.proj_drop, self.norm = nn.Dropout(0.0), nn.Dropout(0.0), nn.LayerNorm(dim)

    def forward(self, x, attn_mask=None, prompt=None, i=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = prompt(i, q, k, v) if prompt is not None else F.scaled_dot_product_attention(q, k, v)
        return self.proj_drop(self.proj(self.norm(x.transpose(1, 2).reshape(B, N, C))))


class TimmBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), TimmAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, **prompted):
        x = x + self.attn(self.norm1(x), **prompted)
        return x + self.mlp(self.norm2(x))


def test_attach_errors():
    m, tv = ViT(image_size=32, patch_size=8, width=64, depth=3, heads=4, mlp_dim=128), VisionTransformer(**TV_TINY)
    cases = [(nn.Sequential(nn.Linear(2, 2)), SMoPE(1, 4, 16), 'Sequential has neither blocks'),
             (m, SMoPE(4, 4, 16), 'prompt has 4 layers, ViT 3 blocks'),
             (m, SMoPE(2, 8, 8), r'block 0 attention \(Attention\) has \(heads, head dim, dropout\) \(4, 16, 0.0\)'),
             (VisionTransformer(**TV_TINY, attention_dropout=0.1), SMoPE(2, 4, 16), r'\(4, 16, 0.1\)'),
             (nn.Module(), SMoPE(1, 4, 16), r'block 0 attention \(Linear\) has .* no qkv Linear, num_heads and proj')]
    cases[-1][0].blocks = [nn.Module()]
    cases[-1][0].blocks[0].attn = nn.Linear(2, 2)
    beit = nn.Module()  # BEiT / EVA style: separate q and v biases and a relative position table
    beit.blocks = [nn.Module()]
    beit.blocks[0].attn = TimmAttention(64, 4, qk_norm=False)
    beit.blocks[0].attn.q_bias = nn.Parameter(torch.zeros(64))
    beit.blocks[0].attn.relative_position_bias_table = nn.Parameter(torch.zeros(9, 4))
    scaled = nn.Module()
    scaled.blocks = [nn.Module()]
    scaled.blocks[0].attn = TimmAttention(64, 4)
    scaled.blocks[0].attn.scale = 0.1
    cases += [(beit, SMoPE(1, 4, 16), 'parts attach does not route: q_bias, relative_position_bias_table'),
              (scaled, SMoPE(1, 4, 16), 'a scale other than head_dim'),
              (VisionTransformer(**TV_TINY), SMoPE(1, 4, 16), None), (nn.Module(), SMoPE(1, 4, 16), 'no qkv')]
    cases[-2][0].encoder.layers[0].self_attention = nn.MultiheadAttention(64, 4, add_bias_kv=True, batch_first=True)
    cases[-1][0].blocks = [nn.Module()]  # a block without .attn
    cases[-2] = cases[-2][:2] + ('not plain batch_first self-attn',)
    for model, prompt, msg in cases:
        one_line_error(attach, model, prompt, match=msg)
    attach(tv, SMoPE(2, 4, 16))
    with pytest.raises(ValueError, match='without masks'):
        tv.encoder.layers[0].self_attention(*[torch.randn(1, 5, 64)] * 2, torch.randn(1, 5, 64))


def written_out(vit, prompt, x):
    """Our ViT's forward with the prompt wired in by hand, independently of attach."""
    x = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    x = torch.cat([vit.cls_token.expand(len(x), -1, -1), x], 1) + vit.pos_embed
    for i, blk in enumerate(vit.blocks):
        h = blk.norm1(x)
        q, k, v = blk.attn.qkv(h).view(*h.shape[:2], 3, vit.heads, -1).permute(2, 0, 3, 1, 4)
        o = prompt(i, q, k, v) if i < prompt.layers else F.scaled_dot_product_attention(q, k, v)
        x = x + blk.attn.proj(o.transpose(1, 2).flatten(2))
        x = x + blk.mlp(blk.norm2(x))
    return vit.norm(x[:, 0])


def features_and_grads(model, feats, prompt, x, mode):
    prompt.zero_grad(set_to_none=True)
    prompt.train(mode == 'train')
    f = feats(model, x)
    (f * torch.linspace(-1, 1, f.numel()).view_as(f)).sum().backward()
    return f.detach(), prompt.keys.grad.clone(), prompt.values.grad.clone()


@pytest.mark.parametrize('config', ['tiny', 'b16'])
def test_attach_torchvision_matches_ours(config, tmp_path):
    """torchvision's VisionTransformer + attach == our ViT + the prompt wired by hand, same weights and prompt
    state: features and expert gradients, in evaluation mode (unused experts excluded) and training mode (noise)."""
    torch.manual_seed(0)
    # b16: ViT-B/16's layers and heads at 64 px (16 tokens: the wiring, not the image size, is under test)
    tv = VisionTransformer(**TV_TINY) if config == 'tiny' else torchvision.models.vit_b_16(image_size=64)
    tv.heads = nn.Identity()
    torch.save(tv.state_dict(), tmp_path / 'w.pth')
    try:
        ours = load_weights(tiny_ours() if config == 'tiny' else ViT(image_size=64), tmp_path / 'w.pth')
    finally:
        (tmp_path / 'w.pth').unlink()  # ViT-B/16: 340 MB
    for model in (tv, ours):
        model.eval().requires_grad_(False)
    prompt = prompt_in_state(ours.heads, ours.head_dim)
    S = ours.image_size
    x = torch.randn(2, 3, S, S)
    for mode in ('eval', 'train'):
        ref = features_and_grads(ours, lambda m, x: written_out(m, prompt, x), prompt, x, mode)
        got_tv = features_and_grads(attach(tv, prompt), lambda m, x: m(x), prompt, x, mode)
        got_ours = features_and_grads(attach(ours, prompt), lambda m, x: m(x), prompt, x, mode)
        print(f'{config} {mode}: max diff vs written-out wiring: torchvision '
              f'{max((a - b).abs().max().item() for a, b in zip(got_tv, ref)):.1e}, ours '
              f'{max((a - b).abs().max().item() for a, b in zip(got_ours, ref)):.1e}')
        check_same(got_tv, ref)
        check_same(got_ours, ref)


def test_attach_timm_layout():
    torch.manual_seed(0)
    model = nn.Module()
    model.blocks = nn.Sequential(*[TimmBlock(32, 4) for _ in range(3)]).requires_grad_(False)
    for p in model.blocks.parameters():  # LayerNorms away from their init, so q/k norms are really tested
        p.data.add_(0.1 * torch.randn_like(p))
    prompt = prompt_in_state(4, 8)
    x = torch.randn(3, 10, 32)

    def by_hand(model, x):
        attach(model, None)
        for i, blk in enumerate(model.blocks):
            x = blk(x, prompt=prompt if i < prompt.layers else None, i=i)
        return x
    for mode in ('eval', 'train'):
        ref = features_and_grads(model, by_hand, prompt, x, mode)
        check_same(features_and_grads(attach(model, prompt), lambda m, x: m.blocks(x), prompt, x, mode), ref)
    model.blocks[1].attn.attn_drop.p = 0.1
    one_line_error(attach, model, prompt, match=r'block 1 .*0.1\)')


def test_attach_real_timm(tmp_path):
    timm = pytest.importorskip('timm')
    torch.manual_seed(0)
    tm = timm.create_model('vit_base_patch16_224', pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                           depth=2, num_heads=4, mlp_ratio=2, num_classes=0).eval().requires_grad_(False)
    torch.save(tm.state_dict(), tmp_path / 'timm.pth')
    ours = load_weights(tiny_ours(), tmp_path / 'timm.pth').eval().requires_grad_(False)
    prompt, x = prompt_in_state(4, 16), torch.randn(2, 3, 32, 32)
    for mode in ('eval', 'train'):
        ref = features_and_grads(ours, lambda m, x: written_out(m, prompt, x), prompt, x, mode)
        check_same(features_and_grads(attach(tm, prompt), lambda m, x: m(x), prompt, x, mode), ref)


# ------------------------------------------------------------ vit.py

def tv_features(tv, x):
    tv.heads = nn.Identity()  # leaves the CLS token after encoder.ln
    with torch.no_grad():
        return tv.eval()(x)


def tv_to_timm(sd):
    """Independent rewrite of torchvision ViT keys into timm's names (heads.head -> head, which the loader drops)."""
    block = {'ln_1': 'norm1', 'ln_2': 'norm2', 'self_attention.in_proj_weight': 'attn.qkv.weight',
             'self_attention.in_proj_bias': 'attn.qkv.bias', 'self_attention.out_proj': 'attn.proj',
             'mlp.0': 'mlp.fc1', 'mlp.3': 'mlp.fc2'}
    top = {'conv_proj': 'patch_embed.proj', 'class_token': 'cls_token', 'encoder.pos_embedding': 'pos_embed',
           'encoder.ln': 'norm', 'heads.head': 'head'}
    out = {}
    for k, v in sd.items():
        if k.startswith('encoder.layers.encoder_layer_'):
            i, rest = k[len('encoder.layers.encoder_layer_'):].split('.', 1)
            old = next(o for o in block if rest.startswith(o))
            out[f'blocks.{i}.{block[old]}{rest[len(old):]}'] = v
        else:
            old = next(o for o in top if k.startswith(o))
            out[top[old] + k[len(old):]] = v
    return out


@pytest.fixture(scope='module')
def b16(tmp_path_factory):
    torch.manual_seed(0)
    tv = torchvision.models.vit_b_16()  # random init, nothing downloaded
    path = tmp_path_factory.mktemp('w') / 'tv_b16.pth'
    sd = tv.state_dict()
    torch.save(sd, path)
    yield tv, sd, path
    path.unlink()  # 340 MB: nothing that large is left in pytest's temporary folder


def test_parity_b16(b16):
    tv, _, path = b16
    x = torch.randn(2, 3, 224, 224)
    ours = load_weights(ViT(), path).eval()
    with torch.no_grad():
        diff = (ours(x) - tv_features(tv, x)).abs().max().item()
    print(f'ViT-B/16 max abs diff vs torchvision: {diff:.2e}')
    assert diff <= 1e-5
    assert ours.mean == (0.485, 0.456, 0.406) and ours.std == (0.229, 0.224, 0.225)


def test_parity_tiny(tmp_path):
    torch.manual_seed(0)
    tv = VisionTransformer(**TV_TINY)
    torch.save(tv.state_dict(), tmp_path / 'tiny.pth')
    ours = load_weights(tiny_ours(), tmp_path / 'tiny.pth')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (ours(x) - tv_features(tv, x)).abs().max().item()
    print(f'tiny max abs diff vs torchvision: {diff:.2e}')
    assert diff <= 1e-5


def test_param_count(b16):
    tv, _, _ = b16
    n_tv = sum(p.numel() for p in torchvision.models.vit_b_16().parameters())  # fresh: fixture's heads may be gone
    n = sum(p.numel() for p in vit.vit_b_16().parameters())
    print(f'ViT-B/16 params: {n}')
    assert n == n_tv - (768 * 1000 + 1000)


def test_timm_layout(b16, tmp_path):
    _, sd, path = b16
    torch.save({'state_dict': tv_to_timm(sd)}, tmp_path / 'timm.pth')  # also exercises the 'state_dict' wrapper
    try:
        a, b = load_weights(ViT(), path).eval(), load_weights(ViT(), tmp_path / 'timm.pth').eval()
    finally:
        (tmp_path / 'timm.pth').unlink()  # 340 MB
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (a(x) - b(x)).abs().max().item()
    print(f'timm vs torchvision layout max abs diff: {diff:.2e}')
    assert diff <= 1e-6
    assert b.mean == (0.5, 0.5, 0.5) and b.std == (0.5, 0.5, 0.5)


def test_pos_embed_resize(tmp_path):
    torch.manual_seed(0)
    src = tiny_ours(48)  # 6x6 grid
    torch.save(src.state_dict(), tmp_path / 'g6.pth')
    small = load_weights(tiny_ours(32), tmp_path / 'g6.pth')  # 4x4 grid
    assert small.pos_embed.shape == (1, 17, 64)
    assert torch.equal(small.pos_embed[:, 0], src.pos_embed[:, 0])
    with torch.no_grad():
        assert torch.isfinite(small(torch.randn(2, 3, 32, 32))).all()
    same = load_weights(tiny_ours(48), tmp_path / 'g6.pth')
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in same.state_dict().items())


def check_error(exc, match, model, weights, **kw):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match) as e:
        load_weights(model, weights, **kw)
    assert '\n' not in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded
    return str(e.value)


def test_bad_weights(tmp_path):
    m = tiny_ours()
    check_error(ValueError, 'unknown weights.*IMAGENET1K_V1', m, 'IMAGENET1K_V7')
    check_error(FileNotFoundError, 'not found', m, tmp_path / 'nope.pth')
    (tmp_path / 'junk.pth').write_bytes(b'\x00garbage\xff' * 100)
    check_error(ValueError, 'not a PyTorch checkpoint', m, tmp_path / 'junk.pth')
    torch.save({'foo.weight': torch.zeros(3)}, tmp_path / 'other.pth')
    check_error(ValueError, 'layout not recognised', m, tmp_path / 'other.pth')
    sd = VisionTransformer(**TV_TINY).state_dict()
    del sd['encoder.layers.encoder_layer_1.mlp.3.bias']
    torch.save(sd, tmp_path / 'missing.pth')
    check_error(ValueError, 'missing blocks.1.mlp.fc2.bias', m, tmp_path / 'missing.pth')


def test_vit_large_mismatch(tmp_path):
    # only the keys that carry the shapes; zeros keep it cheap
    sd = {'patch_embed.proj.weight': torch.zeros(1024, 3, 16, 16), 'cls_token': torch.zeros(1, 1, 1024),
          'pos_embed': torch.zeros(1, 197, 1024), **{f'blocks.{i}.norm1.weight': torch.zeros(1024) for i in range(24)}}
    torch.save(sd, tmp_path / 'large.pth')
    msg = check_error(ValueError, r'patch_embed\.proj\.weight \(1024, 3, 16, 16\) vs ours \(768, 3, 16, 16\)', ViT(),
                      tmp_path / 'large.pth')
    assert 'more); build a ViT to match' in msg


def test_non_finite_weights_are_refused(tmp_path):
    torch.manual_seed(0)
    sd = ViT(**train.TINY).state_dict()
    sd['blocks.1.mlp.fc1.weight'][3, 4] = float('nan')
    torch.save(sd, tmp_path / 'nan.pth')
    msg = check_error(ValueError, 'blocks.1.mlp.fc1.weight holds NaN or inf', ViT(**train.TINY), tmp_path / 'nan.pth')
    assert msg.startswith(str(tmp_path / 'nan.pth'))


@pytest.mark.parametrize('name', ['IMAGENET1K_V1', 'IMAGENET1K_SWAG_LINEAR_V1', 'IMAGENET1K_SWAG_E2E_V1'])
def test_enum_names(name):
    enum, mean, std = vit._tv_weights(name)  # reads metadata only, never downloads
    assert isinstance(enum, torchvision.models.ViT_B_16_Weights) and enum.name == name
    assert mean == (0.485, 0.456, 0.406) and std == (0.229, 0.224, 0.225)


def test_released_backbone_urls():
    """The table the downloads use, against SPEC section 7 (a typo here would only show on a user's machine)."""
    hf = 'https://huggingface.co/timm/vit_base_patch16_224.{}/resolve/main/pytorch_model.bin'
    urls = {k: v[0] for k, v in vit.BACKBONES.items()}
    assert urls == {'sup21k': hf.format('augreg_in21k'), 'sup1k': hf.format('augreg2_in21k_ft_in1k'),
                    'dino1k': 'https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth',
                    'ibot1k': 'https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/vitb_16/'
                              'checkpoint_teacher.pth'}
    assert len({v[1] for v in vit.BACKBONES.values()}) == 4  # distinct names in the cache
    assert [vit.BACKBONES[k][2] for k in ('sup21k', 'sup1k', 'dino1k', 'ibot1k')] == [vit.HALF] * 2 + [vit.IMAGENET] * 2


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """torch's hub cache in a temporary folder, and the released backbones served from file:// URLs: the timm files
    as tiny timm-layout state dicts, iBOT's wrapped under 'state_dict' with DDP's module. prefix."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    torch.manual_seed(0)
    sd = tv_to_timm(VisionTransformer(**TV_TINY).state_dict())
    src = tmp_path / 'src'
    src.mkdir()
    files = {'sup1k': sd, 'dino1k': sd, 'ibot1k': {'state_dict': {'module.' + k: v for k, v in sd.items()}}}
    for name, obj in files.items():
        torch.save(obj, src / name)
        url, cache_name, norm = vit.BACKBONES[name]
        monkeypatch.setitem(vit.BACKBONES, name, ((src / name).as_uri(), cache_name, norm))
    return tmp_path / 'torch' / 'hub' / 'checkpoints', src


def test_backbones_by_name(hub):
    cache, src = hub
    ref, sha = load_weights(tiny_ours(), src / 'dino1k'), {}
    for name in ('sup1k', 'dino1k', 'ibot1k'):
        m = load_weights(tiny_ours(), name)
        path = cache / vit.BACKBONES[name][1]
        assert m.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == \
            hashlib.sha256((src / name).read_bytes()).hexdigest()
        assert (m.mean, m.std) == (vit.HALF if name == 'sup1k' else vit.IMAGENET)
        sha[name] = m.weights_sha256
        assert all(torch.equal(v, ref.state_dict()[k]) for k, v in m.state_dict().items())
    assert sorted(p.name for p in cache.iterdir()) == sorted(vit.BACKBONES[n][1] for n in ('sup1k', 'dino1k', 'ibot1k'))
    (src / 'sup1k').unlink()  # downloaded once: the cache serves it from now on, offline too
    assert load_weights(tiny_ours(), 'sup1k', download=False).weights_sha256 == sha['sup1k']


def test_backbone_download_failures(hub):
    cache, src = hub
    m = tiny_ours()
    msg = check_error(FileNotFoundError, 'downloads are off', m, 'sup21k', download=False)  # not cached
    assert str(cache / vit.BACKBONES['sup21k'][1]) in msg and vit.BACKBONES['sup21k'][0] in msg
    (src / 'dino1k').unlink()  # the server has nothing: one line, URL and target, nothing left in the cache
    with pytest.raises(OSError, match='download of .*dino1k to .*dino_vitbase16_pretrain.pth failed') as e:
        load_weights(m, 'dino1k')
    assert '\n' not in str(e.value) and not (cache.exists() and list(cache.iterdir()))


def test_torchvision_cache_is_checked(b16, tmp_path, monkeypatch):
    """torchvision's file names carry a sha256 prefix: a cached file that does not match it is named, not loaded."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    cache = tmp_path / 'hub' / 'checkpoints'
    cache.mkdir(parents=True)
    (cache / os.path.basename(torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1.url)).symlink_to(b16[2])
    check_error(ValueError, 'does not start with the c867db91 of its name', ViT(), 'IMAGENET1K_V1')


# ------------------------------------------------------------ data.py

SHARED = Path(__file__).resolve().parent.parent / 'shared' / 'data'


def test_errors():
    assert 'cifar100' in one_line_error(data.load, 'mnist')
    one_line_error(data.split_tasks, list(range(100)), 7, match='7 tasks')
    one_line_error(data.load, 'imagenet-r', split='half', match='split')


def test_data_dir_that_is_a_file(tmp_path):
    (tmp_path / 'f').write_text('precious')
    for name in ('cifar100', 'imagenet-r', 'cub200'):
        msg = one_line_error(data.load, name, data_dir=tmp_path / 'f')
        assert msg == f'--data-dir {tmp_path / "f"} is not a folder'
    assert (tmp_path / 'f').read_text() == 'precious' and sorted(p.name for p in tmp_path.iterdir()) == ['f']


# -----------------------------------------------------------------------------
# CIFAR-100

@pytest.fixture
def cifar_dir(tmp_path, monkeypatch):
    """cifar-100-python/{train,test,meta} pickles, 3 train and 1 test image per class."""
    d = tmp_path / 'cifar-100-python'
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    for name, per_class in (('train', 3), ('test', 1)):
        labels = list(range(100)) * per_class
        # the real files are Python 2 pickles whose str keys load as str under encoding='latin1'
        entry = {'data': torch.randint(0, 256, (len(labels), 3072), generator=g, dtype=torch.uint8).numpy(),
                 'fine_labels': labels, 'coarse_labels': [y // 5 for y in labels],
                 'filenames': [f'{i}.png' for i in range(len(labels))], 'batch_label': name}
        pickle.dump(entry, open(d / name, 'wb'))
    pickle.dump({'fine_label_names': [f'c{i}' for i in range(100)], 'coarse_label_names': [f's{i}' for i in range(20)]},
                open(d / 'meta', 'wb'))
    # torchvision checks each file's md5 against the real release, which fake files cannot match:
    # keep its existence check, skip the md5
    monkeypatch.setattr(torchvision.datasets.cifar, 'check_integrity', lambda fpath, md5=None: os.path.isfile(fpath))
    return tmp_path


def test_cifar100_tasks(cifar_dir):
    train, test = data.load('cifar100', data_dir=cifar_dir)
    assert train.images.shape == (300, 3, 32, 32) and test.images.shape == (100, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.files is None and train.num_classes == 100
    raw = pickle.load(open(cifar_dir / 'cifar-100-python' / 'train', 'rb'))['data']
    assert torch.equal(train.images[5].reshape(-1), torch.from_numpy(raw[5]))  # CHW layout kept
    for seed in (0, 1):
        expected = list(range(100))
        random.seed(seed)
        random.shuffle(expected)
        order = data.class_order(100, seed)
        assert order == expected
        tasks = data.split_tasks(order, 10)
        assert [len(t) for t in tasks] == [10] * 10 and sum(tasks, []) == order
        y = data.remap(train.labels, order)
        for t, classes in enumerate(tasks):
            mine = torch.isin(train.labels, torch.tensor(classes))
            assert mine.sum() == 30 and ((y[mine] >= 10 * t) & (y[mine] < 10 * t + 10)).all()
        assert [order[int(v)] for v in y[:20]] == train.labels[:20].tolist()
    assert data.class_order(100, 0) != data.class_order(100, 1)


def test_class_order_leaves_the_global_random_alone():
    random.seed(1234)
    state = random.getstate()
    for seed in (0, 1, 1993):
        expected, saved = list(range(100)), random.getstate()
        random.seed(seed)
        random.shuffle(expected)  # the released code's order, from the global RNG
        random.setstate(saved)
        assert data.class_order(100, seed) == expected and random.getstate() == state


def test_cifar100_missing(tmp_path):
    msg = one_line_error(data.load, 'cifar100', data_dir=tmp_path, download=False)
    assert str(tmp_path / 'cifar-100-python') in msg and 'train, test and meta' in msg and '--no-download' in msg
    assert not list(tmp_path.iterdir())


# -----------------------------------------------------------------------------
# ImageNet-R

WNIDS = {'n01': 2, 'n02': 0, 'n03': 1}  # the list's own labels, deliberately not the sorted-wnid order


def write_list(path, files, labels):
    path.write_text('data:\n' + ''.join(f'- {f}\n' for f in files) + 'targets:\n' + ''.join(f'- {y}\n' for y in labels))


@pytest.fixture
def imr_dir(tmp_path):
    """data/imagenet-r/<wnid>/*.jpg of assorted sizes, plus split lists: 4 train and 1 test image per class."""
    g = torch.Generator().manual_seed(0)
    lists = {'train': ([], []), 'test': ([], [])}
    for wnid, y in WNIDS.items():
        (tmp_path / 'imagenet-r' / wnid).mkdir(parents=True)
        for k in range(5):
            h, w = [(40, 30), (30, 50), (36, 36), (20, 64), (64, 24)][k]
            img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
            write_jpeg(img, str(tmp_path / 'imagenet-r' / wnid / f'art_{k}.jpg'))
            part = lists['test' if k == 4 else 'train']
            part[0].append(f'data/imagenet-r/{wnid}/art_{k}.jpg')
            part[1].append(y)
    for part, (files, labels) in lists.items():
        write_list(tmp_path / f'imagenet-r_{part}.yaml', files, labels)
    return tmp_path


def test_imagenet_r_fixed(imr_dir):
    train, test = data.load('imagenet-r', data_dir=imr_dir)
    assert len(train) == 12 and len(test) == 3 and train.num_classes == 3 and train.images is None
    for ds in (train, test):
        for f, y in zip(ds.files, ds.labels.tolist()):
            assert os.path.isabs(f) and os.path.isfile(f) and WNIDS[Path(f).parent.name] == y
    assert {Path(f).name for f in test.files} == {'art_4.jpg'}


def test_imagenet_r_random(imr_dir):
    train, test = data.load('imagenet-r', data_dir=imr_dir, split='random', seed=0)
    assert len(train) == 12 and len(test) == 3
    assert sorted(test.labels.tolist()) == [0, 1, 2] and sorted(set(train.labels.tolist())) == [0, 1, 2]
    for ds in (train, test):
        for f, y in zip(ds.files, ds.labels.tolist()):
            assert sorted(WNIDS).index(Path(f).parent.name) == y
    assert not set(train.files) & set(test.files)
    assert data.load('imagenet-r', data_dir=imr_dir, split='random', seed=0)[1].files == test.files
    assert data.load('imagenet-r', data_dir=imr_dir, split='random', seed=1)[1].files != test.files


def test_imagenet_r_errors(imr_dir, tmp_path_factory):
    gone = imr_dir / 'imagenet-r' / 'n02' / 'art_1.jpg'
    gone.unlink()
    msg = one_line_error(data.load, 'imagenet-r', data_dir=imr_dir)
    assert msg.startswith('1 files') and str(gone) in msg
    (imr_dir / 'imagenet-r_train.yaml').unlink()
    msg = one_line_error(data.load, 'imagenet-r', data_dir=imr_dir, download=False)
    assert '--no-download' in msg and data.SPLIT_URL.format('train') in msg and 'imagenet-r_train.yaml' in msg
    msg = one_line_error(data.load, 'imagenet-r', data_dir=tmp_path_factory.mktemp('empty'), download=False)
    assert '--no-download' in msg and data.IMR_URL in msg and '<wnid>/<image>.jpg' in msg


def test_imagenet_r_batches(imr_dir):
    train, test = data.load('imagenet-r', data_dir=imr_dir)
    idx = torch.arange(len(train))

    def run(ds, train_mode, workers, resize='imagenet', world=1, rank=0):
        g = torch.Generator().manual_seed(3)
        return list(data.batches(ds, torch.arange(len(ds)), 5, train_mode, g, 'cpu', image_size=32,
                                 resize=resize, workers=workers, world=world, rank=rank))
    a, b = run(train, True, 0), run(train, True, 2)
    assert [x.shape for x, _ in a] == [(5, 3, 32, 32), (5, 3, 32, 32), (2, 3, 32, 32)]
    assert sorted(torch.cat([i for _, i in a]).tolist()) == idx.tolist()
    for (xa, ia), (xb, ib) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ia, ib) and xa.min() >= 0 and xa.max() <= 1
    halves = [run(train, True, 0, world=2, rank=r) for r in (0, 1)]
    for (x, i), (x0, i0), (x1, i1) in zip(a, *halves):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([i0, i1]), i)
    for resize in ('imagenet', 'cifar'):
        (x, i), = run(test, False, 0, resize)
        assert x.shape == (3, 3, 32, 32) and i.tolist() == [0, 1, 2]
        img = torchvision.io.decode_image(test.files[0], mode=torchvision.io.ImageReadMode.RGB)
        ref = TF.resize(img, [37] if resize == 'imagenet' else [32, 32])  # 37 = round(32*256/224)
        assert torch.equal(x[0], TF.center_crop(ref, [32, 32]).float() / 255)
    # test images are decoded once per run: with the files gone, a second pass still gives the same batches
    first = run(test, False, 2)
    assert len(test._cache[(32, 'imagenet')]) == len(test)
    for f in test.files:
        os.rename(f, f + '.gone')
    try:
        assert all(torch.equal(x, y) for (x, _), (y, _) in zip(first, run(test, False, 2)))
    finally:
        for f in test.files:
            os.rename(f + '.gone', f)


@pytest.mark.skipif(not (SHARED / 'imagenet-r_train.yaml').exists(), reason='no shared/data split lists')
def test_real_split_lists():
    files = {}
    for part, n in (('train', 24000), ('test', 6000)):
        path = SHARED / f'imagenet-r_{part}.yaml'
        assert vit.checksum(path) == data.SPLIT_SHA256[part]
        files[part], labels = data.read_split(path)
        assert len(files[part]) == len(labels) == n and len(set(files[part])) == n
        assert sorted(set(labels)) == list(range(200))
        assert all(f.startswith('data/imagenet-r/n') and f.endswith('.jpg') for f in files[part])
    assert not set(files['train']) & set(files['test'])


# -----------------------------------------------------------------------------
# CUB-200-2011

@pytest.fixture
def cub_dir(tmp_path):
    """CUB_200_2011/ in the real layout, 20 classes of 3 images (2 train, 1 test): images.txt, image_class_labels.txt,
    train_test_split.txt (image ids in a shuffled order) and images/<class>/<file>.jpg of assorted sizes."""
    root, g = tmp_path / 'CUB_200_2011', torch.Generator().manual_seed(0)
    items = [(c, k) for c in range(20) for k in range(3)]
    random.Random(0).shuffle(items)
    lines = {name: [] for name in data.CUB_FILES}
    for i, (c, k) in enumerate(items, 1):
        rel = f'{c + 1:03d}.Bird_{c}/Bird_{c}_{k}.jpg'
        (root / 'images' / rel).parent.mkdir(parents=True, exist_ok=True)
        h, w = [(40, 30), (30, 50), (36, 36)][k]
        write_jpeg(torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8), str(root / 'images' / rel))
        for name, value in zip(data.CUB_FILES, (rel, c + 1, int(k < 2))):
            lines[name].append(f'{i} {value}')
    for name, rows in lines.items():
        (root / name).write_text('\n'.join(rows) + '\n')
    (tmp_path / 'attributes.txt').write_text('1 has_bill_shape::dagger\n')  # beside the folder, as in the archive
    return tmp_path


def test_cub200_split(cub_dir):
    train, test = data.load('cub200', data_dir=cub_dir)
    assert (len(train), len(test), train.num_classes) == (40, 20, 20) and train.images is None
    assert torch.equal(train.labels.bincount(), torch.full((20,), 2)) and sorted(test.labels.tolist()) == list(range(20))
    for ds, ks in ((train, {'0', '1'}), (test, {'2'})):
        for f, y in zip(ds.files, ds.labels.tolist()):
            assert os.path.isfile(f) and Path(f).parent.name == f'{y + 1:03d}.Bird_{y}' and Path(f).stem[-1] in ks
    root = cub_dir / 'CUB_200_2011'  # the labels come from image_class_labels.txt, not from the folder names
    lines = (root / 'image_class_labels.txt').read_text().splitlines()
    (root / 'image_class_labels.txt').write_text(''.join(f'{i} {21 - int(c)}\n' for i, c in map(str.split, lines)))
    swapped, _ = data.load('cub200', data_dir=cub_dir)
    assert swapped.files == train.files and torch.equal(swapped.labels, 19 - train.labels)
    x, i = next(data.batches(test, torch.arange(3), 3, False, None, 'cpu', image_size=32, resize='imagenet', workers=0))
    ref = TF.center_crop(TF.resize(torchvision.io.decode_image(test.files[0]), [37]), [32, 32])  # Resize(256)+Crop(224)
    assert torch.equal(x[0], ref.float() / 255)


def test_cub200_bad_layouts(cub_dir, tmp_path_factory):
    root = cub_dir / 'CUB_200_2011'
    msg = one_line_error(data.load, 'cub200', data_dir=tmp_path_factory.mktemp('none'), download=False)
    assert 'CUB_200_2011/ holding images.txt, image_class_labels.txt, train_test_split.txt' in msg and data.CUB_URL in msg
    good = {n: (root / n).read_text() for n in data.CUB_FILES}
    for name, text, match in [('image_class_labels.txt', good['image_class_labels.txt'].split('\n', 1)[1],
                               'do not list the same image ids'),
                              ('image_class_labels.txt', good['image_class_labels.txt'].replace(' 7\n', ' seven\n'),
                               'class ids must be whole numbers'),
                              ('train_test_split.txt', good['train_test_split.txt'].replace(' 1\n', ' 2\n', 1),
                               'flags 0 or 1'),
                              ('images.txt', '', 'images.txt: missing, empty'),
                              ('images.txt', good['images.txt'].replace(' ', '\t', 1).replace('\n', ' x\n', 1),
                               r'not "<image id> <value>"')]:
        (root / name).write_text(text)
        one_line_error(data.load, 'cub200', data_dir=cub_dir, match=match)
        (root / name).write_text(good[name])
    gone = next((root / 'images').rglob('*.jpg'))
    gone.unlink()
    assert str(gone) in one_line_error(data.load, 'cub200', data_dir=cub_dir, match='1 files listed')


# -----------------------------------------------------------------------------
# archives, downloads and shared data folders

def archive(src_dir, names, path, mode='w:gz'):
    """A tar archive of src_dir/names as the real downloads are built, and its file:// URL and md5."""
    with tarfile.open(path, mode) as tar:
        for n in names:
            tar.add(src_dir / n, arcname=n)
    return path.as_uri(), hashlib.md5(path.read_bytes()).hexdigest()


def test_cifar100_download(cifar_dir, tmp_path_factory, monkeypatch):
    """The real download path (torch.hub's downloader, torchvision's URL, md5 and layout) on a file:// URL."""
    url, md5 = archive(cifar_dir, ['cifar-100-python'], tmp_path_factory.mktemp('src') / 'c.tar.gz')
    C = torchvision.datasets.CIFAR100
    monkeypatch.setattr(C, 'url', url)
    monkeypatch.setattr(C, 'tgz_md5', md5)
    dest = tmp_path_factory.mktemp('dest')
    train, test = data.load('cifar100', data_dir=dest)
    assert len(train) == 300 and len(test) == 100
    assert sorted(p.name for p in dest.iterdir()) == ['cifar-100-python', 'cifar-100-python.tar.gz']
    # failures: one line naming the URL and the target; nothing left under the real name, no .part
    for bad_url, bad_md5, why in [(url + '.gone', md5, 'No such file'), (url, '0' * 32, 'md5')]:
        monkeypatch.setattr(C, 'url', bad_url)
        monkeypatch.setattr(C, 'tgz_md5', bad_md5)
        empty = tmp_path_factory.mktemp('fail')
        msg = one_line_error(data.load, 'cifar100', data_dir=empty, exc=OSError)
        assert msg.startswith(f'download of {bad_url} to {empty / C.filename} failed') and why in msg
        assert not list(empty.iterdir())
    (empty / C.filename).write_bytes(b'not a tar archive')  # an archive that does not unpack: said, kept, no folder
    assert 'delete it to download it again' in one_line_error(data.load, 'cifar100', data_dir=empty)
    assert [p.name for p in empty.iterdir()] == [C.filename]


def test_cub200_download(cub_dir, tmp_path_factory, monkeypatch):
    url, md5 = archive(cub_dir, ['attributes.txt', 'CUB_200_2011'], tmp_path_factory.mktemp('src') / 'CUB.tgz')
    monkeypatch.setattr(data, 'CUB_URL', url)  # its archive name comes from us, not from the URL
    monkeypatch.setattr(data, 'CUB_MD5', md5)
    dest = tmp_path_factory.mktemp('dest')
    train, _ = data.load('cub200', data_dir=dest)
    assert len(train) == 40 and sorted(p.name for p in dest.iterdir()) == ['CUB_200_2011', 'CUB_200_2011.tgz']


def test_verify_and_fetch(tmp_path):
    """An archive put beside the data set by hand is checked like a download and, when wrong, named and kept."""
    f = tmp_path / 'imagenet-r.tar'
    f.write_text('precious')
    msg = one_line_error(data.fetch_archive, tmp_path / 'imagenet-r', f.name, 'https://x.invalid/a.tar',
                         '0' * 32, True, 'missing')
    assert str(f) in msg and '0' * 32 in msg and hashlib.md5(b'precious').hexdigest() in msg
    assert f.read_text() == 'precious' and sorted(os.listdir(tmp_path)) == ['imagenet-r.tar']
    f = tmp_path / 'imagenet-r_train.yaml'
    f.write_text('precious')
    # a download lands under a temporary name and replaces the target only once verified; a failed one leaves
    # nothing, and a leftover .part from a killed run is no obstacle
    target = tmp_path / 'imagenet-r_test.yaml'
    msg = one_line_error(vit.fetch, f.as_uri(), target, expected='0' * 64, exc=OSError)
    assert msg.startswith(f'download of {f.as_uri()} to {target} failed') and 'sha256' in msg
    assert not target.exists() and not (tmp_path / 'imagenet-r_test.yaml.part').exists()
    (tmp_path / 'imagenet-r_test.yaml.part').write_text('half')
    vit.fetch(f.as_uri(), target, expected=hashlib.sha256(b'precious').hexdigest())
    assert target.read_text() == 'precious' and not (tmp_path / 'imagenet-r_test.yaml.part').exists()


def bad_tar(path, members):
    """A tar archive (compression from the name) of (name, kind, payload) members, built by hand so that names
    stay exactly as given (tarfile.add would strip a leading '/')."""
    mode = 'w:gz' if path.name.endswith(('.gz', '.tgz')) else 'w'
    import io
    with tarfile.open(path, mode) as tar:
        for name, kind, payload in members:
            ti = tarfile.TarInfo(name)
            if kind == 'dir':
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            elif kind == 'sym':
                ti.type, ti.linkname = tarfile.SYMTYPE, payload
            else:
                ti.size = len(payload)
            tar.addfile(ti, io.BytesIO(payload) if kind == 'file' else None)
    return path.as_uri(), hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize('dataset', ['cifar100', 'imagenet-r', 'cub200'])
@pytest.mark.parametrize('case', ['dotdot', 'absolute', 'symlink'])
def test_archive_members_outside_are_refused(dataset, case, tmp_path, monkeypatch):
    """Each download's archive (.tar.gz, .tar, .tgz) served through the real fetch_archive: a member that would
    land outside the data folder refuses the whole archive in one line; nothing appears outside, no folder."""
    top = tmp_path / 'top'  # everything outside the data folder that an attack could reach
    (top / 'outside').mkdir(parents=True)
    dest, src = top / 'data', tmp_path / 'src'
    src.mkdir()
    folder, name = {'cifar100': ('cifar-100-python', 'cifar.tar.gz'), 'imagenet-r': ('imagenet-r', 'imr.tar'),
                    'cub200': ('CUB_200_2011', 'cub.tgz')}[dataset]
    evil = {'dotdot': [(f'{folder}/../../../escaped', 'file', b'x')],
            'absolute': [(str(top / 'outside' / 'escaped'), 'file', b'x')],
            'symlink': [(f'{folder}/lnk', 'sym', str(top / 'outside')), (f'{folder}/lnk/escaped', 'file', b'x')]}[case]
    url, md5 = bad_tar(src / name, [(folder, 'dir', None), (f'{folder}/ok.txt', 'file', b'fine')] + evil)
    if dataset == 'cifar100':
        monkeypatch.setattr(torchvision.datasets.CIFAR100, 'url', url)
        monkeypatch.setattr(torchvision.datasets.CIFAR100, 'tgz_md5', md5)
    else:
        monkeypatch.setattr(data, 'IMR_URL' if dataset == 'imagenet-r' else 'CUB_URL', url)
        monkeypatch.setattr(data, 'IMR_MD5' if dataset == 'imagenet-r' else 'CUB_MD5', md5)
    if dataset == 'cifar100':  # a Python without tarfile's 'data' filter (before 3.11.4): our own check alone
        monkeypatch.delattr(tarfile, 'data_filter', raising=False)
    with pytest.raises(Exception) as e:
        data.load(dataset, data_dir=dest)
    assert sorted(p.name for p in top.iterdir()) == ['data', 'outside'] and not list((top / 'outside').iterdir())
    archive_name = {'cifar100': 'cifar-100-python.tar.gz', 'imagenet-r': 'imagenet-r.tar',
                    'cub200': 'CUB_200_2011.tgz'}[dataset]
    assert [p.name for p in dest.iterdir()] == [archive_name]  # kept; no folder, no hidden folder, no lock
    msg = str(e.value)
    assert e.type is ValueError and '\n' not in msg and msg.startswith(f'{dest / archive_name} did not unpack')
    assert evil[0][0] in msg and 'refused' in msg


RACE = r'''
import os, sys, time, torch, torchvision, vit, data
dest, url, md5, log, me, hub_url = sys.argv[1:]
torchvision.datasets.CIFAR100.url, torchvision.datasets.CIFAR100.tgz_md5 = url, md5
torchvision.datasets.cifar.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)
real = torch.hub.download_url_to_file
def slow(url, dst, **kw):  # a slow network: the other run arrives while this one downloads
    open(log, 'a').write(url + '\n')
    time.sleep(1.5)
    real(url, dst, **kw)
torch.hub.download_url_to_file = slow
def together(step):  # both runs start each step at once (or give up if the other failed)
    open(f'{log}.{step}{me}', 'w').close()
    for _ in range(6000):
        if all(os.path.exists(f'{log}.{step}{k}') for k in '01'):
            return
        time.sleep(0.01)
    sys.exit(f'the other run never reached {step}')
together('data')
train, test = data.load('cifar100', data_dir=dest)
together('hub')
path = vit.cached(hub_url, 'w.pth', True)
print(len(train), len(test), torch.load(path)['w'].tolist())
'''


def test_two_runs_share_a_fresh_data_dir(cifar_dir, tmp_path):
    """Two runs on one fresh --data-dir and one fresh hub cache at once: one downloads and unpacks each file while
    the other waits its turn and then uses it; both succeed, nothing is left beside the results."""
    url, md5 = archive(cifar_dir, ['cifar-100-python'], tmp_path / 'c.tar.gz')
    torch.save({'w': torch.arange(3)}, tmp_path / 'w.pth')
    dest, log, env = tmp_path / 'fresh', tmp_path / 'log', dict(os.environ, TORCH_HOME=str(tmp_path / 'torch'))
    procs = [subprocess.Popen([sys.executable, '-c', RACE, str(dest), url, md5, str(log), me,
                               (tmp_path / 'w.pth').as_uri()], cwd=Path(__file__).parent, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for me in '01']
    try:
        results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(rc == 0 and out.splitlines()[-1] == '300 100 [0, 1, 2]' for out, err, rc in results), results
    waited = sorted(line.split()[-1] for out, _, _ in results for line in out.splitlines()[:-1])
    assert waited == sorted([str(dest / 'cifar-100-python'), str(tmp_path / 'torch' / 'hub' / 'checkpoints' / 'w.pth')])
    assert sorted(log.read_text().split()) == sorted([url, (tmp_path / 'w.pth').as_uri()])  # each fetched once
    assert sorted(p.name for p in dest.iterdir()) == ['cifar-100-python', 'cifar-100-python.tar.gz']
    assert sorted(p.name for p in (dest / 'cifar-100-python').iterdir()) == ['meta', 'test', 'train']
    assert [p.name for p in (tmp_path / 'torch' / 'hub' / 'checkpoints').iterdir()] == ['w.pth']


def test_stale_partials_are_removed(cifar_dir, hub, tmp_path, monkeypatch):
    """What killed downloads leave beside a target (our .part, torch.hub's .part.<id>.partial) goes with the next
    download of that target, in the data folder and in the hub cache."""
    url, md5 = archive(cifar_dir, ['cifar-100-python'], tmp_path / 'c.tar.gz')
    monkeypatch.setattr(torchvision.datasets.CIFAR100, 'url', url)
    monkeypatch.setattr(torchvision.datasets.CIFAR100, 'tgz_md5', md5)
    cache, _ = hub
    dest = tmp_path / 'd'
    stale = [dest / 'cifar-100-python.tar.gz.part', dest / 'cifar-100-python.tar.gz.part.0123abcd.partial',
             cache / (vit.BACKBONES['dino1k'][1] + '.part.4567ef.partial')]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b'half' * 1000)
    data.load('cifar100', data_dir=dest)
    load_weights(tiny_ours(), 'dino1k')
    assert not any(p.exists() for p in stale)
    assert sorted(p.name for p in dest.iterdir()) == ['cifar-100-python', 'cifar-100-python.tar.gz']
    assert [p.name for p in cache.iterdir()] == [vit.BACKBONES['dino1k'][1]]


# -----------------------------------------------------------------------------
# batches and augmentation

def test_crop_boxes():
    g = torch.Generator().manual_seed(0)
    top, left, h, w = data.crop_boxes(20000, 1000, 1000, g).T.double()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 1000).all() and (left + w <= 1000).all()
    area, ratio = h * w / 1e6, w / h
    assert area.min() > 0.08 - 2e-3 and area.max() <= 1 and ratio.min() > 3 / 4 - 5e-3 and ratio.max() < 4 / 3 + 5e-3
    # same distribution as torchvision's own sampler (which draws from the global RNG, hence fork_rng)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tv = torch.tensor([torchvision.transforms.RandomResizedCrop.get_params(torch.empty(1, 1000, 1000),
                                                                               [0.08, 1], [3 / 4, 4 / 3])
                           for _ in range(5000)]).double()
    assert abs(area.mean() - (tv[:, 2] * tv[:, 3] / 1e6).mean()) < 0.015
    assert abs(ratio.log().mean() - (tv[:, 3] / tv[:, 2]).log().mean()) < 0.015
    assert abs(top.mean() - tv[:, 0].mean()) < 15
    # no try can fit a 10x1000 strip: torchvision falls back to a central crop with the ratio clamped to 4/3
    assert data.crop_boxes(50, 10, 1000, g).unique(dim=0).tolist() == [[0, 493, 10, 13]]
    top, left, h, w = data.crop_boxes(5000, 32, 32, g).T
    assert (top + h <= 32).all() and (left + w <= 32).all() and (h >= 1).all() and (w >= 1).all()


def test_augment_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 40), generator=g, dtype=torch.uint8)
    boxes, flips = data.crop_boxes(64, 32, 40, g), torch.rand(64, generator=g) < 0.5
    out = data.augment(x, boxes, flips, 56)
    assert out.shape == (64, 3, 56, 56) and out.dtype == torch.float32
    for k in range(64):
        ref = TF.resized_crop(x[k].float(), *boxes[k].tolist(), [56, 56], antialias=False) / 255
        ref = TF.horizontal_flip(ref) if flips[k] else ref
        torch.testing.assert_close(out[k], ref, atol=1e-5, rtol=0)


@pytest.fixture
def synth():
    return data.synthetic(num_classes=10, train_per_class=13, test_per_class=3, size=32, seed=0)


def test_synthetic(synth):
    train, test = synth
    assert train.images.shape == (130, 3, 32, 32) and test.images.shape == (30, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.num_classes == 10
    assert torch.equal(train.labels.bincount(), torch.full((10,), 13)) and set(test.labels.tolist()) == set(range(10))
    again = data.synthetic(num_classes=10, train_per_class=13, test_per_class=3, seed=0)[0]
    assert torch.equal(again.images, train.images)
    assert not torch.equal(data.synthetic(num_classes=10, train_per_class=13, test_per_class=3, seed=1)[0].images,
                           train.images)
    tr, te = data.load('synthetic', seed=0)
    assert len(tr) == 2000 and len(te) == 500 and tr.num_classes == 50


def test_batches_tensor(synth):
    train, test = synth
    idx = torch.arange(7, 130)  # a subset, so positions must be dataset indices

    def run(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return list(data.batches(train, idx, 50, True, g, 'cpu', image_size=64, **kw))
    a = run(0)
    assert [x.shape for x, _ in a] == [(50, 3, 64, 64), (50, 3, 64, 64), (23, 3, 64, 64)]
    assert torch.equal(torch.cat([i for _, i in a]).sort().values, idx)
    assert all(x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1 for x, _ in a)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, run(0)))
    assert not torch.equal(a[0][0], run(1)[0][0])
    halves = [run(0, world=2, rank=r) for r in (0, 1)]
    for (x, i), (x0, i0), (x1, i1) in zip(a, *halves):
        assert len(x0) == len(x1) + (len(x) % 2) and torch.equal(torch.cat([x0, x1]), x)
        assert torch.equal(torch.cat([i0, i1]), i)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    for (x, _), (y, _) in zip(a, run(0, mean=mean, std=std)):
        torch.testing.assert_close(y, (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])


def test_batches_eval(synth):
    _, test = synth
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    (x, i), = data.batches(test, torch.arange(30), 64, False, g, 'cpu', image_size=224)
    assert torch.equal(i, torch.arange(30)) and torch.equal(g.get_state(), state)  # no shuffle, no draws
    ref = F.interpolate(test.images.float(), size=224, mode='bilinear', align_corners=False) / 255
    torch.testing.assert_close(x, ref, atol=1.01 / 255, rtol=0)  # the uint8 resize rounds to whole levels
    (x, _), = data.batches(test, torch.arange(30), 64, False, None, 'cpu', image_size=224, resize='imagenet')
    ref = F.interpolate(test.images.float(), size=256, mode='bilinear', align_corners=False)[..., 16:240, 16:240] / 255
    torch.testing.assert_close(x, ref, atol=1.01 / 255, rtol=0)


# -----------------------------------------------------------------------------
# unreadable images

@pytest.mark.parametrize('workers', [0, 1])
def test_unreadable_image_is_one_line(imr_dir, workers):
    """A truncated, empty or garbled JPEG, in training or test images: one line naming the file, from a worker too."""
    train_set, test_set = data.load('imagenet-r', data_dir=imr_dir)
    for ds, train_mode, content in ((train_set, True, lambda b: b[:len(b) // 2]), (test_set, False, lambda b: b''),
                                    (train_set, True, lambda b: b'not an image' * 9)):
        bad = Path(ds.files[1])
        good = bad.read_bytes()
        bad.write_bytes(content(good))
        g = torch.Generator().manual_seed(0)
        msg = one_line_error(lambda: list(data.batches(ds, torch.arange(len(ds)), 2, train_mode, g, 'cpu',
                                                       image_size=16, workers=workers)))
        assert msg == f'{bad}: not a readable image (truncated or corrupt?): replace it, then --resume'
        bad.write_bytes(good)


def test_unreadable_image_in_a_run(cub_dir, tmp_path, capsys):
    """train.main on CUB with one truncated training image of task 2: exit 2 and a single error line naming the
    file; task 1's checkpoint stays, and once the file is replaced --resume completes the run."""
    c = data.class_order(20, 0)[15]  # a class of task 2
    bad = cub_dir / 'CUB_200_2011' / 'images' / f'{c + 1:03d}.Bird_{c}' / f'Bird_{c}_0.jpg'
    good = bad.read_bytes()
    bad.write_bytes(good[:len(good) // 3])
    out = tmp_path / 'run'
    argv = FAST + ['--dataset', 'cub200', '--data-dir', str(cub_dir), '--tasks', '2', '--arch', 'tiny', '--weights',
                   'none', '--batch-size', '10', '--prompt-layers', '2', '--experts', '8', '--top-k', '2',
                   '--workers', '1', '--out', str(out)]
    capsys.readouterr()
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f'error: {bad}: not a readable image (truncated or corrupt?): replace it, then '
                                '--resume']
    assert (out / 'seed0' / 'checkpoint.pt').is_file()
    bad.write_bytes(good)
    assert train.main(argv + ['--resume']) == 0


def test_import_data_leaves_the_warnings_filter_alone(imr_dir):
    code = ('import warnings, torch, torchvision, vit; before = list(warnings.filters); import data; '
            'assert warnings.filters == before, warnings.filters[:2]; '
            'warnings.simplefilter("error"); x = data._read(sys.argv[1]); assert x.shape[0] == 3; '
            'assert warnings.filters[0][0] == "error"')
    r = subprocess.run([sys.executable, '-c', 'import sys; ' + code, str(imr_dir / 'imagenet-r' / 'n01' / 'art_0.jpg')],
                       cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


# -----------------------------------------------------------------------------
# a folder of your own

TINY_RUN = ['--arch', 'tiny', '--weights', 'none', '--prompt-layers', '2', '--experts', '8', '--top-k', '2',
            '--batch-size', '8', '--epochs', '1', '--ca-epochs', '1', '--workers', '0']


NAMES = ['bee', 'café au lait', 'Ölbaum', 'zebra fish']  # spaces and non-ASCII letters


def write_images(folder, n, g, first=0):
    """n images, alternately JPEG and PNG of assorted sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(first, first + n):
        h, w = [(40, 30), (30, 50), (36, 36)][k % 3]
        img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        (write_jpeg if k % 2 else write_png)(img, str(folder / f'img {k}.{"jpg" if k % 2 else "png"}'))


def folder_tree(root, layout, per_class=(6, 2)):
    """ROOT/train|test/<class>/ ('split') or ROOT/<class>/ ('classes'): JPEG and PNG images, a non-image file,
    a hidden folder and a hidden image that are not read."""
    g = torch.Generator().manual_seed(0)
    parts = [('train', per_class[0]), ('test', per_class[1])] if layout == 'split' else [('', sum(per_class))]
    for part, n in parts:
        for name in NAMES:
            write_images(root / part / name, n, g)
            (root / part / name / 'notes.txt').write_text('not an image')
            write_images(root / part / name / '.thumbs', 1, g)  # hidden: skipped
            shutil.copy(next((root / part / name).glob('*.png')), root / part / name / '.hidden.png')
        write_images(root / part / '.cache', 2, g)  # a hidden folder is no class
    return root


@pytest.mark.parametrize('layout', ['split', 'classes'])
def test_folder_lists_classes_and_images(layout, tmp_path):
    root = folder_tree(tmp_path / 'mine', layout)
    train, test = data.load('folder', root, seed=3)
    assert train.classes == test.classes == sorted(NAMES) and train.num_classes == 4
    assert train.names() == sorted(NAMES)
    for s, n in ((train, 6), (test, 2)):  # 8 per class, 80/20 of 8 = 6 / 2 in the 'classes' layout
        assert torch.bincount(s.labels).tolist() == [n] * 4 and len(s.files) == 4 * n
        assert all(Path(f).suffix in ('.jpg', '.png') and '/.' not in f for f in s.files)
        assert all(Path(f).parent.name == sorted(NAMES)[y] for f, y in zip(s.files, s.labels.tolist()))
    if layout == 'classes':  # seeded: the same seed, the same split; train and test apart
        again = data.load('folder', root, seed=3)
        assert again[0].files == train.files and not set(train.files) & set(test.files)
        assert data.load('folder', root, seed=4)[0].files != train.files
    x, i = next(data.batches(train, torch.arange(len(train)), 8, True, torch.Generator().manual_seed(0), 'cpu',
                             image_size=32, resize='imagenet', workers=0))
    assert x.shape == (8, 3, 32, 32) and 0 <= x.min() and x.max() <= 1


@pytest.mark.parametrize('layout', ['split', 'classes'])
def test_folder_runs_end_to_end_and_resumes(layout, tmp_path, capsys):
    """--dataset folder through train.main: every task trains and is evaluated, the class names of each task
    land in metrics.json, and a run stopped after task 1 and resumed ends bit-identical to an uninterrupted one."""
    root = folder_tree(tmp_path / 'mine', layout)
    argv = ['--dataset', 'folder', '--data-dir', str(root), '--tasks', '2'] + TINY_RUN
    assert train.main(argv + ['--out', str(tmp_path / 'whole')]) == 0
    out = capsys.readouterr().out
    assert "folder has no row for 2 tasks: hyperparameters from imagenet-r's 10-task row" in out
    m = json.loads((tmp_path / 'whole' / 'seed0' / 'metrics.json').read_text(encoding='utf-8'))
    assert [len(row) for row in m['acc']] == [1, 2] and m['config']['dataset'] == 'folder'
    order = [sorted(NAMES)[c] for c in data.class_order(4, 0)]  # labels are the sorted names' positions
    assert m['task_classes'] == [order[:2], order[2:]]
    assert train.main(argv + ['--out', str(tmp_path / 'part'), '--stop-after', '1']) == 0
    assert train.main(argv + ['--out', str(tmp_path / 'part'), '--resume']) == 0
    whole, part = (torch.load(tmp_path / d / 'seed0' / 'checkpoint.pt', weights_only=False) for d in ('whole', 'part'))
    for k in ('prompt', 'head', 'stats'):
        assert all(torch.equal(whole[k][n], part[k][n]) for n in whole[k]), k
    assert whole['metrics']['acc'] == part['metrics']['acc'] and whole['metrics']['task_classes'] == m['task_classes']


def test_folder_uses_the_imagenet_r_10_task_row():
    args = train.parse_args(['--dataset', 'folder', '--data-dir', 'x'])
    row = train.PAPER['imagenet-r', 10]
    assert args.tasks == 10 and args.row == ('imagenet-r', 10)
    assert all(getattr(args, k) == v for k, v in row.items() if k not in ('iter_step', 'hold'))
    assert args.iter_step is None and args.hold is None  # derived from the data: no released schedule for it
    assert train.parse_args(['--dataset', 'folder', '--data-dir', 'x', '--lr', '0.1']).lr == 0.1


def bad_tree(case, root):
    g = torch.Generator().manual_seed(0)
    if case == 'a file':
        root.write_text('x')
    elif case == 'no class folders':
        root.mkdir()
        (root / 'readme.txt').write_text('x')
        write_images(root / '.hidden', 2, g)
    elif case == 'an empty class':
        for name in ('ant', 'bee'):
            write_images(root / name, 0 if name == 'bee' else 3, g)
        (root / 'bee' / 'notes.txt').write_text('x')
    elif case == 'other test classes':
        for part, names in (('train', ['ant', 'bee']), ('test', ['ant', 'wasp'])):
            for name in names:
                write_images(root / part / name, 2, g)
    elif case == 'no test folder':
        write_images(root / 'train' / 'ant', 2, g)
        write_images(root / 'train' / 'bee', 2, g)
    elif case == 'one image':
        write_images(root / 'ant', 3, g)
        write_images(root / 'bee', 1, g)
    elif case in ('3 classes in 2 tasks', '2 classes in 4 tasks'):
        for name in ['ant', 'bee', 'wasp'][:int(case[0])]:
            write_images(root / name, 3, g)


@pytest.mark.parametrize('case, says', [
    ('missing', 'no such file'), ('a file', 'is not a folder'), ('no class folders', 'no class folders'),
    ('an empty class', 'bee'), ('other test classes', "'bee' is in train/ only"), ('no test folder', 'test'),
    ('one image', 'bee has 1 image'), ('3 classes in 2 tasks', '--tasks 2 must divide the 3 classes'),
    ('2 classes in 4 tasks', '--tasks 4 must divide the 2 classes')])
def test_folder_bad_trees_fail_first(case, says, tmp_path, monkeypatch, capsys):
    """Each bad tree: one `error:` line, exit 2, before any backbone or training, nothing in --out."""
    root = tmp_path / 'mine'
    bad_tree(case, root)
    monkeypatch.setattr(train, 'setup', lambda *a: pytest.fail('set up before the tree was checked'))
    tasks = case.split(' in ')[1][0] if ' in ' in case else '2'
    argv = ['--dataset', 'folder', '--data-dir', str(root), '--tasks', tasks, '--out', str(tmp_path / 'out')]
    assert train.main(argv + TINY_RUN) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: ') and says.lower() in err.lower(), err
    assert not (tmp_path / 'out').exists()


def test_folder_needs_a_data_dir(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(['--dataset', 'folder'])
    assert e.value.code == 2 and '--data-dir' in capsys.readouterr().err


def test_class_names_of_each_data_set(cifar_dir, imr_dir, cub_dir):
    assert data.load('cifar100', cifar_dir)[0].names()[:3] == ['c0', 'c1', 'c2']  # the meta file's
    train_set, _ = data.load('imagenet-r', imr_dir)
    assert sorted(train_set.names()) == sorted(WNIDS) and train_set.names()[WNIDS['n01']] == 'n01'  # the wnids
    assert data.load('cub200', cub_dir)[0].names()[:2] == ['001.Bird_0', '002.Bird_1']
    assert data.synthetic(num_classes=3)[0].names() == ['0', '1', '2']


# ------------------------------------------------------------ train.py

FAST = ['--dataset', 'synthetic', '--epochs', '1', '--ca-epochs', '2', '--batch-size', '32', '--workers', '0']
REPO = os.path.dirname(os.path.abspath(train.__file__))
ROOT = hasattr(os, 'geteuid') and os.geteuid() == 0  # root writes into read-only folders


def run_train(tmp_path, *extra, name='run'):
    out = str(tmp_path / name)
    assert train.main(FAST + ['--out', out] + list(extra)) == 0
    with open(os.path.join(out, 'seed0', 'metrics.json')) as f:
        return json.load(f), out


@pytest.fixture(scope='module')
def base_run(tmp_path_factory):  # made before any test's monkeypatch: it draws its pictures
    return run_train(tmp_path_factory.mktemp('base'))


@pytest.fixture(autouse=True)
def pictures_where_tested(request, monkeypatch):
    """Drawing the two pictures after every task is a third of a demo task's time on 2 cores: the tests that ask
    for `pictures` (theirs, and the pretend GPU's, which checks where their data lives) draw them; others skip."""
    if 'pictures' not in request.fixturenames:
        monkeypatch.setattr(train, 'plot', lambda r: None)


@pytest.fixture
def pictures():
    """train.py draws its pictures in this test."""


# -----------------------------------------------------------------------------
# protocol and metrics

def test_end_to_end_metrics(base_run):
    m, _ = base_run
    acc, T = m['acc'], 5
    assert [len(r) for r in acc] == list(range(1, T + 1))   # lower-triangular T x T
    assert m['faa'] == pytest.approx(sum(acc[-1]) / T)
    assert m['caa'] == pytest.approx(sum(sum(r) / len(r) for r in acc) / T)
    ffm = sum(max(acc[t][i] for t in range(i, T - 1)) - acc[-1][i] for i in range(T - 1)) / (T - 1)
    assert m['forgetting'] == pytest.approx(ffm)
    assert m['faa'] > 5 * 100 / 50                          # chance over 50 classes is 2%
    assert m['prompt_params'] == 2 * 2 * 4 * 8 * 24         # layers x heads x experts x head_dim, keys + values
    assert list(m['step_seconds']) == list(train.STEPS) and all(v >= 0 for v in m['step_seconds'].values())
    assert m['step_seconds']['training'] > 0 and m['step_seconds']['alignment'] > 0
    assert m['weights_sha256'] is None and len(m['peak_memory_mb']) == T


def test_eval_does_not_depend_on_batch_size():
    torch.manual_seed(0)
    vit = ViT(**train.TINY)
    prompt = SMoPE(2, vit.heads, vit.head_dim, experts=8, top_k=2)
    prompt.usage.random_(0, 2)
    model = train.Learner(vit, prompt, 50).eval()
    _, test = data.synthetic()
    idx = torch.arange(64)
    feed = dict(device=torch.device('cpu'), image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, workers=0)
    x = next(data.batches(test, idx, 64, False, None, **feed))[0]
    with torch.no_grad():
        full = model.head(model.vit(x))
        single = torch.cat([model.head(model.vit(x[b:b + 1])) for b in range(64)])
    assert (full - single).abs().max() <= 1e-5 and torch.equal(full.argmax(1), single.argmax(1))
    y = torch.arange(len(test)) % 10  # any labels: both batch sizes must count the same correct predictions
    autocast = lambda: torch.autocast('cpu', enabled=False)
    from argparse import Namespace
    runs = [Namespace(model=model, test_set=test, y_test=y, per_task=10, args=Namespace(eval_batch_size=bs), world=1,
                      feed=dict(feed, rank=0, world=1, resize='cifar'), autocast=autocast) for bs in (1, 64)]
    accs = [train.evaluate(r, Namespace(t=0, hi=10)) for r in runs]
    assert accs[0] == accs[1]


def record(monkeypatch):
    """Records (dense, training, eps) at every prompted-layer call and counts classifier alignments."""
    seen, forward = {'calls': set(), 'ca': 0}, SMoPE.forward

    def spy(self, i, q, k, v):
        seen['calls'].add((self.dense, self.training, self.eps))
        return forward(self, i, q, k, v)
    align = train.align_classifier

    def ca(*a):
        seen['ca'] += 1
        return align(*a)
    monkeypatch.setattr(SMoPE, 'forward', spy)
    monkeypatch.setattr(train, 'align_classifier', ca)
    return seen


@pytest.mark.parametrize('flag', [None, '--dense', '--no-warmup', '--no-noise', '--no-router', '--no-proto', '--no-ca'])
def test_ablation_switches(flag, tmp_path, monkeypatch):
    seen = record(monkeypatch)
    extra = ['--tasks', '10', '--stop-after', '2'] + ([flag] if flag else [])  # 10 tasks: smaller ones
    m, out = run_train(tmp_path, *extra)
    cfg = m['config']
    train_calls = {(d, e) for d, tr, e in seen['calls'] if tr}
    if flag == '--dense':        # one shared prompt: every training forward uses all experts
        assert train_calls == {(True, 0.4)} and max(map(max, (m['usage'][0]))) == 0
    elif flag == '--no-warmup':  # no dense phase at all
        assert train_calls == {(False, 0.4)}
    elif flag == '--no-noise':
        assert cfg['eps'] == 0 and train_calls == {(True, 0.0), (False, 0.0)}
    else:                        # dense warm-up on task 1, then sparse
        assert train_calls == {(True, 0.4), (False, 0.4)}
    assert cfg['router_weight'] == (0 if flag == '--no-router' else 1e-5)
    assert cfg['proto_weight'] == (0 if flag == '--no-proto' else 1e-5)
    assert seen['ca'] == (0 if flag == '--no-ca' else 1)  # task 2 only


def test_masking_and_alignment_touch_only_what_they_should(tmp_path):
    def state(out):
        return torch.load(os.path.join(out, 'seed0', 'checkpoint.pt'), weights_only=False)
    import shutil
    _, one = run_train(tmp_path, '--stop-after', '1', '--no-ca', name='one')
    first = state(one)
    _, ca = run_train(tmp_path, '--stop-after', '2', name='ca')
    no_ca = shutil.copytree(one, tmp_path / 'no_ca')  # task 2 without alignment, after the same task 1
    assert train.main(FAST + ['--out', str(no_ca), '--resume', '--stop-after', '2', '--no-ca']) == 0
    with_ca, without = state(ca), state(no_ca)
    # task 2 training masks task 1's logits, so without alignment task 1's head rows are exactly as after task 1
    assert torch.equal(without['head']['weight'][:10], first['head']['weight'][:10])
    assert not torch.equal(without['head']['weight'][10:20], first['head']['weight'][10:20])
    # alignment retrains the head only
    for k in without['prompt']:
        assert torch.equal(with_ca['prompt'][k], without['prompt'][k]), k
    assert not torch.equal(with_ca['head']['weight'][:20], without['head']['weight'][:20])


def test_norga_gate_parameters_freeze_after_task_1(tmp_path, monkeypatch):
    """NoRGa's alpha and tau train on task 1 only; from task 2 on they require no gradient at all (none is
    computed, none all-reduced), not merely no optimizer step."""
    seen, forward = set(), train.Learner.forward

    def spy(self, x):
        seen.add((int(self.prompt.task), self.prompt.alpha.requires_grad, self.prompt.tau.requires_grad))
        return forward(self, x)
    monkeypatch.setattr(train.Learner, 'forward', spy)
    run_train(tmp_path, '--gate', 'tanh', '--stop-after', '2')
    assert seen == {(1, True, True), (2, False, False)}


def test_released_usage_pass(synth):
    """The released usage pass: shuffled training batches with drop_last, test-time routing, and each batch's
    hits join `usage` before the next batch, so an expert never used before the pass is excluded until its
    first hit and routed to after it."""
    from argparse import Namespace
    train_set, _ = synth
    p = SMoPE(layers=1, heads=1, head_dim=2, experts=2, top_k=1)
    with torch.no_grad():
        p.keys.copy_(torch.eye(2).view(1, 1, 2, 2))
        p.values.copy_(torch.eye(2).view(1, 1, 2, 2))
    qkv = torch.tensor([0.2, 1.0]).expand(1, 1, 3, 2)  # raw scores (0.2, 1.0): expert 1 is the raw top-1
    outs = []

    class Model(nn.Module):
        def vit(self, x):  # every image the same q, k, v: only the routing changes the output
            outs.append(p(0, *[qkv.expand(len(x), 1, 3, 2)] * 3)[0])
            return outs[-1]

    def usage_pass(released):
        p.usage.copy_(torch.tensor([5, 0]).view(1, 1, 2))  # expert 1 unused: excluded at test time
        outs.clear()
        model = Model()
        model.prompt = p.train()  # the pass itself must switch to test mode
        args = Namespace(batch_size=4, eval_batch_size=256, augment=False, released_quirks=released)
        r = Namespace(model=model, args=args, train_set=train_set, gen=torch.Generator().manual_seed(0),
                      feed=dict(device='cpu', image_size=32), world=1, autocast=contextlib.nullcontext)
        train.usage_pass(r, Namespace(idx=torch.arange(10)))
        return p.usage[0, 0].tolist()
    p.eval()
    with torch.no_grad():
        p.usage.copy_(torch.tensor([5, 0]).view(1, 1, 2))
        routed = [p(0, qkv, qkv, qkv)[0]]  # expert 0
        p.usage[0, 0, 1] = 1
        routed.append(p(0, qkv, qkv, qkv)[0])  # expert 1
    assert (routed[0] - routed[1]).abs().max() > 0.1
    same = lambda a, b: torch.allclose(a, b, atol=1e-6, rtol=0)
    assert usage_pass(True) == [5, 8]  # 10 images in batches of 4: the last 2 are dropped
    assert len(outs) == 2 and same(outs[0], routed[0]) and same(outs[1], routed[1])
    assert usage_pass(False) == [5, 10] and len(outs) == 1 and same(outs[0], routed[1])  # no exclusion


def test_no_augment_still_shuffles(tmp_path, monkeypatch):
    seen, batches = [], data.batches

    def spy(*a, **k):
        for x, i in batches(*a, **k):
            if k.get('drop_last'):  # training batches
                seen.append(i)
            yield x, i
    monkeypatch.setattr(data, 'batches', spy)
    orders = []
    for name in ('a', 'b'):
        run_train(tmp_path, '--no-augment', '--stop-after', '1', '--no-warmup', name=name)
        orders.append(torch.cat(seen))
        seen.clear()
    assert len(orders[0]) == 384 and torch.equal(*orders)  # same seed, same order
    assert not torch.equal(orders[0], orders[0].sort().values)


def test_bf16_runs(tmp_path):
    m, _ = run_train(tmp_path, '--stop-after', '1', '--precision', 'bf16')
    assert m['acc'][0][0] > 10


def test_peak_memory_is_per_task(base_run, monkeypatch):
    """CUDA: each task's own peak (the allocator's peak is reset after each reading). CPU: the process's peak RSS,
    which cannot be reset, and metrics.json says so."""
    peaks, resets = [3 * 2**20, 2**20], []
    monkeypatch.setattr(torch.cuda, 'max_memory_allocated', lambda device=None: peaks[len(resets)])
    monkeypatch.setattr(torch.cuda, 'reset_peak_memory_stats', lambda device=None: resets.append(device))
    cuda = torch.device('cuda')
    assert [train.peak_memory_mb(cuda), train.peak_memory_mb(cuda)] == [3, 1] and resets == [cuda, cuda]
    assert base_run[0]['peak_memory'] == 'process peak RSS so far'


# -----------------------------------------------------------------------------
# schedules (--released-quirks: the released code's slips, SPEC section 9)

def lr(k, hold, T, base):  # SPEC section 6's formula, written out once more
    return 1e-6 if k < hold or k >= T else 1e-6 + 0.5 * (base - 1e-6) * (1 + math.cos(math.pi * (k - hold) / (T - hold)))


@pytest.mark.parametrize('dataset, tasks, n, iter_step, hold, steps', [
    ('cifar100', 10, 5000, 40, 80, 39),        # 5,000 images per task / 128: 39 full batches
    ('imagenet-r', 5, 4800, 80, 80, 75),
    ('imagenet-r', 10, 2400, 40, 40, 37),
    ('imagenet-r', 20, 1200, 20, 20, 18)])
def test_released_schedules(dataset, tasks, n, iter_step, hold, steps):
    args = train.parse_args(['--dataset', dataset, '--tasks', str(tasks)])
    assert (args.iter_step, args.hold) == (iter_step, hold)
    base = args.lr
    for epochs in (20, 10):  # main phase, then task 1's dense warm-up (same iter_step and hold)
        table = train.lr_schedule(args, n, epochs)
        assert len(table) == steps * epochs  # drop_last: the incomplete batch is not a step
        T = iter_step * epochs
        for k in (0, hold - 1, hold, hold + 1, (hold + T) // 2, steps * epochs - 1):
            assert table[k] == pytest.approx((lr(k, hold, T, 5 * base), lr(k, hold, T, base)), rel=1e-12, abs=0)
        assert table[0] == table[hold - 1] == (1e-6, 1e-6)          # the hold is NOT scaled by 5
        assert table[hold] == pytest.approx((5 * base, base))        # the cosine starts at the group's base
    if dataset == 'imagenet-r' and tasks == 10:  # literals, computed once by hand from SPEC's formula
        assert train.lr_schedule(args, n, 20)[400][0] == pytest.approx(0.006766579619529343, rel=1e-12)
        assert train.lr_schedule(args, n, 20)[739][1] == pytest.approx(4.0512651699604933e-05, rel=1e-12)
    if dataset == 'cifar100':  # two values by hand: entry 440 is mid-cosine, entry 779 near the end
        assert train.lr_schedule(args, n, 20)[440] == pytest.approx((1e-6 + 0.5 * (0.025 - 1e-6), 1e-6 + 0.5 * (0.005 - 1e-6)))
        assert train.lr_schedule(args, n, 20)[779][1] == pytest.approx(1e-6 + 0.5 * (0.005 - 1e-6) *
                                                                        (1 + math.cos(math.pi * 699 / 720)))
    # a task with more full batches than iter_step runs past the table: the released scheduler returns 1e-6 there
    long = train.lr_schedule(args, (iter_step + 2) * args.batch_size, 20)
    assert len(long) == (iter_step + 2) * 20 and long[T - 1][0] > 1e-6 and long[-40:] == [(1e-6, 1e-6)] * 40


def test_derived_and_cub_schedules():
    # no released row (another batch size): iter_step = ceil(n / batch), hold = round(iter_step * epochs / 20)
    args = train.parse_args(['--dataset', 'cifar100', '--batch-size', '64'])
    assert (args.iter_step, args.hold) == (None, None)
    table = train.lr_schedule(args, 5000, 20)
    assert len(table) == 78 * 20 and table[78] == (1e-6, 1e-6) and table[79] == pytest.approx((0.025, 0.005))
    args = train.parse_args(['--dataset', 'cifar100', '--tasks', '5', '--epochs', '4', '--hold', '3'])
    table = train.lr_schedule(args, 10_000, 4)
    assert len(table) == 78 * 4 and table[2] == (1e-6, 1e-6) and table[50][1] == pytest.approx(lr(50, 3, 79 * 4, 0.005))
    # CUB-200: the released per-epoch CosineSchedule, base * cos(99 pi e / (200 (K - 1))), no hold, no floor
    args = train.parse_args(['--dataset', 'cub200'])
    assert (args.batch_size, args.lr, args.proto_weight, args.iter_step, args.hold) == (128, 0.005, 5e-5, None, None)
    for epochs in (20, 10):
        table = train.lr_schedule(args, 600, epochs)  # 600 images: 4 full batches of 128 per epoch
        assert len(table) == 4 * epochs
        for e in range(epochs):
            c = math.cos(99 * math.pi * e / (200 * (epochs - 1)))
            assert table[4 * e:4 * e + 4] == [pytest.approx((0.025 * c, 0.005 * c))] * 4
        assert table[-1][1] == pytest.approx(0.005 * math.cos(99 * math.pi / 200))


def test_short_released_run_trains():
    args = train.parse_args(['--dataset', 'cifar100', '--epochs', '2'])
    assert (args.iter_step, args.hold) == (40, 8)  # round(80 x 2 / 20)
    for epochs in (2, 1):  # main phase, then task 1's warm-up: the same hold
        table = train.lr_schedule(args, 5000, epochs)
        assert table[:8] == [(1e-6, 1e-6)] * 8 and table[8] == pytest.approx((0.025, 0.005))
        assert all(a > 1e-6 and b > 1e-6 for a, b in table[8:])
    assert train.parse_args(['--dataset', 'cifar100']).hold == 80
    assert train.parse_args(['--dataset', 'imagenet-r', '--tasks', '5', '--epochs', '4']).hold == 16
    assert train.parse_args(['--dataset', 'cifar100', '--epochs', '2', '--hold', '80']).hold == 80  # as given


def test_which_row_is_used(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, 'run', lambda *a: dict(acc=[]))
    argv = ['--dataset', 'imagenet-r', '--device', 'cpu', '--out', str(tmp_path), '--data-dir', str(tmp_path)]
    assert train.main(argv + ['--tasks', '4']) == 0
    assert capsys.readouterr().out.splitlines()[:1] == [
        'imagenet-r has no row for 4 tasks: hyperparameters from its 5-task row, iter_step and hold derived']
    assert train.main(argv + ['--tasks', '10']) == 0 and 'no row' not in capsys.readouterr().out


def test_alignment_schedule():
    args = train.parse_args(['--dataset', 'imagenet-r'])
    table = train.ca_lr_schedule(args, 40)  # 40 classes in earlier tasks: 40 iterations per epoch, 50 epochs
    assert len(table) == 2000 and table[0] == pytest.approx(1e-5) and table[1000] == pytest.approx(1e-6 + 0.5 * 9e-6)
    assert table[1999] == pytest.approx(1e-6 + 0.5 * 9e-6 * (1 + math.cos(math.pi * 1999 / 2000)))
    assert all(a > b for a, b in zip(table, table[1:]))  # per iteration, not per epoch


def test_released_quirks_schedules():
    args = train.parse_args(['--dataset', 'cifar100', '--released-quirks'])
    for epochs in (20, 10):  # main phase, task 1's warm-up
        table, T = train.lr_schedule(args, 5000, epochs), 40 * epochs
        assert len(table) == 39 * epochs and table[0] == (0.025, 0.005)  # the first step at the bases
        assert table[1:81] == [(1e-6, 1e-6)] * 80 and table[81] == pytest.approx((0.025, 0.005))  # one late
        for k in (82, 200, len(table) - 1):
            assert table[k] == pytest.approx((lr(k - 1, 80, T, 0.025), lr(k - 1, 80, T, 0.005)), rel=1e-12, abs=0)
    assert train.lr_schedule(args, 5000, 20)[441] == pytest.approx((1e-6 + 0.5 * (0.025 - 1e-6), 1e-6 + 0.5 * (0.005 - 1e-6)))
    args = train.parse_args(['--dataset', 'imagenet-r', '--released-quirks'])
    ca = train.ca_lr_schedule(args, 40)  # the released --ca_lr 1e-4 first, then the 1e-5 table one late
    assert len(ca) == 2000 and ca[0] == pytest.approx(1e-4) and ca[1] == pytest.approx(1e-5)
    assert ca[1001] == pytest.approx(1e-6 + 0.5 * 9e-6) and ca[1999] == pytest.approx(1e-6 + 0.5 * 9e-6 * (1 + math.cos(math.pi * 1998 / 2000)))
    args = train.parse_args(['--dataset', 'cub200', '--released-quirks'])
    for epochs in (20, 10):  # epochs 0 and 1 at the base, epoch e >= 1 at the formula's value for e - 1
        table = train.lr_schedule(args, 600, epochs)
        assert table[:8] == [(0.025, 0.005)] * 8 and len(table) == 4 * epochs
        for e in range(1, epochs):
            c = math.cos(99 * math.pi * (e - 1) / (200 * (epochs - 1)))
            assert table[4 * e:4 * e + 4] == [pytest.approx((0.025 * c, 0.005 * c))] * 4


@pytest.mark.parametrize('dataset', ['synthetic', 'cub200'])
def test_loops_use_the_schedules(dataset, tmp_path, monkeypatch, request):
    """Every optimizer step of a run takes exactly the next entry of lr_schedule / ca_lr_schedule."""
    seen, step = [], torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, 'step', lambda self, *a, **k: (
        seen.append(tuple(g['lr'] for g in self.param_groups)), step(self, *a, **k))[1])
    if dataset == 'synthetic':
        extra = ['--stop-after', '2', '--epochs', '2']
    else:  # fake CUB on disk, the tiny demo backbone: 20 classes in 2 tasks, 20 training images each
        extra = ['--dataset', 'cub200', '--data-dir', str(request.getfixturevalue('cub_dir')), '--tasks', '2',
                 '--arch', 'tiny', '--weights', 'none', '--batch-size', '6', '--epochs', '3', '--ca-epochs', '2',
                 '--prompt-layers', '2', '--experts', '8', '--top-k', '2']
    m, _ = run_train(tmp_path, *extra)
    args = train.parse_args(FAST + extra)
    n = 400 if dataset == 'synthetic' else 20  # training images per task
    expected = train.lr_schedule(args, n, max(1, args.epochs // 2)) + train.lr_schedule(args, n, args.epochs)
    expected += train.lr_schedule(args, n, args.epochs) + [(x,) for x in train.ca_lr_schedule(args, n // (n // 10))]
    assert seen == expected and len(m['acc']) == 2
    if dataset == 'cub200':
        assert len(seen) == 3 * 1 + 3 * 3 * 2 + 20 and m['acc'][1][0] >= 0


def test_released_quirks_run(tmp_path, monkeypatch):
    """A run with the flag steps the slipped schedules, counts full batches only, and resumes only with it."""
    seen, step = [], torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, 'step', lambda self, *a, **k: (
        seen.append(tuple(g['lr'] for g in self.param_groups)), step(self, *a, **k))[1])
    m, out = run_train(tmp_path, '--released-quirks', '--stop-after', '2', '--epochs', '2')
    args = train.parse_args(FAST + ['--released-quirks', '--epochs', '2'])
    warm, main, ca = train.lr_schedule(args, 400, 1), train.lr_schedule(args, 400, 2), train.ca_lr_schedule(args, 10)
    assert seen == warm + main + main + [(x,) for x in ca]
    assert warm[0] == main[0] == (5 * 0.002, 0.002) and ca[0] == pytest.approx(1e-2)
    # drop_last: 12 full batches of 32 of each task's 400 images are counted, top-2 per layer and head
    assert torch.tensor(m['usage']).sum(-1).unique().tolist() == [2 * 2 * 384] and m['config']['released_quirks']
    assert train.main(FAST + ['--out', out, '--resume']) == 2  # a result setting


# -----------------------------------------------------------------------------
# run folder, checkpoints and resume

def test_determinism_and_resume(base_run, tmp_path):
    m, _ = base_run
    # a second run repeats the first exactly; stopped after task 2 and resumed, it ends with the same metrics
    part, out = run_train(tmp_path, '--stop-after', '2', name='resumed')
    assert len(part['acc']) == 2 and part['acc'] == m['acc'][:2]
    assert train.main(FAST + ['--out', out, '--resume']) == 0
    with open(os.path.join(out, 'seed0', 'metrics.json')) as f:
        assert json.load(f)['acc'] == m['acc']


def test_one_run_per_out(tmp_path, capsys):
    """Two real runs on one --out: while the first holds <out>/.lock the second stops at once with one line;
    the first runs on and ends as usual."""
    out = tmp_path / 'run'
    first = subprocess.Popen([sys.executable, 'train.py'] + FAST + ['--out', str(out), '--stop-after', '1'], cwd=REPO,
                             env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=subprocess.PIPE, text=True)
    for line in first.stdout:  # this line comes after the lock is taken, before training
        if line.startswith('seed 0:'):
            break
    assert train.main(FAST + ['--out', str(out)]) == 2
    got, err = capsys.readouterr()
    assert err == f'error: --out {out} is in use by another run: wait or choose another --out\n' and not got
    first.stdout.read()
    assert first.wait(timeout=110) == 0
    assert torch.load(out / 'seed0' / 'checkpoint.pt', weights_only=False)['task'] == 1


def test_resume_with_other_settings_and_a_busy_out_fail_first(base_run, tmp_path, monkeypatch, capsys):
    import shutil
    out = tmp_path / 'run'
    shutil.copytree(base_run[1], out)
    monkeypatch.setattr(data, 'load', lambda *a, **k: pytest.fail('loaded before the settings were compared'))
    assert train.main(FAST + ['--out', str(out), '--resume', '--lr', '0.1']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'other settings (lr: checkpoint 0.002, now 0.1)' in err
    # a run holding the folder is named as such, not as "pass --resume" (the lock comes first)
    holder = subprocess.Popen([sys.executable, '-c', 'import fcntl, sys, time; f = open(sys.argv[1], "a"); '
                               'fcntl.lockf(f, fcntl.LOCK_EX); print("locked", flush=True); time.sleep(60)',
                               str(out / '.lock')], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'locked\n'
        assert train.main(FAST + ['--out', str(out)]) == 2
        assert 'is in use by another run' in capsys.readouterr().err
    finally:
        holder.kill()


def test_failed_checkpoint_write_is_one_line(tmp_path, monkeypatch, capsys):
    """A full disk while task 2's checkpoint is written: one line, no .tmp left, task 1's checkpoint as it was.
    Also: --resume on a folder without a checkpoint says that it starts from task 1."""
    save, calls = torch.save, []

    def full_disk(obj, f, *a, **k):
        calls.append(f)
        if len(calls) < 2:
            return save(obj, f, *a, **k)
        with open(f, 'wb') as w:
            w.write(b'x' * 1000)
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', full_disk)
    out = tmp_path / 'run'
    assert train.main(FAST + ['--out', str(out), '--resume', '--stop-after', '2']) == 2
    got, err = capsys.readouterr()
    assert f'{out / "seed0" / "checkpoint.pt"} does not exist: starting from task 1' in got
    ckpt = out / 'seed0' / 'checkpoint.pt'
    assert err.startswith(f'error: cannot write {ckpt} (') and 'No space left on device' in err and err.count('\n') == 1
    assert sorted(p.name for p in (out / 'seed0').iterdir() if p.suffix != '.png') == ['checkpoint.pt', 'metrics.json']
    assert torch.load(ckpt, weights_only=False)['task'] == 1

    def torch_full(obj, f, *a, **k):  # what torch.save itself raises on a full disk or a read-only folder
        with open(f, 'wb') as w:
            w.write(b'x' * 100)
        raise RuntimeError('[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\nframe #0: c10::Error')
    monkeypatch.setattr(torch, 'save', torch_full)
    assert 'unexpected pos 64 vs 0 frame' in one_line_error(train.atomic_save, {}, str(tmp_path / 'c.pt'), exc=OSError)
    assert not (tmp_path / 'c.pt.tmp').exists() and not (tmp_path / 'c.pt').exists()


def test_damaged_checkpoint_is_refused(base_run, tmp_path, capsys):
    """A checkpoint that loads but is wrong (a flipped byte in tensor data, a part missing although the checksum
    matches) is one line, exit 2, and stays as it is; the intact one resumes."""
    import shutil
    out = tmp_path / 'run'
    shutil.copytree(base_run[1], out)
    ckpt = out / 'seed0' / 'checkpoint.pt'
    good = ckpt.read_bytes()
    ck = torch.load(ckpt, weights_only=False)
    pos = good.find(ck['head']['weight'].numpy().tobytes()[:64])
    flipped = bytearray(good)
    flipped[pos + 17] ^= 0x10
    ckpt.write_bytes(flipped)  # torch.load reads it without a word: only the checksum tells
    assert not torch.equal(torch.load(ckpt, weights_only=False)['head']['weight'], ck['head']['weight'])
    cases = [(bytes(flipped), 'sha256 does not match')]
    for drop in (('ca_gen',), ('prompt', 'keys')):  # re-saved with a matching checksum: the parts themselves are checked
        part = {k: (dict(v) if isinstance(v, dict) else v) for k, v in ck.items() if k != 'sha256'}
        del (part[drop[0]] if len(drop) > 1 else part)[drop[-1]]
        part['sha256'] = train.digest(part)
        torch.save(part, ckpt)
        cases.append((ckpt.read_bytes(), drop[-1]))
    for blob, why in cases:
        ckpt.write_bytes(blob)
        assert train.main(FAST + ['--out', str(out), '--resume']) == 2
        err = capsys.readouterr().err
        assert err.startswith(f'error: {ckpt} is not a readable checkpoint') and why in err and err.count('\n') == 1, err
        assert ckpt.read_bytes() == blob
    ckpt.write_bytes(good)
    assert train.main(FAST + ['--out', str(out), '--resume']) == 0
    assert 'resuming' in capsys.readouterr().out


def test_diverged_alignment_stops_before_its_checkpoint(tmp_path, capsys):
    """A non-finite head after classifier alignment is one line naming --ca-lr, and task 1's checkpoint stays."""
    out = tmp_path / 'run'
    assert train.main(FAST + ['--out', str(out), '--ca-lr', '1e20']) == 2
    ckpt = out / 'seed0' / 'checkpoint.pt'
    assert capsys.readouterr().err == (f'error: classifier alignment diverged at task 2 (a non-finite head): '
                                       f'lower --ca-lr; {ckpt} holds the last completed task\n')
    ck = torch.load(ckpt, weights_only=False)
    assert ck['task'] == 1 and all(v.isfinite().all() for v in ck['head'].values())


def test_named_weights_in_a_run(hub, tmp_path, monkeypatch, capsys):
    """train.py with --weights sup1k: the sha256 of the cached file is printed and kept in metrics.json, and a
    resume refuses a backbone file that changed. (The tiny demo ViT stands in for ViT-B/16.)"""
    cache, src = hub
    torch.manual_seed(0)
    torch.save(ViT(**train.TINY).state_dict(), src / 'sup1k')
    monkeypatch.setattr(train, 'vit_b_16', lambda w, download: load_weights(ViT(**train.TINY), w, download))
    m, out = run_train(tmp_path, '--arch', 'vit_b_16', '--weights', 'sup1k', '--stop-after', '1')
    sha = hashlib.sha256((cache / vit.BACKBONES['sup1k'][1]).read_bytes()).hexdigest()
    assert f'backbone sup1k: sha256 {sha}' in capsys.readouterr().out and m['weights_sha256'] == sha
    torch.save(ViT(**train.TINY).state_dict(), cache / vit.BACKBONES['sup1k'][1])  # another file, same name
    assert train.main(FAST + ['--out', out, '--arch', 'vit_b_16', '--weights', 'sup1k', '--resume']) == 2
    assert f"backbone sha256: checkpoint '{sha}'" in capsys.readouterr().err


def test_a_checkpoint_of_another_seed_is_refused(base_run, tmp_path, monkeypatch, capsys):
    """A checkpoint copied over another seed's is refused before any data is loaded, naming both seeds; a summary
    never counts a seed twice."""
    out = tmp_path / 'run'
    shutil.copytree(base_run[1], out)
    shutil.copytree(out / 'seed0', out / 'seed1')
    shutil.copy(out / 'seed0' / 'checkpoint.pt', out / 'seed1' / 'checkpoint.pt')
    monkeypatch.setattr(data, 'load', lambda *a, **k: pytest.fail('loaded before the checkpoint was checked'))
    assert train.main(FAST + ['--out', str(out), '--seeds', '0', '1', '--resume']) == 2
    err = capsys.readouterr().err
    assert err == (f'error: {out / "seed1" / "checkpoint.pt"} was made with other settings (seed: checkpoint 0, '
                   'now 1): use the same flags or another --out\n')


def test_an_edited_metrics_json_does_not_decide(base_run, tmp_path, capsys):
    """metrics.json is an output: its config edited by hand, --resume goes by the checkpoint and rewrites it."""
    out = tmp_path / 'run'
    shutil.copytree(base_run[1], out)
    m = json.loads((out / 'seed0' / 'metrics.json').read_text())
    m['config']['lr'] = 123.0
    (out / 'seed0' / 'metrics.json').write_text(json.dumps(m))
    assert train.main(FAST + ['--out', str(out), '--resume']) == 0
    assert json.loads((out / 'seed0' / 'metrics.json').read_text())['config']['lr'] == 0.002
    assert train.main(FAST + ['--out', str(out), '--resume', '--lr', '123']) == 2
    assert 'checkpoint.pt was made with other settings (lr: checkpoint 0.002, now 123.0)' in capsys.readouterr().err


def test_a_failed_run_leaves_no_folders_it_made(tmp_path, monkeypatch, capsys):
    def gone(*a, **k):
        raise OSError('download of file:///gone failed: check the network')
    monkeypatch.setattr(data, 'load', gone)
    (tmp_path / 'there').mkdir()
    assert train.main(FAST + ['--out', str(tmp_path / 'there' / 'a' / 'b' / 'c')]) == 2
    assert capsys.readouterr().err == 'error: download of file:///gone failed: check the network\n'
    assert list(tmp_path.iterdir()) == [tmp_path / 'there'] and not any((tmp_path / 'there').iterdir())


def test_an_out_path_too_long_for_the_os_fails_first(tmp_path, monkeypatch, capsys):
    """The longest path the run writes (seed<N>/checkpoint.pt.tmp) passes the OS's limit: one line naming --out
    before anything is loaded or made, where it used to fail after a whole task of training."""
    monkeypatch.setattr(data, 'load', lambda *a, **k: pytest.fail('loaded before --out was checked'))
    limit = os.pathconf(tmp_path, 'PC_PATH_MAX')
    out = str(tmp_path / 'a')
    while len(out) + len('/seed0/checkpoint.pt.tmp') < limit:
        out += '/' + 'd' * min(200, limit - len(out) - len('/seed0/checkpoint.pt.tmp'))
    assert len(out) < limit - 8  # --out itself could be made
    assert train.main(FAST + ['--out', out]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: --out {out}: the OS refuses ') and 'File name too long' in err and err.count('\n') == 1
    assert list(tmp_path.iterdir()) == []



# -----------------------------------------------------------------------------
# flags and bad input

def test_paper_flags_and_precision():
    a = train.parse_args(['--dataset', 'cifar100'])
    assert (a.weights, a.normalize, a.precision, a.iter_step, a.hold) == ('IMAGENET1K_V1', 'backbone', 'fp32', 40, 80)
    assert train.parse_args(['--device', 'cuda']).precision == 'bf16'         # auto: bf16 on CUDA, fp32 on CPU
    assert train.parse_args(['--device', 'cuda', '--precision', 'fp32']).precision == 'fp32'
    for dataset, weights in (('cifar100', 'sup1k'), ('imagenet-r', 'sup1k'), ('cub200', 'sup21k')):
        a = train.parse_args(['--dataset', dataset, '--paper', '--device', 'cuda'])
        assert (a.weights, a.normalize, a.precision, a.paper) == (weights, 'none', 'fp32', True)
        assert a.epochs == 20 and a.experts == 25 and a.top_k == 5 and a.ca_lr == 1e-5 and a.augment
    a = train.parse_args(['--dataset', 'imagenet-r', '--tasks', '20', '--paper', '--weights', 'sup21k'])
    assert (a.weights, a.eps, a.ca_ratio, a.iter_step, a.hold) == ('sup21k', 0.3, 4, 20, 20)  # a flag beats --paper
    with pytest.raises(SystemExit):
        train.parse_args(['--dataset', 'synthetic', '--paper'])


def test_paper_implies_released_quirks():
    assert train.parse_args(['--dataset', 'cifar100', '--paper']).released_quirks
    assert not train.parse_args(['--dataset', 'cifar100']).released_quirks
    assert train.parse_args(['--dataset', 'synthetic', '--arch', 'tiny', '--released-quirks']).released_quirks
    assert 'released_quirks' in train.config(train.parse_args([]), 0)  # a setting a checkpoint must share


def test_top_k_equal_to_experts_says_dense(tmp_path, capsys):
    run_train(tmp_path, '--top-k', '8', '--stop-after', '1')
    assert '--top-k 8 = --experts: dense mode (no routing, usage counts, prototype loss)' in capsys.readouterr().out


def test_train_bad_inputs(tmp_path, capsys):
    for argv, msg in [(['--top-k', '30', '--experts', '25'], '--top-k must be between 1 and --experts'),
                      (['--bogus'], 'unrecognized arguments'), (['--gate', 'relu'], 'invalid choice'),
                      (['--arch', 'tiny', '--weights', 'IMAGENET1K_V1'], '--weights needs'),
                      (['--dataset', 'cub200', '--hold', '3'], 'do not apply to cub200'),
                      (['--split', 'random'], '--split applies to imagenet-r only'),
                      (['--arch', 'vit_b_16', '--weights', str(tmp_path / 'missing.pth')], 'no such file')]:
        with pytest.raises(SystemExit):
            train.main(FAST + argv)
        assert msg in capsys.readouterr().err
    out = str(tmp_path / 'x')
    checks = [(['--dataset', 'cifar100', '--data-dir', str(tmp_path / 'none'), '--weights', 'none', '--no-download'],
               'CIFAR-100 not found: expected'),
              (FAST + ['--lr', '1e30', '--out', out], 'loss is'),
              (FAST + ['--batch-size', '401', '--out', out], 'task 1 has 400 training images, fewer than one')]
    for argv, msg in checks:
        assert train.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith('error:') and msg in err and '\n' not in err, err
    assert train.main(FAST + ['--out', out, '--stop-after', '1']) == 0
    capsys.readouterr()
    assert train.main(FAST + ['--out', out]) == 2                       # would overwrite: refused
    assert '--resume' in capsys.readouterr().err
    assert train.main(FAST + ['--out', out, '--resume', '--eps', '0.3']) == 2
    assert "eps: checkpoint 0.4, now 0.3" in capsys.readouterr().err
    assert len(json.load(open(os.path.join(out, 'seed0', 'metrics.json')))['acc']) == 1  # kept as it was
    ckpt = os.path.join(out, 'seed0', 'checkpoint.pt')
    with open(ckpt, 'wb') as f:
        f.write(b'not a checkpoint')
    assert train.main(FAST + ['--out', out, '--resume']) == 2
    err = capsys.readouterr().err
    assert 'not a readable checkpoint' in err and err.count('\n') == 1 and open(ckpt, 'rb').read() == b'not a checkpoint'


@pytest.mark.parametrize('argv, flag', [
    (['--out', 'FILE'], '--out'), (['--out', 'FILE/run'], '--out'),
    pytest.param(['--out', 'READONLY'], '--out', marks=pytest.mark.skipif(ROOT, reason='root writes anywhere')),
    pytest.param(['--out', 'READONLY/run'], '--out', marks=pytest.mark.skipif(ROOT, reason='root writes anywhere')),
    (['--eval-batch-size', '0'], '--eval-batch-size'), (['--dataset', 'cifar100', '--data-dir', 'FILE'], '--data-dir'),
    (['--dataset', 'cifar100', '--tasks', '7'], '--tasks'), (['--dataset', 'imagenet-r', '--tasks', '15'], '--tasks'),
    (['--tasks', '0'], '--tasks'), (['--lr', '-1'], '--lr'), (['--lr', '0'], '--lr'), (['--lr', 'nan'], '--lr'),
    (['--stop-after', '0'], '--stop-after'), (['--stop-after', '-1'], '--stop-after'),
    (['--iter-step', '0'], '--iter-step'), (['--hold', '-1'], '--hold'), (['--epochs', '0'], '--epochs'),
    (['--batch-size', '0'], '--batch-size'), (['--ca-epochs', '-1'], '--ca-epochs'), (['--ca-ratio', '0'], '--ca-ratio'),
    (['--workers', '-1'], '--workers'), (['--eps', '-0.1'], '--eps'), (['--router-weight', '-1'], '--router-weight'),
    (['--proto-weight', '-0.1'], '--proto-weight'), (['--timeout', '0'], '--timeout'),
    pytest.param(['--device', 'cuda'], '--device', marks=pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU')),
    (['--device', 'gpu'], '--device'), (['--device', 'cuda:x'], '--device'), (['--device', 'cuda:99'], '--device'),
])
def test_bad_flags_fail_before_any_work(argv, flag, tmp_path, monkeypatch, capsys):
    """Each: exit 2 with one `error:` line naming the flag, before anything is loaded, downloaded, trained or
    written."""
    def work(*a, **k):
        raise AssertionError('loaded or downloaded before the bad flag was reported')
    monkeypatch.setattr(data, 'load', work)
    monkeypatch.setattr(train, 'vit_b_16', work)
    (tmp_path / 'FILE').write_text('x')
    (tmp_path / 'READONLY').mkdir(mode=0o500)
    (tmp_path / 'LOOP').symlink_to(tmp_path / 'LOOP')
    before = sorted(tmp_path.rglob('*'))
    argv = [str(tmp_path / a) if a.split('/')[0] in ('FILE', 'READONLY', 'LOOP') else a for a in argv]
    try:
        code = train.main(FAST + ['--out', str(tmp_path / 'run')] + argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if 'error:' in line]
    assert code == 2 and err.splitlines() == errors and len(errors) == 1 and flag in errors[0], err  # one line
    assert 'epoch' not in out and sorted(tmp_path.rglob('*')) == before and (tmp_path / 'FILE').read_text() == 'x'


@pytest.mark.parametrize('argv, flag', [
    (['--ca-lr', '-1'], '--ca-lr'), (['--ca-lr', 'nan'], '--ca-lr'), (['--prompt-layers', '0'], '--prompt-layers'),
    (['--prompt-layers', '5'], '--prompt-layers'),                     # the tiny demo ViT has 4 blocks
    (['--arch', 'vit_b_16', '--weights', 'FILE.pth'], '--weights'), (['--arch', 'vit_b_16', '--weights', 'NOPE'], '--weights'),
    (['--bogus'], '--bogus'), (['--lr', 'inf'], '--lr'), (['--eps', 'inf'], '--eps'), (['--timeout', 'inf'], '--timeout'),
    (['--timeout', '1e300'], '--timeout'), (['--seeds', '0', '0'], '--seeds'), (['--seeds', str(2**64)], '--seeds'),
])
def test_more_bad_flags_fail_first_in_one_line(argv, flag, tmp_path, monkeypatch, capsys):
    test_bad_flags_fail_before_any_work([a.replace('FILE', str(tmp_path / 'missing')) for a in argv], flag, tmp_path,
                                        monkeypatch, capsys)


def test_a_bad_weights_file_is_read_before_any_data(tmp_path, monkeypatch, capsys):
    (tmp_path / 'bad.pth').write_bytes(b'not a checkpoint')
    monkeypatch.setattr(data, 'load', lambda *a, **k: pytest.fail('data loaded before the weights file was read'))
    assert train.main(FAST + ['--arch', 'vit_b_16', '--prompt-layers', '2', '--weights', str(tmp_path / 'bad.pth'),
                              '--out', str(tmp_path / 'run')]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: {tmp_path / "bad.pth"}: not a PyTorch checkpoint') and err.count('\n') == 1
    assert not (tmp_path / 'run').exists()


def test_failed_download_leaves_nothing(cifar_dir, tmp_path, monkeypatch, capsys):
    C = torchvision.datasets.CIFAR100
    url, _ = archive(cifar_dir, ['cifar-100-python'], tmp_path / 'c.tar.gz')
    for bad_url, md5 in [(url + '.gone', C.tgz_md5), (url, C.tgz_md5)]:  # no file; a file with the wrong md5
        monkeypatch.setattr(C, 'url', bad_url)
        d, out = tmp_path / 'data', tmp_path / 'run'
        assert train.main(['--dataset', 'cifar100', '--data-dir', str(d), '--out', str(out), '--weights', 'none']) == 2
        err = capsys.readouterr().err.splitlines()[-1]  # after torch.hub's progress bar
        assert err.startswith(f'error: download of {bad_url} to {d / C.filename} failed')
        assert not out.exists() and not list(d.iterdir())


@pytest.mark.parametrize('argv, flag', [
    (['--dataset', 'cifar100', '--data-dir', 'LOOP'], '--data-dir'),
    (['--dataset', 'cifar100', '--data-dir', 'FILE/x'], '--data-dir'), (['--out', 'LOOP'], '--out'),
    (['--lr', '1e38'], '--lr'), (['--ca-lr', '1e38'], '--ca-lr'), (['--eps', '1e39'], '--eps'),
    (['--router-weight', '1e39'], '--router-weight'), (['--proto-weight', '1e39'], '--proto-weight'),
])
def test_paths_the_os_refuses_and_float32_overflows_fail_first(argv, flag, tmp_path, monkeypatch, capsys):
    """A loop of links or a file on the way of a path flag, and values that overflow float32 where they are used
    (5 x --lr, 10 x --ca-lr): one line naming the flag, before any work."""
    test_bad_flags_fail_before_any_work(argv, flag, tmp_path, monkeypatch, capsys)


def test_help_gives_every_flag_a_line(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(['--help'])
    text = capsys.readouterr().out
    blocks = [b for b in re.split(r'\n(?=  -)', text.split('options:')[1].split('\n\n')[0]) if b.strip()]
    for block in blocks:
        flag, *rest = block.split(maxsplit=1)
        words = re.sub(r'^[A-Z_{},\-a-z0-9]*\s*', '', rest[0]) if rest else ''  # after the metavar
        assert len(re.findall(r'[a-z]{3,}', words)) >= 2, f'{flag} has no help text'
    for flag, value in [('--batch-size', 128), ('--lr', 0.005), ('--eps', 0.4), ('--router-weight', 1e-05),
                        ('--proto-weight', 1e-05), ('--ca-epochs', 50), ('--ca-ratio', 1)]:
        block = next(b for b in blocks if b.split()[0] == flag)
        assert f'cifar100: {value}' in ' '.join(block.split()), block
    assert 'shown: the CIFAR-100 row' in text



# -----------------------------------------------------------------------------
# torchrun

def test_timeout_reaches_the_process_group(monkeypatch):
    from datetime import timedelta
    seen = {}

    class Stop(Exception):
        pass

    def init(backend, **kw):
        seen.update(kw, backend=backend)
        raise Stop
    monkeypatch.setattr(train.dist, 'init_process_group', init)
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(Stop):
        train.main(FAST + ['--timeout', '0.5'])
    assert seen == dict(backend='gloo', timeout=timedelta(seconds=30))
    assert train.parse_args([]).timeout == 30


def test_torchrun_two_processes_match_one(tmp_path):
    """2 CPU processes (gloo) vs 1, same global batch, augmentation off. Each rank runs half of every global batch,
    so matmuls see other shapes and DDP sums gradients in another order: parameters then differ by float32
    rounding (~1e-7 relative per step) and nothing else. Accuracy and usage counts are discrete and agree
    exactly; class statistics agree to 1e-5 (their values are O(1), so this is still ~100x the rounding seen)."""
    args = FAST + ['--tasks', '10', '--no-augment', '--stop-after', '3']
    run_train(tmp_path, *args[len(FAST):], name='one')  # 1 process: this one
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py']
    r = subprocess.run(cmd + args + ['--out', str(tmp_path / 'two')], env=dict(os.environ, OMP_NUM_THREADS='1'),
                       capture_output=True, text=True, timeout=110, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    one, two = (torch.load(tmp_path / d / 'seed0' / 'checkpoint.pt', weights_only=False) for d in ('one', 'two'))
    assert one['metrics']['world_size'] == 1 and two['metrics']['world_size'] == 2
    assert one['metrics']['acc'] == two['metrics']['acc']
    assert torch.equal(one['prompt']['usage'], two['prompt']['usage']) and one['prompt']['usage'].sum() > 0
    assert torch.equal(one['prompt']['frequent'], two['prompt']['frequent'])
    for k in ('mean', 'var'):
        assert torch.allclose(one['stats'][k], two['stats'][k], rtol=0, atol=1e-5)
    for k in ('keys', 'values'):
        assert torch.allclose(one['prompt'][k], two['prompt'][k], rtol=0, atol=1e-5)


def test_torchrun_downloads_in_turn_and_stops_together(cifar_dir, tmp_path):
    """2 ranks on a fresh machine: they download CIFAR-100 (a file:// archive) without racing each other; then rank 1
    alone sees a non-finite loss at the last step of an epoch, and both ranks stop there; one line says so."""
    url, md5 = archive(cifar_dir, ['cifar-100-python'], tmp_path / 'c.tar.gz')
    script = tmp_path / 'run.py'
    script.write_text(f"""import os, sys, torch, torchvision
sys.path.insert(0, {str(Path(__file__).parent)!r})
import train
torchvision.datasets.CIFAR100.url, torchvision.datasets.CIFAR100.tgz_md5 = {url!r}, {md5!r}
# the fake pickles cannot match torchvision's md5 of the real ones: check that they exist
torchvision.datasets.cifar.check_integrity = lambda path, md5=None: os.path.isfile(path)
if os.environ['RANK'] == '1':  # 30 images per task, global batch 8: 3 steps per epoch; NaN on the 3rd
    calls, forward = [0], train.Learner.forward
    def nan_third(self, x):
        calls[0] += 1
        logits, router = forward(self, x)
        return logits * (float('nan') if calls[0] == 3 else 1.0), router
    train.Learner.forward = nan_third
sys.exit(train.main(sys.argv[1:]))
""")
    d, out = tmp_path / 'data', tmp_path / 'out'
    args = ['--dataset', 'cifar100', '--data-dir', str(d), '--out', str(out), '--arch', 'tiny', '--weights', 'none',
            '--prompt-layers', '2', '--experts', '8', '--top-k', '2', '--batch-size', '8', '--epochs', '2',
            '--workers', '0', '--no-augment']
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script)]
    r = subprocess.run(cmd + args, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True,
                       timeout=110)
    assert r.returncode != 0
    line = 'error: loss is not finite at task 1, warm-up epoch 1, step 3: lower --lr; no task was completed'
    assert r.stderr.count(line) == 1 and r.stderr.count('error:') == 1, r.stderr[-3000:]
    assert sorted(p.name for p in d.iterdir()) == ['cifar-100-python', 'cifar-100-python.tar.gz'] and not out.exists()


def test_torchrun_released_usage_pass(tmp_path):
    """Under torchrun the released usage pass sums each batch's hits over the ranks before they join `usage`:
    2 ranks count as 1 (each rank alone would see half of every batch)."""
    args = FAST + ['--tasks', '10', '--no-augment', '--stop-after', '2', '--released-quirks']
    one, _ = run_train(tmp_path, *args[len(FAST):], name='one')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py']
    r = subprocess.run(cmd + args + ['--out', str(tmp_path / 'two')], env=dict(os.environ, OMP_NUM_THREADS='1'),
                       capture_output=True, text=True, timeout=110, cwd=os.path.dirname(os.path.abspath(train.__file__)))
    assert r.returncode == 0, r.stderr[-2000:]
    two = torch.load(tmp_path / 'two' / 'seed0' / 'checkpoint.pt', weights_only=False)
    assert two['metrics']['world_size'] == 2 and two['metrics']['acc'] == one['acc']
    assert two['prompt']['usage'].tolist() == one['usage'] and two['prompt']['usage'].sum() == 2 * 4 * 2 * 2 * 192  # L, H, top-2, tasks


def test_torchrun_failing_rank_speaks_last(tmp_path):
    """A resume on 2 ranks in which rank 1 alone fails to load its data: its line is the last any rank prints,
    rank 0 prints no traceback and exits quietly, and torchrun names rank 1 the root cause."""
    script = tmp_path / 'run.py'
    script.write_text(f"""import os, sys
sys.path.insert(0, {REPO!r})
import data, train
if os.environ['RANK'] == '1' and os.environ.get('FAIL'):
    def load(*a, **k):
        raise OSError('download of file:///gone to data/x failed: check the network')
    data.load = load
sys.exit(train.main(sys.argv[1:]))
""")
    _, out = run_train(tmp_path, '--tasks', '10', '--stop-after', '1')  # to resume; made by one process
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script)]
    cmd += FAST + ['--out', out, '--tasks', '10', '--resume']
    env = dict(os.environ, OMP_NUM_THREADS='1', FAIL='1')
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=110)
    assert r.returncode != 0
    lines = r.stderr.splitlines()
    ranks = lines[:next(i for i, line in enumerate(lines) if 'torch/distributed/elastic' in line)]  # before torchrun's
    assert ranks[-1] == 'error: download of file:///gone to data/x failed: check the network', r.stderr[-3000:]
    assert r.stderr.count('error:') == 1 and r.stderr.count('Traceback') == 1 and '[rank' not in r.stderr  # 1: torchrun's
    root = r.stderr.split('Root Cause')[1]
    assert 'rank      : 1 (local_rank: 1)' in root and 'exitcode  : 2' in root, root


def failing_rank(tmp_path, body, t, *extra):
    """torchrun with 2 ranks, FAST on 10 tasks, rank 1 running `body` at the start of task t + 1's statistics:
    the run must fail; its stderr."""
    script = tmp_path / 'run.py'
    script.write_text(f"""import os, sys, time
sys.path.insert(0, {REPO!r})
import train
if os.environ['RANK'] == '1':
    statistics = train.class_statistics
    def class_statistics(r, task):
        if task.t == {t}:
{body}
        return statistics(r, task)
    train.class_statistics = class_statistics
sys.exit(train.main(sys.argv[1:]))
""")
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script)]
    r = subprocess.run(cmd + FAST + ['--out', str(tmp_path / 'out'), '--tasks', '10', *extra], capture_output=True,
                       text=True, timeout=110, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode != 0
    return r.stderr


def ranks_lines(stderr):  # what the ranks printed, before torchrun's own report
    lines = [line for line in stderr.splitlines() if 'FutureWarning' not in line and 'DistributedDataParallel(' not in line]
    return lines[:next((i for i, line in enumerate(lines) if 'torch/distributed/elastic' in line), len(lines))]


def test_torchrun_a_rank_failing_mid_run_speaks_last(tmp_path):
    """Rank 1 alone meets an unreadable image at task 2's statistics: its one line is the last any rank prints,
    rank 0 (waiting in a collective) exits without a traceback, the run exits non-zero. With the NoRGa gate:
    freezing alpha and tau after task 1 rebuilds DDP, which would otherwise wait for their gradients in task 2."""
    err = failing_rank(tmp_path, "            raise ValueError('/data/x.jpg: not a readable image (truncated or "
                       "corrupt?): replace it, then --resume')", 1, '--stop-after', '2', '--gate', 'tanh')
    assert ranks_lines(err)[-1] == ('error: /data/x.jpg: not a readable image (truncated or corrupt?): '
                                    'replace it, then --resume'), err[-3000:]
    assert err.count('error:') == 1 and err.count('Traceback') == 1  # torchrun's own
    assert torch.load(tmp_path / 'out' / 'seed0' / 'checkpoint.pt', weights_only=False)['task'] == 1


def test_torchrun_a_rank_that_stops_answering_is_named(tmp_path):
    """Rank 1 freezes at task 1's statistics: after --timeout rank 0 says which rank did not answer, in one line,
    with no traceback."""
    err = failing_rank(tmp_path, '            time.sleep(300)', 0, '--stop-after', '1', '--timeout', '0.1')
    assert ranks_lines(err)[-1] == ('error: rank 1 did not answer within --timeout 0.1 minutes: see its '
                                    'output, or raise --timeout'), err[-3000:]
    assert err.count('error:') == 1 and err.count('Traceback') == 1



# -----------------------------------------------------------------------------
# GPU-readiness: no host sync in a step, one graph, the pretend GPU

def test_no_host_sync_in_a_training_step(tmp_path, monkeypatch):
    """No op of a training step of train.py on tasks 1 and 2 (batch indexing, losses, backward, AdamW) makes a GPU
    wait for the host. CPU's for-loop AdamW reads its step count with .item(), from a host tensor (on CUDA too; there
    train.py's fused AdamW keeps it on the GPU and reads nothing): those reads are told apart, and must be seen."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    opts, steps, batches = [], [], data.batches
    hook = register_optimizer_step_pre_hook(lambda opt, a, kw: opts.append(opt))

    def counted(*a, **kw):  # training batches: counts from a batch's arrival to the request for the next
        for b in batches(*a, **kw):
            with bench.Ops() as ops:
                yield b
            steps.append(ops)
    monkeypatch.setattr(data, 'batches', lambda *a, **kw: (counted if kw.get('drop_last') else batches)(*a, **kw))
    try:
        run_train(tmp_path, '--stop-after', '2')
    finally:
        hook.remove()
    counters = {id(state['step']) for opt in opts for state in opt.state.values()}
    assert len(steps) == 3 * (400 // 32) and all(ops.ops > 500 for ops in steps)  # warm-up, task 1, task 2
    assert all(any(id(a) in counters for _, a in ops.syncs) for ops in steps)
    assert [name for ops in steps for name, a in ops.syncs if id(a) not in counters] == []


def test_training_loss_is_one_graph(base_run, tmp_path, monkeypatch):
    """train.step_loss (prompted forward, masked CE, router and prototype losses) on task 2's state is one graph.
    --compile compiles it: no graph is compiled after the first step of a phase, none after task 2 (the class range
    becomes dynamic on task 2; evaluation's graphs are the backbone's), and it trains as eager does."""
    torch.manual_seed(0)
    model = train.Learner(ViT(**train.TINY), prompt_in_state(4, 24), 50).train()
    x, y = torch.rand(4, 3, 32, 32), torch.randint(10, 20, (4,))
    explained = torch._dynamo.explain(train.step_loss)(model, model.prompt, x, y, 10, 20, train.parse_args(FAST))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    graphs, marks, late, compile, batches = [], [], [], torch.compile, data.batches

    def backend(gm, example):  # aot_eager: AOT autograd's graphs, run eagerly (inductor is slow on 2 cores)
        graphs.append(gm)
        return torch._dynamo.lookup_backend('aot_eager')(gm, example)

    def phase(*a, **kw):
        marks.append(len(graphs))
        for j, b in enumerate(batches(*a, **kw)):
            n = len(graphs)
            yield b
            late.append(j and len(graphs) - n)
    monkeypatch.setattr(torch, 'compile', lambda fn: compile(fn, backend=backend))
    monkeypatch.setattr(data, 'batches', lambda *a, **kw: (phase if kw.get('drop_last') else batches)(*a, **kw))
    torch._dynamo.reset()
    m, _ = run_train(tmp_path, '--compile', '--stop-after', '3')
    assert len(marks) == 4 and marks[0] == 0 and 0 < marks[1] < marks[3] == len(graphs) and not any(late)
    assert m['acc'] == base_run[0]['acc'][:3]


class OnGPU(torch.Tensor):
    """A host tensor that reports cuda:0; its data and autograd are the host tensor's."""


class PretendGPU(torch.overrides.TorchFunctionMode):
    """--device cuda on a machine without a GPU. Tensors made on or moved to 'cuda' become OnGPU, and so does what
    is computed from them. What a GPU would refuse goes to `mixed`: an op between OnGPU and host tensors that are
    not 0-dim (indexing with host indices and copies excepted, as on CUDA), a CPU generator drawing on the device.
    Every host read of an OnGPU tensor (.cpu(), .item(), .tolist(), bool(), formatting) goes to `events`."""
    READS = ('item', 'tolist', 'numpy', '__bool__', '__int__', '__float__', '__index__', '__format__')

    def __init__(self):
        super().__init__()
        self.mixed, self.events = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs, name = dict(kwargs or {}), getattr(func, '__name__', '')
        base = args[0] if args and isinstance(args[0], torch.Tensor) else None
        on = isinstance(base, OnGPU)
        if on and func in (torch.Tensor.device.__get__, torch.Tensor.is_cuda.__get__):
            return torch.device('cuda', 0) if func == torch.Tensor.device.__get__ else True
        if name in ('pin_memory', 'is_pinned'):  # page-locking host memory needs a driver: taken as done
            return base if name == 'pin_memory' else True
        if name in ('to', 'cuda', 'cpu'):
            target, dtype, _, fmt = (torch._C._nn._parse_to(*args[1:], **kwargs) if name == 'to' else
                                     (torch.device(name), None, None, None))
            with torch._C.DisableTorchFunctionSubclass():
                out = base.to(dtype=dtype or base.dtype, memory_format=fmt or torch.preserve_format)
            if target is not None and torch.device(target).type == 'cpu' and on:
                self.events.append(name)
                return out.as_subclass(torch.Tensor)
            return out.as_subclass(OnGPU) if on or target is not None and torch.device(target).type == 'cuda' else out
        if on and name in self.READS:
            self.events.append(name)
            args = (base.as_subclass(torch.Tensor), *args[1:])
        flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        made_there = kwargs.get('device') is not None and torch.device(kwargs['device']).type == 'cuda'
        there = made_there or any(isinstance(a, OnGPU) for a in flat)
        if kwargs.get('device') is not None:
            kwargs['device'] = 'cpu'
        if there and name not in ('copy_', '__getitem__', '_has_compatible_shallow_copy_type'):
            host = [tuple(a.shape) for a in flat if not isinstance(a, OnGPU) and a.dim() > 0]
            if host or kwargs.get('generator') is not None and kwargs['generator'].device.type != 'cuda':
                self.mixed.append((name, host or 'a CPU generator'))
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        return torch.utils._pytree.tree_map(lambda t: t.as_subclass(OnGPU) if type(t) is torch.Tensor else t,
                                            out) if there else out


@pytest.fixture
def pretend_gpu(monkeypatch):
    """What torch asks of a CUDA driver outside tensor ops, answered as a GPU machine would."""
    monkeypatch.setattr(torch.cuda, '_initialized', True)  # factories with device='cuda' reach the mode
    for fn, value in [('is_available', True), ('device_count', 1), ('synchronize', None),
                      ('max_memory_allocated', 0), ('reset_peak_memory_stats', None)]:
        monkeypatch.setattr(torch.cuda, fn, lambda *a, value=value: value)
    for name in ('_accelerator_graph_capture_health_check', '_cuda_graph_capture_health_check'):  # new, old torch
        monkeypatch.setattr(torch.optim.Optimizer, name, lambda self: None, raising=False)  # asks the driver
    monkeypatch.setattr(torch.__future__, '_overwrite_module_params_on_conversion', True)  # .to(): new Parameters
    load = torch.load

    def load_to(f, map_location=None, **kw):  # map_location='cuda' puts every tensor there, 'cpu' on the host
        there = map_location is not None and torch.device(map_location).type == 'cuda'
        return torch.utils._pytree.tree_map(lambda t: t.as_subclass(OnGPU if there else torch.Tensor)
                                            if isinstance(t, torch.Tensor) else t, load(f, 'cpu', **kw))

    class Generator(torch.Generator):
        def set_state(self, state):  # as torch does for a CPU generator given a state on the GPU
            if isinstance(state, OnGPU):
                raise TypeError('RNG state must be a torch.ByteTensor')
            return super().set_state(state)
    monkeypatch.setattr(torch, 'load', load_to)
    monkeypatch.setattr(torch, 'Generator', Generator)
    return PretendGPU()


def test_pretend_gpu_sees_what_a_gpu_refuses(pretend_gpu):
    g = torch.Generator().manual_seed(0)
    with pretend_gpu:
        a, host = torch.ones(3, device='cuda'), torch.ones(3)
        assert a.device.type == 'cuda' and (a * 2 + torch.tensor(1.0)).is_cuda and not host.is_cuda
        assert (a[torch.tensor([0, 2])] + a.to('cuda')[1:]).is_cuda and pretend_gpu.mixed == []
        a + host, a.index_add_(0, torch.tensor([0]), torch.ones(1, device='cuda'))
        torch.randperm(3, generator=g, device='cuda')
        assert [m[0] for m in pretend_gpu.mixed] == ['add', 'index_add_', 'randperm']
        assert f'{a.sum():.0f}' == '4' and a.tolist() == [2.0, 1.0, 1.0] and not a.cpu().is_cuda
        assert pretend_gpu.events == ['__format__', 'tolist', 'cpu']


CUB_TINY = ['--dataset', 'cub200', '--arch', 'tiny', '--weights', 'none', '--prompt-layers', '2', '--epochs', '1',
            '--batch-size', '2', '--ca-epochs', '1', '--workers', '0', '--no-download']


@pytest.mark.parametrize('dataset', ['synthetic', 'cub200'])
def test_the_whole_protocol_on_a_pretend_gpu(dataset, cub_dir, tmp_path, pretend_gpu, pictures, monkeypatch):
    """train.py --device cuda, run and resumed on a pretend GPU (PretendGPU; its fused AdamW is CPU's), with images
    held as one tensor (synthetic) and as JPEG files (CUB-200 in its layout, DataLoader without workers): every
    parameter, buffer, label and statistic is on the device, no op mixes devices or draws from a CPU generator on
    it, and within an epoch nothing reads the device from the host between one step's loss and the next (not even
    a .tolist() or a print). bf16 autocast, which changes dtypes only, stays off: it would query the driver."""
    held, step_loss, setup = [], train.step_loss, train.setup
    monkeypatch.setattr(train, 'step_loss', lambda *a, **kw: pretend_gpu.events.append('STEP') or step_loss(*a, **kw))
    monkeypatch.setattr(train, 'setup', lambda *a: held.append(setup(*a)) or held[-1])
    args = FAST if dataset == 'synthetic' else CUB_TINY + ['--data-dir', str(cub_dir)]
    cuda = args + ['--device', 'cuda', '--precision', 'fp32', '--out', str(tmp_path / 'run')]
    tasks = 3 if dataset == 'synthetic' else 10  # synthetic: 3 of 5 (its tasks are the slow ones here)
    with pretend_gpu:
        assert train.main(cuda + ['--stop-after', '2']) == 0
        assert train.main(cuda + ['--resume', '--stop-after', str(tasks)]) == 0
    r = held[-1]
    assert r.device.type == 'cuda' and r.feed['device'].type == 'cuda'
    assert all(type(t) is OnGPU for t in [*r.model.state_dict().values(), r.y_train, r.y_test, *r.stats.values()])
    assert pretend_gpu.mixed == []
    phases, steps = 1 + tasks, (400 // 32 if dataset == 'synthetic' else 4 // 2)  # task 1 has a warm-up
    after_step = ' '.join(pretend_gpu.events).split('STEP')[1:]  # what the host read after each step's loss
    assert len(after_step) == phases * steps and sum(e.strip() == '' for e in after_step) == phases * (steps - 1)
    m = json.loads((tmp_path / 'run' / 'seed0' / 'metrics.json').read_text())
    assert len(m['acc']) == tasks and (m['faa'] > 10 or dataset == 'cub200')  # synthetic: it learns


def test_a_chosen_gpu_is_the_current_one(tmp_path, pretend_gpu, monkeypatch, capsys):
    """--device cuda:1 makes GPU 1 the current device (timing, pinned copies); a GPU this machine lacks is one line."""
    chosen = []
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'set_device', chosen.append)
    with pretend_gpu:
        assert train.main(FAST + ['--device', 'cuda:1', '--precision', 'fp32', '--stop-after', '1',
                                  '--out', str(tmp_path / 'run')]) == 0
        assert train.main(FAST + ['--device', 'cuda:2', '--out', str(tmp_path / 'other')]) == 2
    assert chosen == [torch.device('cuda', 1)] and pretend_gpu.mixed == []
    assert capsys.readouterr().err == 'error: --device cuda:2: torch finds 2 CUDA GPU(s) here, cuda:0 to cuda:1\n'


# -----------------------------------------------------------------------------
# pictures and outputs

def test_usage_picture_and_missing_matplotlib(base_run, pictures, tmp_path, monkeypatch, capsys):
    m, out = base_run
    seed = Path(out, 'seed0')
    usage = torch.tensor(m['usage'])                                   # (L, H, E)
    assert torch.tensor(m['task_usage']).shape == (5, 2, 8)            # tasks x layers x experts
    assert torch.tensor(m['task_usage']).sum(0).tolist() == usage.sum(1).tolist()
    assert all(sum(map(sum, t)) > 0 for t in m['task_usage'])          # every task routed somewhere
    if importlib.util.find_spec('matplotlib') is None:
        pytest.skip('matplotlib is not installed: the pictures are optional')
    for name in ('accuracy.png', 'usage.png'):
        img = torchvision.io.decode_png(torchvision.io.read_file(str(seed / name)))
        assert img.shape[0] in (3, 4) and min(img.shape[1:]) > 100 and img.float().std() > 10
    monkeypatch.setitem(sys.modules, 'matplotlib', None)               # as if it were not installed
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None)
    capsys.readouterr()
    run_train(tmp_path, '--stop-after', '1')
    said = [l for l in capsys.readouterr().out.splitlines() if 'matplotlib' in l]
    assert said == ['accuracy.png and usage.png skipped: matplotlib is not installed (pip install matplotlib)']
    assert not list(Path(tmp_path, 'run', 'seed0').glob('*.png'))


def test_failed_picture_write_leaves_nothing(pictures, tmp_path, monkeypatch, capsys):
    """A full disk while accuracy.png is written: one line, no *.tmp left, task 1's checkpoint kept."""
    figure = pytest.importorskip('matplotlib.figure')

    def full_disk(fig, path, *a, **k):
        Path(path).write_bytes(b'x' * 1000)
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(figure.Figure, 'savefig', full_disk)
    out = tmp_path / 'run'
    assert train.main(FAST + ['--out', str(out), '--stop-after', '1']) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: cannot write {out / "seed0" / "accuracy.png"} (') and err.count('\n') == 1
    assert sorted(p.name for p in (out / 'seed0').iterdir()) == ['checkpoint.pt', 'metrics.json']
    assert torch.load(out / 'seed0' / 'checkpoint.pt', weights_only=False)['task'] == 1


def test_seeds_summary_and_odd_run_folders(base_run, tmp_path, capsys):
    """summary.json names the seeds it averages (those that completed); a file where a seed folder goes is one
    line before any work; a hand-broken metrics.json does not stop a resume (the checkpoint decides); a stopped
    run's FAA says after which task."""
    import shutil
    out = tmp_path / 'run'
    shutil.copytree(base_run[1], out)                                         # seed 0: complete
    assert train.main(FAST + ['--out', str(out), '--seeds', '0', '1', '2', '--resume', '--stop-after', '1']) == 0
    assert 'over seeds' not in capsys.readouterr().out and not (out / 'summary.json').exists()  # one complete
    assert train.main(FAST + ['--out', str(out), '--seeds', '0', '1', '--resume']) == 0
    summary, said = json.loads((out / 'summary.json').read_text()), capsys.readouterr().out
    assert summary['seeds'] == [0, 1] and len(summary['faa']['per_seed']) == 2 and 'over seeds [0, 1]' in said
    assert 'FAA' in said and '(after task' not in said
    (out / 'seed2' / 'metrics.json').write_text('{"config": null}')
    assert train.main(FAST + ['--out', str(out), '--seeds', '2', '--resume', '--stop-after', '2']) == 0
    assert 'FAA' in (said := capsys.readouterr().out) and '(after task 2 of 5)' in said
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'seed0').write_text('precious')
    assert train.main(FAST + ['--out', str(tmp_path / 'other')]) == 2
    assert capsys.readouterr().err == f'error: {tmp_path / "other" / "seed0"} is not a folder: move it away, or ' \
                                      'choose another --out\n'
    assert (tmp_path / 'other' / 'seed0').read_text() == 'precious'


def test_a_vit_b_16_on_a_cpu_says_how_long(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, 'vit_b_16', lambda w, download: ViT(**train.TINY))  # a ViT-B/16 as far as train.py knows
    run_train(tmp_path, '--arch', 'vit_b_16', '--weights', 'none', '--prompt-layers', '2', '--stop-after', '1')
    out = capsys.readouterr().out.splitlines()
    line = next(i for i, s in enumerate(out) if s.startswith('ViT-B/16 on a CPU: this run takes about'))
    assert 'python train.py --dataset synthetic' in out[line] and 'epoch 1/' in out[line + 1]
    assert sum('ViT-B/16 on a CPU' in s for s in out) == 1 and 'FAA' in out[-3]
    run_train(tmp_path, '--stop-after', '1', name='tiny')
    assert 'ViT-B/16 on a CPU' not in capsys.readouterr().out


def test_the_last_line_names_the_folder(tmp_path, capsys):
    run_train(tmp_path, '--stop-after', '1')
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f'results in {tmp_path / "run" / "seed0"} (a second run there needs --resume or another --out)'


def test_pictures_say_what_every_mark_means(pictures, tmp_path, monkeypatch):
    pytest.importorskip('matplotlib')
    figures = {}

    def keep(obj, path):
        if path.endswith('.png'):
            figures[os.path.basename(path)] = obj
        else:
            save(obj, path)
    save = train.atomic_save
    monkeypatch.setattr(train, 'atomic_save', keep)
    m, _ = run_train(tmp_path, '--stop-after', '2')
    acc = figures['accuracy.png'].axes[0]
    assert acc.get_title() == f"synthetic, seed 0\nFAA {m['faa']:.2f}"
    usage = figures['usage.png']
    assert usage._suptitle.get_text().startswith('synthetic, seed 0: expert usage after task 2')
    panels = [ax for ax in usage.axes if ax.get_ylabel()]
    assert [ax.get_title(loc='left') for ax in panels] == ['block 0', 'block 1']  # as SPEC.md and the printed lines
    assert all(ax.get_ylabel() == 'top-K hits' for ax in panels)
    assert [t.get_text() for t in panels[-1].get_xticklabels()] == [str(e) for e in range(8)]  # every expert
    labels = [t.get_text() for t in usage.legends[0].get_texts()]
    assert labels[:2] == ['in U (frequently used), all heads', 'in U (frequently used), half the heads']
    assert labels[2:] == ['task 1', 'task 2']



# ------------------------------------------------------------ bench.py

def test_bench_smoke(tmp_path, capsys):
    # CI's smoke run of the real ViT-B/16 benchmark: every variant timed, finite and positive
    path = tmp_path / 'bench.json'
    res = bench.main(['--device', 'cpu', '--quick', '--warmup', '0', '--json', str(path)])
    out = capsys.readouterr().out
    names = ['a', 'b', 'b_ref', 'c', 'd', 'e', 'f']
    assert set(res['ms']) == set(names)
    assert all(math.isfinite(v) and v > 0 for v in res['ms'].values())
    assert all(math.isfinite(v) and v > 0 for v in res['ratios'].values())
    for k in names:
        assert any(line.split()[:1] == [k] for line in out.splitlines()), k
    assert res['fused_vs_ref_max_abs_diff'] < 1e-4
    assert res['params'] == dict(backbone=85_798_656, prompt=230_400, head=76_900)
    assert json.loads(path.read_text())['ms'] == res['ms']


def test_bench_counts(tmp_path, capsys):
    """bench.py --counts on fake tensors (ViT-B/16 at batch 32 costs nothing): a consistent table."""
    rows = bench.main(['--counts', '--batch-size', '32', '--json', str(tmp_path / 'c.json')])
    out = capsys.readouterr().out
    for p in ('fp32', 'bf16'):
        ours, two, limit = (rows[f'{k} {p}'] for k in ('ours', 'two-pass', 'limit'))
        assert ours['syncs'] == two['syncs'] == limit['syncs'] == 0 and limit['x_limit'] == 1
        assert 0.95 < ours['x_limit'] < 1.05 and 1.4 < two['x_limit'] < 1.6  # two-pass: one more forward (~1/2)
        assert limit['ops'] < ours['ops'] < two['ops'] and ours['launches'] < ours['ops'] and ours['ms'] < two['ms']
    assert rows['ours bf16']['saved_mib'] < rows['ours fp32']['saved_mib'] and 'H100 SXM' in out
    assert all(k in out for k in rows) and json.loads((tmp_path / 'c.json').read_text()) == rows


@pytest.mark.parametrize('argv', [['--repeats', '0'], ['--warmup', '-1'], ['--batch-size', '-1'], ['--threads', '0'],
                                  ['--json', '/nonexistent/x.json'], ['--quick', '--batch-size', '0']])
def test_bench_bad_flags(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2 and argv[-2] in capsys.readouterr().err


# ------------------------------------------------------------ docs

def test_readme_first_screen_and_ci_command():
    root = Path(__file__).resolve().parent
    readme = (root / 'README.md').read_text().splitlines()
    assert len(readme) <= 220
    first = '\n'.join(readme[:60])
    for command in ('pip install -r requirements.txt', 'python train.py --dataset synthetic',
                    'python3 -m pytest -q test_smope.py', 'python train.py --dataset cifar100 --tasks 10'):
        assert command in first, command
    ci = [l for l in (root / '.ci' / 'run').read_text().splitlines() if 'pytest' in l]
    assert ci == ['python3 -m pytest -q test_smope.py']                 # exactly the README's test command


def test_readme_loop_runs(cifar_dir, monkeypatch, capsys):
    """The README's copy-paste continual-learning loop, run as written except for a tiny ViT and prompt, on fake
    CIFAR-100 files in torchvision's layout (so the README's code cannot rot)."""
    readme = (Path(__file__).parent / 'README.md').read_text()
    code = readme.split('## Use smope.py in your own project', 1)[1].split('```python\n', 1)[1].split('```', 1)[0]
    for old, new in [("torchvision.models.vit_b_16(weights='IMAGENET1K_V1')",
                      'torchvision.models.VisionTransformer(32, 8, 2, 4, 64, 128)'),
                     ('SMoPE(layers=6, heads=12, head_dim=64, experts=25, top_k=5)',
                      'SMoPE(layers=2, heads=4, head_dim=16, experts=6, top_k=2)')]:
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    monkeypatch.chdir(cifar_dir)
    (cifar_dir / 'data').symlink_to(cifar_dir)  # the loop reads ./data/cifar-100-python
    torch.manual_seed(0)
    exec(compile(code, 'README.md', 'exec'), {})
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('task ')]
    assert [line.split(':')[0] for line in lines] == [f'task {t}' for t in range(1, 11)]
    assert all(line.endswith(f'over {10 * t} classes') for t, line in enumerate(lines, 1))


def spec_targets(text):
    """SPEC.md's numbered headings '## N. Title', the steps '1.' .. of section 6, and labels '(Eq. N)'."""
    sections, steps, section = set(), set(), None
    for line in text.splitlines():
        if h := re.match(r'## (\d+)\. ', line):
            section = int(h[1])
            sections.add(section)
        elif (s := re.match(r'(\d+)\. ', line)) and section == 6:
            steps.add(int(s[1]))
    return sections, steps, {int(n) for n in re.findall(r'\(Eq\. (\d+)\)', text)}


CITATION = re.compile(r'(SPEC(?:\.md)?,? [Ss]ections? |[Ss]ection |Eqs?\. ?)(\d+)((?:\s*(?:-|–|,|and)\s*\d+)*)'
                      r'(?: step (\d+))?')


def citations(text):
    """(kind, number, step) of every 'SPEC section N [step S]', 'Section N', 'Eq. N' and range in text."""
    for m in CITATION.finditer(text):
        kind = 'eq' if m[1].startswith('Eq') else 'section'
        nums = [int(m[2])] + [int(n) for n in re.findall(r'\d+', m[3])]
        if re.search(r'-|–', m[3] or '') and len(nums) == 2:  # 'Eqs. 2-6', 'sections 6-8'
            nums = list(range(nums[0], nums[1] + 1))
        for n in nums:
            yield kind, n, int(m[4]) if m[4] else None


def test_citations_resolve_in_spec(capsys):
    root = Path(__file__).resolve().parent
    spec = (root / 'SPEC.md').read_text()
    sections, steps, eqs = spec_targets(spec)
    assert sections >= set(range(1, 11)) and steps >= set(range(1, 7)) and eqs >= {1, 2, 3, 4, 5, 6, 7}
    found = []
    for name in ('smope.py', 'vit.py', 'data.py', 'train.py', 'bench.py', 'README.md', 'test_smope.py'):
        text = (root / name).read_text()
        for kind, n, step in citations(text):
            found.append((name, kind, n, step))
            if kind == 'eq':
                assert n in eqs, f'{name} cites Eq. {n}, which SPEC.md does not label'
            else:
                assert n in sections, f'{name} cites section {n}, which SPEC.md does not have'
                assert step is None or (n == 6 and step in steps), f'{name} cites section {n} step {step}'
    assert len(found) > 50                                              # the parser really reads them
    with pytest.raises(SystemExit):
        train.parse_args(['--help'])
    help_text = capsys.readouterr().out
    assert 'SPEC section 6' in help_text and all(n in sections for k, n, _ in citations(help_text))
    # and the check bites: a citation of a section or an equation that does not exist is caught
    bad = list(citations('see SPEC section %d and Eq. %d, Eqs. 2-6, SPEC section 6 step %d' % (12, 9, 9)))
    assert ('section', 12, None) in bad and ('eq', 9, None) in bad and ('eq', 4, None) in bad
    assert ('section', 6, 9) in bad and 9 not in steps and 12 not in sections and 9 not in eqs


def test_no_issue_numbers_in_the_project_files():
    for name in ('smope.py', 'vit.py', 'data.py', 'train.py', 'bench.py', 'test_smope.py', 'README.md', 'SPEC.md'):
        text = Path(REPO, name).read_text()
        assert not re.search(r'issue [0-9]', text, re.I), name

