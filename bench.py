"""
Speed of SMoPE against its limits on a frozen ViT-B/16 (random init: timing does not depend on weights).

    python bench.py                         # cuda if available, batch 64
    python bench.py --device cpu --quick    # smoke run, well under a minute on 2 idle CPU cores
    python bench.py --precision bf16 --compile --json bench.json
    python bench.py --counts                # FLOPs, ops, host syncs, saved bytes; a projected GPU step

Variants, built once and timed round-robin in one process (drift and thermals hit all alike), medians:
  a      frozen ViT forward, no prompt                      (the inference limit)
  b      SMoPE eval forward, top-5 of 25 experts, 6 layers  (b_ref: the materialised-softmax reference path)
  c      one shared prompt, all experts dense
  d      two-pass baseline: query forward + prompted forward (L2P / DualPrompt / HiDe)
  e      SMoPE training step: forward, CE + router + prototype loss, backward, AdamW
  f      training limit: frozen forward + backward through all blocks, activation gradients only
--counts counts e (fused AdamW), the two-pass step a + e and f in fp32 and bf16 on fake tensors (no GPU):
FLOPs, aten ops, launches (those but views), host syncs, bytes saved for backward; projected on --gpu: ms =
FLOPs / (peak x share reached) + launches x launch cost; memory = weights, gradients, AdamW, batch, saved.
"""
import argparse
import copy
import json
import os
import pathlib
import platform
import resource
import statistics
import time

import torch
from torch.utils import _python_dispatch, flop_counter as fc

import train
from smope import SMoPE, attach
from vit import ViT

SYNCS = {'_local_scalar_dense', 'item', 'is_nonzero', 'equal', 'nonzero', 'masked_select'}  # and unique*


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu', choices=['cpu', 'cuda'])
    a('--precision', default='fp32', choices=['fp32', 'bf16'])
    a('--batch-size', type=int, default=None, help='128 with --counts; 64 on cuda; else 8')
    a('--compile', action='store_true', help='torch.compile the ViT')
    a('--repeats', type=int, default=10, help='timed rounds; medians are reported')
    a('--warmup', type=int, default=None, help='untimed rounds first (2 on cuda, 1 on cpu)')
    a('--threads', type=int, default=None, help='torch.set_num_threads; 1 is the steadiest on a shared host')
    a('--quick', action='store_true', help='batch 2, 1 timed round after 1 warm-up round')
    a('--json', default=None, help='write the results here')
    a('--counts', action='store_true', help='count FLOPs, ops, syncs, saved bytes; project a GPU step')
    a('--gpu', default='H100 SXM,989,495,0.5,4,80', help='--counts: name, dense peak TFLOP/s in bf16 and '
      'TF32, fraction of the peak reached, GPU time per launch (us; gap and tail), memory (GiB)')
    args = p.parse_args(argv)
    for k in ('batch_size', 'repeats', 'warmup', 'threads'):
        if (v := getattr(args, k)) is not None and v < (k != 'warmup'):
            p.error(f"--{k.replace('_', '-')} must be at least {int(k != 'warmup')}, got {v}")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f'--json {args.json}: no such folder')
    args.router_weight = args.proto_weight = 1e-5  # e's loss weights (train.step_loss reads them)
    if args.quick:
        args.batch_size, args.repeats = args.batch_size or 2, 1
    args.batch_size = args.batch_size or (128 if args.counts else 64 if args.device == 'cuda' else 8)
    if args.warmup is None:
        args.warmup = 2 if args.device == 'cuda' and not args.quick else 1
    return args


def main(argv=None):
    args = parse_args(argv)
    res = measure(args)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(res, indent=1))
    return res


