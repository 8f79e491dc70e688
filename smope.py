"""
SMoPE: sparse mixture of prompt experts for continual learning ("One-Prompt Strikes Back", ICLR 2026),
with the NoRGa non-linear residual gate as an option. Depends on torch only: copy this file.

One shared prefix-tuning prompt is cut into E experts per (prompted layer, head). Expert j of a head is a
key/value pair (P^K_j, P^V_j) in that head's key/value space. Per image, a cheap proxy score (mean query .
key) picks the top-K experts, which join the tokens in the head's softmax: one forward pass. Eq. N: SPEC.md.

Wiring: `attach(vit, prompt)` (bottom of this file) makes block i's attention call `prompt(i, q, k, v)`,
q, k, v: (B, H, N, d), instead of `scaled_dot_product_attention(q, k, v)`. After a forward,
`prompt.router_loss()` gives Eq. 5 for that forward; `prompt.prototype_loss()` gives Eq. 6.

The training loop drives the state:
    prompt.begin_task()          # before each task: grows the frequently-used set U, snapshots keys
    prompt.dense = True/False    # task-1 warm-up (all experts, no noise, no router loss)
    prompt.usage_pass = 'no-exclusion'  # usage pass (Section 5): forwards count raw top-K hits into `hits`,
    prompt.usage_pass = None            # every expert routable; then
    prompt.end_usage_pass()             # adds them to `usage` (all-reduce `hits` first when distributed)
    ('released' instead of 'no-exclusion': the released pass, test-time routing, end_usage_pass() per batch)
All the method remembers between tasks (usage counts F, the set U, the key snapshot) is a buffer, so
state_dict() saves it (the released code keeps it in plain attributes and loses it: SPEC section 9).
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

GATES = {'linear': None, 'tanh': torch.tanh, 'sigmoid': torch.sigmoid, 'gelu': F.gelu}


class SMoPE(nn.Module):

    def __init__(self, layers=6, heads=12, head_dim=64, experts=25, top_k=5, eps=0.4, gate='linear',
                 fused=True):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k must be between 1 and the number of experts ({experts}), got {top_k}")
        if gate not in GATES:
            raise ValueError(f"unknown gate {gate!r}: choose one of {', '.join(GATES)}")
        if eps < 0 or min(layers, heads, head_dim) < 1:
            raise ValueError("eps must be >= 0 and layers, heads, head_dim >= 1")
        self.layers, self.heads, self.head_dim, self.experts = layers, heads, head_dim, experts
        self.top_k, self.eps, self.gate = top_k, eps, gate
        self.dense = False     # all experts active, no noise, no router loss (task-1 warm-up, ablation)
        self.usage_pass = None  # counting top-K hits: None (not counting), 'no-exclusion' or 'released'
        self.fused = fused     # exact fast path (merged expert column + SDPA); False = materialised softmax
        shape = (layers, heads, experts, head_dim)
        self.keys = nn.Parameter(torch.rand(shape))    # P^K: (L, H, E, d), U(0,1) as the released code
        self.values = nn.Parameter(torch.rand(shape))  # P^V: (L, H, E, d)
        if gate != 'linear':  # NoRGa (SPEC section 10): per layer, init 1; callers freeze them after task 1
            self.alpha, self.tau = nn.Parameter(torch.ones(layers)), nn.Parameter(torch.ones(layers))
        self.register_buffer('usage', torch.zeros(layers, heads, experts, dtype=torch.long))  # F (Section 5)
        self.register_buffer('frequent', torch.zeros(layers, heads, experts, dtype=torch.bool))  # U
        self.register_buffer('keys_old', torch.zeros(shape))  # key snapshot for Eq. 6
        self.register_buffer('task', torch.zeros((), dtype=torch.long))  # tasks begun
        self.register_buffer('hits', torch.zeros_like(self.usage), persistent=False)  # this pass's counts
        self._route = []  # per prompted layer of the last training forward: (s, selected, spread)

    def __getstate__(self):  # copies and pickles skip the last forward's routing (it holds autograd graphs)
        return {**self.__dict__, '_route': []}

    def begin_task(self):
        """From task 2 on, U gains every expert whose count reaches the mean of its head's used experts (as
        the released code; the paper's mean is over all: SPEC section 9); keys are snapshotted for Eq. 6."""
        if self.task > 0:
            F_ = self.usage.double()
            mean = F_.sum(-1, keepdim=True) / (F_ > 0).sum(-1, keepdim=True).clamp(min=1)
            self.frequent |= (F_ > 0) & (F_ >= mean)
            self.keys_old.copy_(self.keys.detach())
        self.task += 1

    def forward(self, i, q, k, v):
        """Prompted attention of layer i. q, k, v: (B, H, N, d) -> (B, H, N, d)."""
        B, H, N, d = q.shape
        E, K = self.experts, self.top_k
        # routing in the prompt's dtype (fp32) even under autocast: top-K of near-tied bf16 scores is noise
        with torch.autocast(q.device.type, enabled=False):
            q_mean = q.mean(2, dtype=self.keys.dtype)                  # (B, H, d)  all N tokens, CLS included
            # (B, H, E) Eq. 1, unscaled; a product and a sum, not a matmul that TF32 would round
            s = (q_mean.unsqueeze(2) * self.keys[i]).sum(-1)
            if self.dense or K == E:  # dense mode (SPEC section 3): every expert, no noise, no router loss
                selected = torch.ones_like(s, dtype=torch.bool)
            else:
                spread = (s.amax(-1, keepdim=True) - s.amin(-1, keepdim=True)).detach()  # r: (B, H, 1)
                if self.training:  # adaptive noise on the frequently used experts
                    eps = self.eps * self.frequent[i]
                elif self.usage_pass == 'no-exclusion':  # the counts say how this task routes
                    eps = s.new_zeros(E)
                else:  # released code (its usage pass too): exclude experts never selected (SPEC section 9)
                    eps = 2.0 * (self.usage[i] == 0)
                s_noisy = s.detach() - eps.to(s.dtype) * spread         # (B, H, E)  Eq. 2
                top = s_noisy.topk(K, dim=-1).indices                   # (B, H, K)
                selected = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, True)
                if self.training:  # layers run 0..L-1; a new list at layer 0 spares torch.compile a guard
                    self._route = (self._route[:i] if i else []) + [(s, selected, spread)]
                if self.usage_pass:  # Section 5: top-K of the RAW scores, summed over the batch
                    raw = s.detach().topk(K, dim=-1).indices            # (B, H, K)
                    self.hits[i] += torch.zeros_like(s, dtype=torch.long).scatter_(-1, raw, 1).sum(0)
            g = s / math.sqrt(d)                                        # expert logits of Eq. 3 (un-noised)
            if self.gate != 'linear':  # NoRGa: g + alpha * sigma(tau * g)
                g = g + self.alpha[i] * GATES[self.gate](self.tau[i] * g)
            g = g.masked_fill(~selected, float('-inf'))                 # unselected: absent from the softmax
            if self.fused:
                # Section 3: selected experts have the same logit for every query token, so they merge into
                # ONE key/value column with logit logsumexp(g) and value softmax(g) @ P^V
                lse = g.logsumexp(-1)                                   # (B, H)
                pv = torch.einsum('bhe,hed->bhd', g.softmax(-1), self.values[i])  # (B, H, d)
        if self.fused:
            # lse enters through an extra key dimension met by a constant 1 in every query, not a float mask
            # (flash takes no mask, CPU's fused kernel none with a gradient), so SDPA stays fused both ways.
            q2 = F.pad(q, (0, 8))                                       # (B, H, N, d+8): head dims x8
            q2[..., d] = 1
            k2 = F.pad(k, (0, 8, 1, 0))                                 # (B, H, 1+N, d+8)  row 0: merged key
            k2[:, :, 0, d] = lse * math.sqrt(d)                         # so that its logit is exactly lse
            v2 = F.pad(v, (0, 8, 1, 0))                                 # fused kernels want equal head dims
            v2[:, :, 0, :d] = pv
            return F.scaled_dot_product_attention(q2, k2, v2, scale=1 / math.sqrt(d))[..., :d]
        # Eq. 3 written out: every token attends over [selected experts ; all tokens]
        logits = torch.cat([g.to(q.dtype).unsqueeze(2).expand(B, H, N, E),
                            q @ k.transpose(-2, -1) / math.sqrt(d)], -1)  # (B, H, N, E+N)
        vals = torch.cat([self.values[i].to(v.dtype).expand(B, H, E, d), v], 2)  # (B, H, E+N, d)
        return logits.softmax(-1) @ vals

    def router_loss(self):
        """Eq. 5 for the last training forward: cross-entropy of the scores with margin eps * spread on the
        unselected experts, summed over the K selected targets and over layers and heads, batch-averaged."""
        if self.dense or not self.training or not self._route:
            return self.keys.new_zeros(())
        s, selected, spread = (torch.stack(t) for t in zip(*self._route))  # (L, B, H, E), ..., (L, B, H, 1)
        logp = (s + torch.where(selected, 0.0, self.eps * spread)).log_softmax(-1)  # margin on the unselected
        return -(logp * selected).sum(-1).mean(1).sum()

    def prototype_loss(self):
        """Eq. 6: the snapshotted keys of the experts in U are prototype queries; their top-K routing over
        the snapshotted keys is the target of their routing over the current keys. Averaged over prototypes,
        summed over targets, layers, heads. Zero while U is empty, by no branch on tensor values (no sync)."""
        old = self.keys_old                                             # (L, H, E, d)  rows = prototypes D
        targets = (old @ old.transpose(-2, -1)).topk(self.top_k, -1).indices  # (L, H, E, K)
        logp = (old @ self.keys.transpose(-2, -1)).log_softmax(-1)      # (L, H, E rows, E experts)
        nll = -logp.gather(-1, targets).sum(-1)                         # (L, H, E rows)
        rows = self.frequent.float()                                    # only rows j in U are prototypes
        return ((nll * rows).sum(-1) / rows.sum(-1).clamp(min=1)).sum()

    def end_usage_pass(self):
        self.usage += self.hits
        self.hits.zero_()

    def usage_shares(self):
        """Fraction of top-K hits per expert, (L, H, E): a quick view of which experts each head uses."""
        return self.usage.double() / self.usage.sum(-1, keepdim=True).clamp(min=1)


