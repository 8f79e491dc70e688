"""CPU tests for vit.py: torchvision parity, timm layout, pos-embed resizing, load errors, prompt hook."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.vision_transformer import VisionTransformer

import vit
from vit import ViT, load_weights

TINY = dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128)


def tiny_ours(image_size=32):
    return ViT(image_size=image_size, patch_size=8, width=64, depth=2, heads=4, mlp_dim=128)


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
    return tv, sd, path


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
    tv = VisionTransformer(**TINY)
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
    a, b = load_weights(ViT(), path).eval(), load_weights(ViT(), tmp_path / 'timm.pth').eval()
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


def check_error(exc, match, model, weights):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match) as e:
        load_weights(model, weights)
    assert '\n' not in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded
    return str(e.value)


def test_bad_inputs(tmp_path):
    m = tiny_ours()
    check_error(ValueError, 'unknown weights.*IMAGENET1K_V1', m, 'IMAGENET1K_V7')
    check_error(FileNotFoundError, 'not found', m, tmp_path / 'nope.pth')
    (tmp_path / 'junk.pth').write_bytes(b'\x00garbage\xff' * 100)
    check_error(ValueError, 'not a PyTorch checkpoint', m, tmp_path / 'junk.pth')
    torch.save({'foo.weight': torch.zeros(3)}, tmp_path / 'other.pth')
    check_error(ValueError, 'layout not recognised', m, tmp_path / 'other.pth')
    sd = VisionTransformer(**TINY).state_dict()
    del sd['encoder.layers.encoder_layer_1.mlp.3.bias']
    torch.save(sd, tmp_path / 'missing.pth')
    check_error(ValueError, 'missing blocks.1.mlp.fc2.bias', m, tmp_path / 'missing.pth')
    try:
        import safetensors  # noqa: F401
    except ImportError:
        (tmp_path / 'w.safetensors').write_bytes(b'x')
        check_error(ValueError, 'pip install safetensors', m, tmp_path / 'w.safetensors')


def test_vit_large_guess(tmp_path):
    # only the keys that carry the shapes the guess needs; zeros keep it cheap
    sd = {'patch_embed.proj.weight': torch.zeros(1024, 3, 16, 16), 'cls_token': torch.zeros(1, 1, 1024),
          'pos_embed': torch.zeros(1, 197, 1024), **{f'blocks.{i}.norm1.weight': torch.zeros(1024) for i in range(24)}}
    torch.save(sd, tmp_path / 'large.pth')
    msg = check_error(ValueError, r'patch_embed\.proj\.weight \(1024, 3, 16, 16\).*looks like ViT-L/16', ViT(),
                      tmp_path / 'large.pth')
    assert '24 blocks' in msg


class FakePrompt(nn.Module):
    def __init__(self, layers, zero=False):
        super().__init__()
        self.layers, self.zero, self.calls = layers, zero, []

    def forward(self, i, q, k, v):
        self.calls.append((i, tuple(q.shape)))
        return torch.zeros_like(q) if self.zero else F.scaled_dot_product_attention(q, k, v)


def test_prompt_hook():
    torch.manual_seed(0)
    m = ViT(image_size=32, patch_size=8, width=64, depth=3, heads=4, mlp_dim=128).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base, p = m(x), FakePrompt(1)
        assert torch.equal(m(x, prompt=p), base)
        assert p.calls == [(0, (2, 4, 17, 16))]  # (B,H,N,d), block 0 only
        p2 = FakePrompt(2, zero=True)
        assert not torch.allclose(m(x, prompt=p2), base)
        assert [i for i, _ in p2.calls] == [0, 1]


@pytest.mark.parametrize('name', ['IMAGENET1K_V1', 'IMAGENET1K_SWAG_LINEAR_V1', 'IMAGENET1K_SWAG_E2E_V1'])
def test_enum_names(name):
    enum, mean, std = vit._tv_weights(name)  # reads metadata only, never downloads
    assert isinstance(enum, torchvision.models.ViT_B_16_Weights) and enum.name == name
    assert mean == (0.485, 0.456, 0.406) and std == (0.229, 0.224, 0.225)