def measure(args):
    dev, cuda, B = torch.device(args.device), args.device == 'cuda', args.batch_size
    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(0)
    vit = ViT().to(dev).eval().requires_grad_(False)  # ViT-B/16
    prompt = SMoPE(layers=6, heads=vit.heads, head_dim=vit.head_dim).to(dev).eval()
    # as on task 2: every expert used before (no eval-time exclusion of never-used ones), a frequently-used
    # set and a key snapshot, so the noise and the prototype loss are really computed in the training step
    prompt.begin_task()
    prompt.usage.copy_(torch.randint(1, 10, prompt.usage.shape))
    prompt.begin_task()
    dense, ref, train_prompt = copy.deepcopy(prompt), copy.deepcopy(prompt), copy.deepcopy(prompt).train()
    dense.dense, ref.fused = True, False
    model, fake = train.Learner(vit, train_prompt, 100).to(dev), torch._subclasses.FakeTensorMode()
    model = torch._dynamo.utils.deepcopy_to_fake_tensor(model, fake) if args.counts else model  # shapes only
    vit, train_prompt, head = model.vit, model.prompt, model.head
    opt = torch.optim.AdamW([dict(params=train_prompt.parameters(), lr=5e-3), dict(params=head.parameters(),
                            lr=1e-3)], weight_decay=0.0, fused=cuda or args.counts)  # as train.py on CUDA
    if args.compile:
        torch._dynamo.config.recompile_limit = 32  # one graph per (prompt module, grad mode) pair
        vit.compile()
    with fake if args.counts else torch.device(dev):
        x, y = torch.rand(B, 3, vit.image_size, vit.image_size), torch.randint(0, 100, (B,))
    autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.precision == 'bf16')

    @torch.no_grad()
    def infer(p):  # p None: the bare ViT
        with autocast():
            return attach(vit, p)(x)

    def train_step():  # train.py's: CE over all 100 classes, router and prototype losses weighted 1e-5
        attach(vit, train_prompt)
        opt.zero_grad(set_to_none=True)
        train.step_loss(model, train_prompt, x, y, 0, 100, args)[0].backward()
        opt.step()

    def train_limit():
        # Only the input requires grad: autograd runs the activation backward through all blocks, no weight
        # gradients, as SMoPE's backward must down to block 0 where its first prompt lives. It overshoots a
        # little (block 0's qkv and the patch conv get input gradients too), so e/f errs on the low side.
        with autocast():
            loss = attach(vit, None)(x.detach().requires_grad_(True)).float().square().mean()
        loss.backward()

    # d: the query pass only picks the prompt, so its cost counts here and its result does not
    variants = {'a': lambda: infer(None), 'b': lambda: infer(prompt), 'b_ref': lambda: infer(ref),
                'c': lambda: infer(dense), 'd': lambda: (infer(None), infer(prompt)), 'e': train_step,
                'f': train_limit}
    if args.counts:
        return counts(args, variants, x, model)
    with torch.no_grad():  # exactness, once, in fp32: the fused kernel must reproduce Eq. 3 written out
        diff = (attach(vit, prompt)(x) - attach(vit, ref)(x)).abs().max().item()
    times, peaks = {k: [] for k in variants}, {k: 0 for k in variants}
    for r in range(args.warmup + args.repeats):
        for k, fn in variants.items():  # round-robin: a slow spell of the machine is shared by all variants
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
                peaks[k] = max(peaks[k], torch.cuda.max_memory_allocated())  # includes weights and optimiser
            if r >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    pairs = [('b', 'a'), ('b_ref', 'a'), ('c', 'a'), ('d', 'a'), ('e', 'f')]
    ratios = {f'{n}/{m}': ms[n] / ms[m] for n, m in pairs}
    params = {k: sum(p.numel() for p in m.parameters())
              for k, m in [('backbone', vit), ('prompt', prompt), ('head', head)]}
    info = pathlib.Path('/proc/cpuinfo').read_text().splitlines() if platform.system() == 'Linux' else []
    cpu = [l.split(':', 1)[1].strip() for l in info if l.startswith('model name')]
    name = torch.cuda.get_device_name(dev) if cuda else (cpu + [platform.machine()])[0]
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    res = dict(device=name, torch=torch.__version__, threads=torch.get_num_threads(), batch_size=B,
               precision=args.precision, compile=args.compile, repeats=args.repeats, warmup=args.warmup,
               ms=ms, all_ms={k: [1e3 * t for t in v] for k, v in times.items()},
               images_per_s={k: B / v * 1e3 for k, v in ms.items()}, ratios=ratios, params=params,
               fused_vs_ref_max_abs_diff=diff,
               peak_mem_mb={k: v / 2**20 for k, v in peaks.items()} if cuda else {'process_rss': rss_mb})
    print(f"device {name} | torch {torch.__version__} | threads {res['threads']} | batch {B} | "
          f"{args.precision}{' | compiled' if args.compile else ''} | medians of {args.repeats} after "
          f"{args.warmup} warm-up rounds")
    print(f"{'variant':<8}{'ms/batch':>11}{'images/s':>11}" + (f"{'peak MiB':>11}" if cuda else ''))
    for k in variants:
        peak = f"{peaks[k] / 2**20:>11.0f}" if cuda else ''
        print(f"{k:<8}{ms[k]:>11.1f}{res['images_per_s'][k]:>11.1f}{peak}")
    print('ratios  ' + '  '.join(f'{k} {v:.3f}' for k, v in ratios.items()))
    print('params  ' + '  '.join(f'{k} {v:,}' for k, v in params.items())
          + ('' if cuda else f'\npeak RSS {rss_mb:.0f} MiB (whole process, all variants together)'))
    print(f'fused vs reference (b vs b_ref, fp32): max abs diff {diff:.2e}')
    # a projection, not a measurement (no data loading, no alignment): Split CIFAR-100 trains 1.05e6 images
    # (10 x 5,000 x 20 + task 1's warm-up), forwards 1.55e5 (usage, statistics: 2 x 50,000; eval: 1,000 x 55)
    res['projected_cifar100_s'] = 1.05e6 / res['images_per_s']['e'] + 1.55e5 / res['images_per_s']['b']
    print(f"projected Split CIFAR-100 schedule at these rates: {res['projected_cifar100_s'] / 60:.0f} min")
    return res