# -----------------------------------------------------------------------------
# attach: the same wiring inside other people's ViTs

def attach(model, prompt):
    """Route the first `prompt.layers` attention layers of `model` through `prompt` (returns `model`), so its
    own forward runs SMoPE. Understands timm-style ViTs (`blocks[i].attn` with `qkv`, `num_heads`, `proj`,
    where present `q_norm`, `k_norm`, `norm`, `attn_drop`, `proj_drop`; vit.ViT is one) and torchvision's
    VisionTransformer (`encoder.layers[i].self_attention`). The prompt becomes `model.smope` (.to(), .train(),
    .eval() reach it): freeze the backbone BEFORE attaching. Attach again to replace it, None to remove it."""
    if hasattr(model, 'blocks'):
        attns, forward = [getattr(b, 'attn', None) for b in model.blocks], _timm_attention
    elif hasattr(getattr(model, 'encoder', None), 'layers'):
        attns, forward = [b.self_attention for b in model.encoder.layers], _torchvision_attention
    else:
        raise ValueError(f'attach: {type(model).__name__} has neither blocks[i].attn (timm-style ViT) nor '
                         'encoder.layers[i].self_attention (torchvision VisionTransformer)')
    layers = 0 if prompt is None else prompt.layers
    if len(attns) < layers:
        raise ValueError(f'attach: the prompt has {layers} layers, {type(model).__name__} '
                         f'{len(attns)} blocks')
    for i, a in enumerate(attns[:layers]):
        found, want = _shape(a), (prompt.heads, prompt.head_dim, 0.0)
        if found != want:  # dropout too: the merged expert column (Section 3) cannot drop single experts
            raise ValueError(f'attach: block {i} attention ({type(a).__name__}) has (heads, head dim, '
                             f'dropout) {found}; the prompt needs {want}')
    for i, a in enumerate(attns):
        for name in ('forward', 'smope_layer'):  # undo a previous attach
            a.__dict__.pop(name, None)
        if i < layers:
            a.forward, a.smope_layer = functools.partial(forward, a), (prompt, i)  # partial: picklable
    model._modules.pop('smope', None)
    if prompt is not None:
        model.smope = prompt
    return model


