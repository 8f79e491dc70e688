"""Plain ViT with timm's parameter and attribute names (smope.attach routes its attention through a prompt);
loads torchvision weights, timm checkpoints and the released code's backbones by name (SPEC section 7)."""
import collections
import contextlib
import fcntl
import glob
import hashlib
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(width, 3 * width)  # rows [q; k; v], heads contiguous in each
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        B, N, W = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B,H,N,d) each
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, W))


class Block(nn.Module):
    def __init__(self, width, heads, mlp_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(collections.OrderedDict(  # exact GELU, as both timm and torchvision use
            fc1=nn.Linear(width, mlp_dim), act=nn.GELU(), fc2=nn.Linear(mlp_dim, width)))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, image_size=224, patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072):
        super().__init__()
        assert image_size % patch_size == 0 and width % heads == 0
        self.image_size, self.patch_size, self.width, self.depth = image_size, patch_size, width, depth
        self.heads, self.head_dim = heads, width // heads
        self.mean, self.std = HALF  # input normalisation the weights expect
        self.weights_sha256 = None  # of the weights file loaded (load_weights)
        n = (image_size // patch_size) ** 2
        self.patch_embed = nn.Module()  # a bare container so the conv is named patch_embed.proj like timm
        self.patch_embed.proj = nn.Conv2d(3, width, patch_size, patch_size)
        self.cls_token = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, 1, width), std=0.02))
        self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, 1 + n, width), std=0.02))
        self.blocks = nn.ModuleList([Block(width, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B,n,W)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed  # (B,1+n,W)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x[:, 0])  # (B,W)


def vit_b_16(weights=None, image_size=224, download=True):
    return load_weights(ViT(image_size=image_size), weights, download)


# -----------------------------------------------------------------------------
# weights: by name (downloaded once into torch's hub cache) or from a file

IMAGENET, HALF = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5,) * 3, (0.5,) * 3)  # (mean, std)
# SPEC section 7: the released code's backbones, in timm's key layout; no checksums are published for them,
# so the sha256 of the file read is reported. name: (url, file name in torch's hub cache, its (mean, std))
HF = 'https://huggingface.co/timm/vit_base_patch16_224.{}/resolve/main/pytorch_model.bin'
BACKBONES = {
    'sup21k': (HF.format('augreg_in21k'), 'vit_base_patch16_224.augreg_in21k.bin', HALF),
    'sup1k': (HF.format('augreg2_in21k_ft_in1k'), 'vit_base_patch16_224.augreg2_in21k_ft_in1k.bin', HALF),
    'dino1k': ('https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth',
               'dino_vitbase16_pretrain.pth', IMAGENET),
    'ibot1k': ('https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/vitb_16/'
               'checkpoint_teacher.pth', 'ibot_vitb16_checkpoint_teacher.pth', IMAGENET),  # in 'state_dict'
}

_TV_TO_OURS = {  # parts of torchvision's key names -> ours (mlp.linear_N: older files)
    'conv_proj.': 'patch_embed.proj.', 'class_token': 'cls_token', 'encoder.pos_embedding': 'pos_embed',
    'encoder.ln.': 'norm.', 'encoder.layers.encoder_layer_': 'blocks.', '.ln_1.': '.norm1.',
    '.ln_2.': '.norm2.', '.self_attention.in_proj_': '.attn.qkv.', '.self_attention.out_proj.': '.attn.proj.',
    'mlp.0.': 'mlp.fc1.', 'mlp.3.': 'mlp.fc2.', 'mlp.linear_1.': 'mlp.fc1.', 'mlp.linear_2.': 'mlp.fc2.'}


def _tv_weights(name):
    """torchvision enum name -> (enum member, mean, std), without downloading anything."""
    from torchvision.models import ViT_B_16_Weights as W
    if name not in W.__members__:
        raise ValueError(f"unknown weights {name!r}: use None, a checkpoint path, one of "
                         f"{', '.join(BACKBONES)}, or one of {', '.join(W.__members__)}")
    t = W[name].transforms()
    return W[name], tuple(t.mean), tuple(t.std)


def enum_name(weights):  # not a path: a torchvision enum name such as IMAGENET1K_V1
    return not os.path.exists(weights) and not os.path.splitext(weights)[1] and os.sep not in weights


def cached(url, name, download, hash_prefix=None):
    path = os.path.join(torch.hub.get_dir(), 'checkpoints', name)
    if not download and not os.path.isfile(path):
        raise FileNotFoundError(f'{path} not found and downloads are off (--no-download): '
                                f'fetch {url} to that path')
    fetch(url, path, 'sha256', hash_prefix)
    return path