class Ops(_python_dispatch.TorchDispatchMode):
    """Counts aten ops, launches (those but views) and as syncs (name, first argument) ops a GPU waits on."""
    ops, launches, syncs = 0, 0, ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name, aten = func._overloadpacket.__name__, func.namespace == 'aten'
        self.ops, self.launches = self.ops + aten, self.launches + (aten and not func.is_view)
        self.syncs += ((name, args[0]),) if aten and (name in SYNCS or 'unique' in name) else ()
        return func(*args, **(kwargs or {}))


def counts(args, v, x, model):
    """--counts (see the top): f, e and a + e in fp32 and bf16 on fake tensors of model (what e trains)."""
    B, rows, lim, (gpu, *spec), aten = len(x), {}, 0, args.gpu.split(','), torch.ops.aten
    bf16, tf32, util, launch_us, hbm = map(float, spec)
    kept = [*model.parameters(), *model.buffers()]  # resident; x 4 what trains: gradients, 2 AdamW moments
    own, state = {t.untyped_storage()._cdata for t in kept}, sum(t.nbytes * 4**t.requires_grad for t in kept)
    flash = {aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__:
             fc.sdpa_flop_count(q, k, v), aten._scaled_dot_product_flash_attention_for_cpu_backward:
             lambda g, q, k, v, *_, **__: fc.sdpa_backward_flop_count(g, q, k, v)}  # CUDA flash's formulas
    with x.fake_mode:  # factories too make fake tensors
        v['e']()  # AdamW creates its state on the first step
        for name, fn in [('limit', v['f']), ('ours', v['e']), ('two-pass', lambda: (v['a'](), v['e']()))]:
            for args.precision in ('fp32', 'bf16'):  # the variants' autocast reads it
                ops, flops, saved = Ops(), fc.FlopCounterMode(display=False, custom_mapping=flash), {}
                pack = lambda t: saved.update({(s := t.untyped_storage())._cdata: s.nbytes()}) or t
                with flops, ops, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    fn()
                mem, flop = sum(n for k, n in saved.items() if k not in own), flops.get_total_flops()
                lim, peak = lim or flop, bf16 if args.precision == 'bf16' else tf32  # limit fp32 comes first
                rows[f'{name} {args.precision}'] = dict(gflop=flop / B / 1e9, x_limit=flop / lim, ops=ops.ops,
                    launches=ops.launches, syncs=len(ops.syncs), saved_mib=mem / B / 2**20, peak_gib=(state
                    + mem + x.nbytes) / 2**30, ms=flop / (peak * 1e9 * util) + ops.launches * launch_us / 1e3)
    print(f'train step, batch {B}, fake tensors, torch {torch.__version__}; per image: gflop, saved_mib; on '
          f'{gpu} ({bf16:g}/{tf32:g} TFLOP/s bf16/TF32 x {util:g}, {launch_us:g} us/launch, {hbm:g} GiB): ms')
    for k, r in [('step', {c: c for c in rows['limit fp32']})] + list(rows.items()):
        print(f'{k:<14}' + ''.join(f'{c if k == "step" else round(c, 2):>10}' for c in r.values()))
    return rows


if __name__ == '__main__':
    main()