def _shape(a):  # (heads, head dim, attention dropout) of an attention attach can route, else what it lacks
    if isinstance(a, nn.MultiheadAttention):
        plain = a.batch_first and a._qkv_same_embed_dim and a.bias_k is None and not a.add_zero_attn
        return (a.num_heads, a.head_dim, float(a.dropout)) if plain else 'not plain batch_first self-attn'
    if not all(hasattr(a, n) for n in ('qkv', 'proj', 'num_heads')) or not isinstance(a.qkv, nn.Linear):
        return 'no qkv Linear, num_heads and proj'
    # anything else (BEiT/EVA's q_bias, relative position tables, RoPE, timm's output gate) would be dropped
    known = {'qkv', 'proj', 'q_norm', 'k_norm', 'norm', 'attn_drop', 'proj_drop'}
    own = [n for n, _ in a.named_parameters(recurse=False)] + [n for n, _ in a.named_buffers(recurse=False)]
    extra = sorted({n for n, _ in a.named_children()} - known | set(own))
    d = a.qkv.out_features // (3 * a.num_heads)
    if extra or abs(getattr(a, 'scale', d ** -0.5) - d ** -0.5) > 1e-9:
        return f'parts attach does not route: {", ".join(extra) or "a scale other than head_dim ** -0.5"}'
    return a.num_heads, d, float(getattr(getattr(a, 'attn_drop', None), 'p', 0))


def _timm_attention(self, x, attn_mask=None, is_causal=False):
    prompt, i = self.smope_layer
    if attn_mask is not None or is_causal:
        raise ValueError('SMoPE attention is self-attention without masks')
    B, N, _ = x.shape
    q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, N, d) each
    q, k = getattr(self, 'q_norm', nn.Identity())(q), getattr(self, 'k_norm', nn.Identity())(k)
    x = getattr(self, 'norm', nn.Identity())(prompt(i, q, k, v).transpose(1, 2).reshape(B, N, -1))
    return getattr(self, 'proj_drop', nn.Identity())(self.proj(x))


def _torchvision_attention(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                           average_attn_weights=True, is_causal=False):
    prompt, i = self.smope_layer
    if not query is key is value or key_padding_mask is not None or attn_mask is not None or is_causal:
        raise ValueError('SMoPE attention is self-attention without masks')
    B, N, W = query.shape
    qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)   # rows [q; k; v], as timm's qkv
    q, k, v = qkv.view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    return self.out_proj(prompt(i, q, k, v).transpose(1, 2).reshape(B, N, W)), None