@contextlib.contextmanager
def locked(path):
    """Holds <path>.lock (made with its folder) while fetching path: runs sharing a folder take turns."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:  # a lock file its holder removed while we waited is stale: lock the current one
        f = open(f'{path}.lock', 'a')
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f'waiting for another run fetching {path}', flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        if os.fstat(f.fileno()).st_nlink:
            break
        f.close()
    try:
        yield
    finally:
        os.remove(f.name)  # before unlocking, as the loop above expects
        f.close()


def fetch(url, path, algorithm='sha256', expected=None):
    """Download url to path unless it is there. Runs take turns (locked); the one that downloads first removes
    what killed runs left (path.part, torch.hub's path.part.*.partial), then fetches to path.part and renames
    it once its hash starts with `expected`."""
    if os.path.isfile(path):
        return
    with locked(path):
        if os.path.isfile(path):  # another run fetched it while this one waited its turn
            return
        tmp = f'{path}.part'
        for p in glob.glob(glob.escape(tmp) + '*'):
            os.remove(p)
        try:
            torch.hub.download_url_to_file(url, tmp, progress=True)
            if expected and not (got := checksum(tmp, algorithm)).startswith(expected):
                raise ValueError(f'{algorithm} {got} does not match the expected {expected}')
            os.replace(tmp, path)
        except Exception as e:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise OSError(f"download of {url} to {path} failed ({' '.join(str(e).split())}): check the "
                          "network, or fetch the file to that path yourself") from None


def checksum(path, algorithm='sha256'):
    h = hashlib.new(algorithm)
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path} (give a .pth/.pt/.bin file or a "
                                "weights name)")
    try:
        sd = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}); expected a state dict "
                         "saved with torch.save") from e
    for k in ('state_dict', 'model'):  # training checkpoints often wrap the weights
        if isinstance(sd, dict) and isinstance(sd.get(k), dict):
            sd = sd[k]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    return sd


def _to_ours(sd, src):
    """torchvision or timm key layout -> ours (= timm), classifier heads dropped."""
    # module.: DDP-saved files; backbone.: self-supervised teachers
    sd = {re.sub(r'^(module\.|backbone\.)+', '', k): v for k, v in sd.items() if torch.is_tensor(v)}
    if 'conv_proj.weight' in sd or any(k.startswith('encoder.layers.') for k in sd):
        layout = 'torchvision'
        for part, ours in _TV_TO_OURS.items():
            sd = {k.replace(part, ours): v for k, v in sd.items()}
    elif 'patch_embed.proj.weight' in sd or any(k.startswith('blocks.') for k in sd):
        layout = 'timm'
    else:
        raise ValueError(f"{src}: key layout not recognised as torchvision or timm ViT "
                         f"(first keys: {', '.join(list(sd)[:4])})")
    return {k: v for k, v in sd.items() if not k.startswith(('heads.', 'head.', 'pre_logits.'))}, layout


def _resize_pos(pe, n):
    # (1,1+m,W) -> (1,1+n,W): bicubic on the patch grid, as timm does; the class-token row is kept as is
    s, g = math.isqrt(pe.shape[1] - 1), math.isqrt(n)
    if s * s != pe.shape[1] - 1 or g * g != n:
        return pe  # not a square grid: leave it for the shape check to report
    grid = pe[:, 1:].reshape(1, s, s, -1).permute(0, 3, 1, 2).float()  # (1,W,s,s)
    grid = F.interpolate(grid, size=(g, g), mode='bicubic', align_corners=False, antialias=True)
    return torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, n, -1).to(pe.dtype)], 1)


def load_weights(model, weights, download=True):
    """weights: None (keep random init) | a BACKBONES name | torchvision enum name | checkpoint path. Strict;
    sets model.mean, .std (the normalisation the weights expect), .weights_sha256; untouched on error."""
    if weights is None:
        return model
    path = weights = os.fspath(weights)
    norm = prefix = None  # the (mean, std) a name fixes, else the key layout's; the sha256 prefix of a name
    if weights in BACKBONES:
        url, name, norm = BACKBONES[weights]
        path = cached(url, name, download)
    elif enum_name(weights):
        enum, *norm = _tv_weights(weights)
        name = os.path.basename(enum.url)  # e.g. vit_b_16-c867db91.pth: torch.hub's sha256-prefix convention
        prefix = (found := re.search(r'-([0-9a-f]{6,})\.', name)) and found[1]
        path = cached(enum.url, name, download, prefix)
    digest = checksum(path) if os.path.isfile(path) else None
    if prefix and not digest.startswith(prefix):
        raise ValueError(f'{path}: sha256 {digest} does not start with the {prefix} of its name (a corrupt '
                         'download?): delete it to download it again')
    sd, layout = _to_ours(_read(path), weights)
    mean, std = norm or (IMAGENET if layout == 'torchvision' else HALF)  # timm's augreg ViTs: 0.5/0.5
    ours = model.state_dict()
    pe, want = sd.get('pos_embed'), ours['pos_embed'].shape
    if pe is not None and pe.dim() == 3 and pe.shape != want and pe.shape[2] == want[2]:
        sd['pos_embed'] = _resize_pos(pe, want[1] - 1)  # e.g. SWAG E2E: 24x24 grid -> 14x14
    # check everything before copying anything, so a failed load never leaves a half-loaded model
    bad = [f"{k} {tuple(v.shape)} vs ours {tuple(ours[k].shape)}" for k, v in sd.items()
           if k in ours and v.shape != ours[k].shape]
    bad += [f"missing {k}" for k in ours if k not in sd] + [f"unexpected {k}" for k in sd if k not in ours]
    if bad:
        more = f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""
        raise ValueError(f"{weights}: {layout} checkpoint does not fit ViT(width={model.width}, "
                         f"depth={model.depth}, patch={model.patch_size}): {'; '.join(bad[:4])}{more}; "
                         "build a ViT to match")
    if bad := [k for k, v in sd.items() if v.is_floating_point() and not v.isfinite().all()]:
        raise ValueError(f"{path}: {bad[0]} holds NaN or inf (a corrupt weights file?): replace it")
    model.load_state_dict(sd, strict=True)
    model.mean, model.std, model.weights_sha256 = tuple(mean), tuple(std), digest
    return model
