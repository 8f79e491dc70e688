"""
SMoPE: sparse mixture of prompt experts for continual learning ("One-Prompt Strikes Back", ICLR 2026),
with the NoRGa non-linear residual gate as an option. Depends on torch only: copy this file.

One shared prefix-tuning prompt is cut into E experts per (prompted layer, head). Expert j of a head is a
key/value pair (P^K_j, P^V_j) living directly in that head's key/value space. Per image, a cheap proxy
score (mean query . key) picks the top-K experts, which join the tokens in the head's softmax, so one
forward pass suffices. Equation numbers refer to SPEC.md (the project's algorithm reference).

Wiring it into any ViT-style attention (vit.py does exactly this): in block i < prompt.layers, after
computing the per-head q, k, v of shape (B, H, N, d), call `out = prompt(i, q, k, v)` instead of
`scaled_dot_product_attention(q, k, v)`, then merge heads and project as usual. After the forward,
`prompt.router_loss()` gives Eq. 5 for that forward; `prompt.prototype_loss()` gives Eq. 6.

The training loop drives the state:
    prompt.begin_task()          # before each task: grows the frequently-used set U, snapshots keys
    prompt.dense = True/False    # task-1 warm-up (all experts, no noise, no router loss)
    prompt.counting = True       # during the usage pass (Section 5): counts top-K hits of raw scores into
    prompt.end_usage_pass()      # `hits`, then adds them to `usage` (all-reduce `hits` first when distributed)
Everything the method remembers between tasks (usage counts F, the set U, the key snapshot) is a buffer,
so state_dict() saves it. (The released code keeps it in plain attributes and loses it: SPEC section 9.)
"""
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
        if eps < 0 or layers < 1 or heads < 1 or head_dim < 1:
            raise ValueError("eps must be >= 0 and layers, heads, head_dim >= 1")
        self.layers, self.heads, self.head_dim, self.experts = layers, heads, head_dim, experts
        self.top_k, self.eps, self.gate = top_k, eps, gate
        self.dense = False     # all experts active, no noise, no router loss (task-1 warm-up, ablation)
        self.counting = False  # usage pass: add raw top-K hits to `hits`
        self.fused = fused     # exact fast path (merged expert column + SDPA); False = materialised softmax
        shape = (layers, heads, experts, head_dim)
        # U(0,1) init as in the released code
        self.keys = nn.Parameter(torch.rand(shape))    # P^K: (L, H, E, d)
        self.values = nn.Parameter(torch.rand(shape))  # P^V: (L, H, E, d)
        if gate != 'linear':
            # NoRGa (SPEC section 10): alpha and tau per layer, init 1; the caller freezes them after task 1
            self.alpha = nn.Parameter(torch.ones(layers))
            self.tau = nn.Parameter(torch.ones(layers))
        self.register_buffer('usage', torch.zeros(layers, heads, experts, dtype=torch.long))  # F (Section 5)
        self.register_buffer('frequent', torch.zeros(layers, heads, experts, dtype=torch.bool))  # U
        self.register_buffer('keys_old', torch.zeros(shape))  # key snapshot for Eq. 6
        self.register_buffer('task', torch.zeros((), dtype=torch.long))  # tasks begun
        # counts of the running usage pass, kept apart so that distributed runs can sum them over
        # processes before they join `usage` (end_usage_pass)
        self.register_buffer('hits', torch.zeros_like(self.usage), persistent=False)
        self._route = []  # per prompted layer of the last training forward: (s, selected, range)

    def begin_task(self):
        """Call before training each task. From task 2 on: U gains every expert whose count reaches the
        mean count of the experts used so far (per layer and head; the released code's threshold, SPEC
        section 9 -- the paper averages over all experts), and the keys are snapshotted for Eq. 6."""
        if self.task > 0:
            F_ = self.usage.double()
            used = (F_ > 0).sum(-1, keepdim=True)
            mean = F_.sum(-1, keepdim=True) / used.clamp(min=1)
            self.frequent |= (F_ > 0) & (F_ >= mean)
            self.keys_old.copy_(self.keys.detach())
        self.task += 1

    def forward(self, i, q, k, v):
        """Prompted attention of layer i. q, k, v: (B, H, N, d) -> (B, H, N, d)."""
        B, H, N, d = q.shape
        E, K = self.experts, self.top_k
        # routing in the prompt's dtype (fp32) even under bf16 autocast: top-K of near-tied bf16 scores is noise
        with torch.autocast(q.device.type, enabled=False):
            q_mean = q.mean(2, dtype=self.keys.dtype)                  # (B, H, d)  all N tokens, CLS included
            s = torch.einsum('bhd,hed->bhe', q_mean, self.keys[i])    # (B, H, E)  Eq. 1, unscaled
            if self.dense or K == E:  # dense mode (SPEC section 3): every expert, no noise, no router loss
                selected = torch.ones_like(s, dtype=torch.bool)
            else:
                rng = (s.amax(-1, keepdim=True) - s.amin(-1, keepdim=True)).detach()  # (B, H, 1)
                if self.training:  # adaptive noise on the frequently used experts
                    eps = self.eps * self.frequent[i]
                elif self.counting:  # usage pass: no exclusion, so the counts say how this task itself routes
                    eps = s.new_zeros(E)
                else:                # released code only: exclude experts no task ever selected (SPEC section 9)
                    eps = 2.0 * (self.usage[i] == 0)
                s_noisy = s.detach() - eps.to(s.dtype) * rng            # (B, H, E)  Eq. 2
                top = s_noisy.topk(K, dim=-1).indices                   # (B, H, K)
                selected = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, True)
                if self.training:  # layers run in order 0..L-1, so layer 0 starts a fresh list
                    self._route = self._route[:i] + [(s, selected, rng)]
                if self.counting:  # Section 5: top-K of the RAW scores, summed over the batch
                    raw = s.detach().topk(K, dim=-1).indices            # (B, H, K)
                    self.hits[i] += torch.zeros_like(s, dtype=torch.long).scatter_(-1, raw, 1).sum(0)
            g = s / math.sqrt(d)                                        # expert logits of Eq. 3 (un-noised)
            if self.gate != 'linear':  # NoRGa: g + alpha * sigma(tau * g)
                g = g + self.alpha[i] * GATES[self.gate](self.tau[i] * g)
            g = g.masked_fill(~selected, float('-inf'))                 # unselected: absent from the softmax
            if self.fused:
                # Section 3 identity: the selected experts' logits are the same for every query token, so
                # they merge into ONE key/value column with logit logsumexp(g) and value softmax(g) @ P^V.
                lse = g.logsumexp(-1)                                   # (B, H)
                pv = torch.einsum('bhe,hed->bhd', g.softmax(-1), self.values[i])  # (B, H, d)
        if self.fused:
            # the extra key is zero, so its logit q.0 = 0 plus the additive bias lse
            k = torch.cat([k.new_zeros(B, H, 1, d), k], 2)              # (B, H, N+1, d)
            v = torch.cat([pv.to(v.dtype).unsqueeze(2), v], 2)          # (B, H, N+1, d)
            bias = F.pad(lse.to(q.dtype).view(B, H, 1, 1), (0, N))      # (B, H, 1, N+1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        # Eq. 3 written out: every token attends over [selected experts ; all tokens]
        logits = torch.cat([g.to(q.dtype).unsqueeze(2).expand(B, H, N, E),
                            q @ k.transpose(-2, -1) / math.sqrt(d)], -1)  # (B, H, N, E+N)
        vals = torch.cat([self.values[i].to(v.dtype).expand(B, H, E, d), v], 2)  # (B, H, E+N, d)
        return logits.softmax(-1) @ vals

    def router_loss(self):
        """Eq. 5 for the last training forward: for each prompted layer and head, the cross-entropy of the
        scores with margin eps * range on the unselected experts, summed over the K selected targets,
        averaged over the batch, summed over layers and heads. Zero in dense mode and in eval mode."""
        if self.dense or not self.training or not self._route:
            return self.keys.new_zeros(())
        s, selected, rng = (torch.stack(t) for t in zip(*self._route))  # (L, B, H, E), ..., (L, B, H, 1)
        margin = torch.where(selected, 0.0, self.eps * rng)
        logp = (s + margin).log_softmax(-1)
        return -(logp * selected).sum(-1).mean(1).sum()

    def prototype_loss(self):
        """Eq. 6: the snapshotted keys of frequently used experts act as prototype queries; their top-K
        routing over the snapshotted keys is the target for their routing over the current keys.
        Averaged over prototype rows, summed over the K targets, layers and heads. Zero on task 1."""
        if self.task < 2 or not self.frequent.any():
            return self.keys.new_zeros(())
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
