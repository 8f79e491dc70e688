"""
SMoPE class-incremental training on a frozen ViT (SPEC.md sections 6-8).

    python train.py --dataset synthetic                  # offline demo: tiny ViT, 5 tasks, ~1 min on a laptop CPU
    python train.py --dataset cifar100 --tasks 10        # the paper's recipe (defaults from SPEC.md's table)
    torchrun --nproc_per_node=4 train.py --dataset imagenet-r --tasks 10   # same run on 4 GPUs, same results
"""
import argparse
import json
import math
import os
import resource
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
from smope import SMoPE
from vit import ViT, vit_b_16

# SPEC.md section 8, the released scripts' hyperparameters; hold = iterations at lr 1e-6 before the cosine
# (SPEC gives 80 for CIFAR-100 and 40 for ImageNet-R 10 tasks; we use 40 for ImageNet-R 5 and 20 tasks too)
PAPER = {
    ('cifar100', 10): dict(batch_size=128, lr=0.005, router_weight=1e-5, proto_weight=1e-5, eps=0.4, ca_epochs=50, ca_ratio=1, hold=80),
    ('imagenet-r', 5): dict(batch_size=64, lr=0.0025, router_weight=1e-4, proto_weight=1e-5, eps=0.7, ca_epochs=60, ca_ratio=2, hold=40),
    ('imagenet-r', 10): dict(batch_size=64, lr=0.0025, router_weight=5e-5, proto_weight=1e-4, eps=0.5, ca_epochs=50, ca_ratio=6, hold=40),
    ('imagenet-r', 20): dict(batch_size=64, lr=0.0025, router_weight=1e-4, proto_weight=5e-5, eps=0.3, ca_epochs=50, ca_ratio=4, hold=40),
    # the offline demo: small enough for two CPU cores, not a paper setting
    ('synthetic', 5): dict(batch_size=32, lr=0.002, router_weight=1e-5, proto_weight=1e-5, eps=0.4, ca_epochs=10, ca_ratio=1, hold=5, ca_lr=1e-3,
                           epochs=4, experts=8, top_k=2, prompt_layers=2, arch='tiny', weights=None),
}
TINY = dict(image_size=32, patch_size=4, width=96, depth=4, heads=4, mlp_dim=192)  # the demo's backbone
# settings that change results: a checkpoint made with other values is not resumed
RESULT_KEYS = ['dataset', 'tasks', 'epochs', 'batch_size', 'lr', 'experts', 'top_k', 'eps', 'router_weight', 'proto_weight',
               'ca_epochs', 'ca_ratio', 'ca_lr', 'hold', 'gate', 'weights', 'normalize', 'arch', 'prompt_layers', 'split', 'augment',
               'dense', 'warmup', 'ca', 'precision',
               'eval_batch_size']  # with augmentation on, the usage/statistics passes draw crops per batch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--dataset', default='cifar100', choices=['cifar100', 'imagenet-r', 'synthetic'])
    a('--tasks', type=int, default=None, help='10 (cifar100, imagenet-r) or 5 (synthetic)')
    a('--epochs', type=int, default=None, help='epochs per task (20); task 1 adds half of it as dense warm-up')
    a('--batch-size', type=int, default=None, help='GLOBAL batch, split across torchrun ranks')
    a('--lr', type=float, default=None, help='head lr; prompts get 5x')
    a('--hold', type=int, default=None, help='iterations held at lr 1e-6 before the cosine')
    a('--experts', type=int, default=None, help='experts per layer and head (25)')
    a('--top-k', type=int, default=None, help='active experts per image (5)')
    a('--prompt-layers', type=int, default=None, help='prompted blocks, counted from the first (6)')
    a('--eps', type=float, default=None, help='adaptive noise strength (Eq. 2)')
    a('--router-weight', type=float, default=None, help='alpha_router (Eq. 5)')
    a('--proto-weight', type=float, default=None, help='alpha_proto (Eq. 6)')
    a('--ca-epochs', type=int, default=None, help='classifier alignment epochs')
    a('--ca-ratio', type=int, default=None, help='alignment samples per class = batch size x ratio')
    a('--ca-lr', type=float, default=None, help='alignment lr, cosine down to 1e-6 (1e-5)')
    a('--gate', default='linear', choices=['linear', 'tanh', 'sigmoid', 'gelu'], help='linear = SMoPE; others = NoRGa')
    a('--arch', default=None, choices=['vit_b_16', 'tiny'])
    a('--weights', default=None, help="torchvision enum (IMAGENET1K_V1, ...), a torchvision/timm checkpoint file, or 'none'")
    a('--normalize', default='backbone', choices=['backbone', 'none'], help="'none' = pixels in [0,1], the released code")
    a('--split', default='fixed', choices=['fixed', 'random'], help='imagenet-r: the shared 24k/6k lists, or seeded 80/20')
    a('--seeds', type=int, nargs='+', default=[0])
    a('--data-dir', default='data')
    a('--download', action='store_true')
    a('--out', default=None, help='run folder (default runs/<dataset>-<tasks>)')
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    a('--precision', default='fp32', choices=['fp32', 'bf16'])
    a('--compile', action='store_true', help='torch.compile the backbone')
    a('--resume', action='store_true', help='continue after the last completed task in --out')
    a('--stop-after', type=int, default=None, help='stop after this many tasks (resume later with --resume)')
    a('--eval-batch-size', type=int, default=256)
    a('--workers', type=int, default=4, help='image decoding processes (imagenet-r)')
    a('--no-augment', dest='augment', action='store_false', help='train on un-augmented images')
    a('--dense', action='store_true', help='ablation: one shared prompt, all experts active')
    a('--no-noise', dest='noise', action='store_false', help='ablation: eps = 0')
    a('--no-router', dest='router', action='store_false', help='ablation: no router loss')
    a('--no-proto', dest='proto', action='store_false', help='ablation: no prototype loss')
    a('--no-warmup', dest='warmup', action='store_false', help='ablation: no task-1 dense warm-up')
    a('--no-ca', dest='ca', action='store_false', help='ablation: no classifier alignment')
    args = p.parse_args(argv)
    args.tasks = args.tasks or (5 if args.dataset == 'synthetic' else 10)
    row = PAPER.get((args.dataset, args.tasks)) or PAPER[next(k for k in PAPER if k[0] == args.dataset)]
    defaults = {**dict(ca_lr=1e-5, epochs=20, experts=25, top_k=5, prompt_layers=6, arch='vit_b_16', weights='IMAGENET1K_V1'), **row}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.weights = None if str(args.weights).lower() == 'none' else args.weights
    args.eps = args.eps if args.noise else 0.0
    args.router_weight = args.router_weight if args.router else 0.0
    args.proto_weight = args.proto_weight if args.proto else 0.0
    args.out = args.out or f'runs/{args.dataset}-{args.tasks}'
    if not 1 <= args.top_k <= args.experts:
        p.error(f'--top-k must be between 1 and --experts ({args.experts}), got {args.top_k}')
    if args.arch == 'tiny' and args.weights is not None:
        p.error('--weights needs --arch vit_b_16 (the tiny demo backbone is randomly initialised)')
    if args.batch_size < 1 or args.epochs < 1 or args.tasks < 1:
        p.error('--batch-size, --epochs and --tasks must be positive')
    return args


class Learner(nn.Module):
    """Frozen ViT + SMoPE prompt + linear head. forward returns (logits, router loss) so DDP sees both."""

    def __init__(self, vit, prompt, num_classes):
        super().__init__()
        self.vit, self.prompt, self.head = vit.requires_grad_(False), prompt, nn.Linear(vit.width, num_classes)

    def features(self, x):
        return self.vit(x, self.prompt)  # (B, width) final CLS feature

    def forward(self, x):
        return self.head(self.features(x)), self.prompt.router_loss()


def lr_at(it, total, hold, base, low=1e-6):
    """SPEC section 6: per-iteration, `hold` iterations at 1e-6, then cosine from base to 1e-6."""
    if it < hold:
        return low
    return low + (base - low) * 0.5 * (1 + math.cos(math.pi * (it - hold) / max(1, total - hold)))


def all_sum(t, world):
    if world > 1:
        dist.all_reduce(t)
    return t


def atomic_save(obj, path, json_too=False):
    tmp = path + '.tmp'
    if json_too:
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=1)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill never leaves a half-written file under the real name


def summarise(acc):
    """SPEC section 8 from the lower-triangular accuracy matrix acc[t][i] (percent)."""
    T = len(acc)
    faa = sum(acc[-1]) / T
    caa = sum(sum(row) / len(row) for row in acc) / T
    ffm = sum(max(acc[t][i] for t in range(i, T - 1)) - acc[-1][i] for i in range(T - 1)) / (T - 1) if T > 1 else 0.0
    return dict(faa=faa, caa=caa, forgetting=ffm)


def run(args, seed, rank, world, device):
    log = print if rank == 0 else (lambda *a, **k: None)
    out = os.path.join(args.out, f'seed{seed}')
    ckpt_path = os.path.join(out, 'checkpoint.pt')
    train_set, test_set = data.load(args.dataset, args.data_dir, args.download, split=args.split, seed=seed)
    torch.manual_seed(seed)  # backbone (tiny), prompt and head init; everything later draws from the generators below
    vit = ViT(**TINY) if args.arch == 'tiny' else vit_b_16(args.weights)
    C, T = train_set.num_classes, args.tasks
    order = data.class_order(C, seed)
    classes_per_task = len(data.split_tasks(order, T)[0])
    y_train = data.remap(train_set.labels, order).to(device)
    y_test = data.remap(test_set.labels, order).to(device)
    prompt = SMoPE(args.prompt_layers, vit.heads, vit.head_dim, args.experts, args.top_k, args.eps, args.gate)
    model = Learner(vit, prompt, C).to(device)
    if args.compile:
        model.vit = torch.compile(model.vit)
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    mean, std = (vit.mean, vit.std) if args.normalize == 'backbone' else (None, None)
    feed = dict(device=device, image_size=vit.image_size, mean=mean, std=std, rank=rank, world=world, workers=args.workers,
                resize='imagenet' if args.dataset == 'imagenet-r' else 'cifar')
    gen, ca_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 10_000)
    stats = dict(mean=torch.zeros(C, vit.width, dtype=torch.float64, device=device),
                 var=torch.zeros(C, vit.width, dtype=torch.float64, device=device))
    metrics = dict(acc=[], task_seconds=[], images_per_second=[], peak_memory_mb=[], config={k: getattr(args, k) for k in RESULT_KEYS},
                   seed=seed, world_size=world, trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                   prompt_params=prompt.keys.numel() + prompt.values.numel())
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == 'bf16')
    start = 0
    if args.resume and os.path.exists(ckpt_path):
        try:
            ck = torch.load(ckpt_path, map_location=device, weights_only=False)
            config = ck['metrics']['config']
        except Exception as e:
            raise ValueError(f'{ckpt_path} is not a readable checkpoint of train.py ({type(e).__name__}): '
                             'move it away to start over, or choose another --out') from None
        diff = [f"{k}: checkpoint {config.get(k)!r}, now {getattr(args, k)!r}" for k in RESULT_KEYS if config.get(k) != getattr(args, k)]
        if diff:
            raise ValueError(f"{ckpt_path} was made with other settings ({'; '.join(diff)}): use the same flags or another --out")
        model.prompt.load_state_dict(ck['prompt'])
        model.head.load_state_dict(ck['head'])
        stats, metrics, start = ck['stats'], ck['metrics'], ck['task']
        gen.set_state(ck['gen'])
        ca_gen.set_state(ck['ca_gen'])
        log(f'resuming {out} after task {start}/{T}')
    elif os.path.exists(ckpt_path) and not args.resume:
        raise ValueError(f'{ckpt_path} exists: pass --resume to continue it, or choose another --out')
    if rank == 0:
        os.makedirs(out, exist_ok=True)
    log(f'seed {seed}: {C} classes in {T} tasks, {metrics["trainable_params"]:,} trainable parameters '
        f'({metrics["prompt_params"]:,} in prompts), device {device}, {world} process(es)')

    for t in range(start, min(T, args.stop_after or T)):
        t0 = time.time()
        lo, hi = t * classes_per_task, (t + 1) * classes_per_task  # current task's logits [lo, hi); seen: [0, hi)
        idx = torch.nonzero((y_train >= lo) & (y_train < hi)).squeeze(1).cpu()
        prompt.begin_task()
        phases = ([('warm-up', True, max(1, args.epochs // 2))] if t == 0 and args.warmup and not args.dense else [])
        seen_imgs, busy = 0, 0.0
        for name, dense, epochs in phases + [('train', args.dense, args.epochs)]:
            prompt.dense = dense
            # NoRGa's alpha and tau train on task 1 only, then stay out of the optimizer (frozen)
            trainable = [prompt.keys, prompt.values] + ([prompt.alpha, prompt.tau] if args.gate != 'linear' and t == 0 else [])
            opt = torch.optim.AdamW([dict(params=trainable, lr=5 * args.lr), dict(params=model.head.parameters(), lr=args.lr)],
                                    weight_decay=0.0)  # a fresh optimizer and schedule per phase (SPEC section 6)
            steps = math.ceil(len(idx) / args.batch_size)
            for epoch in range(epochs):
                model.train()
                e0, tot = time.time(), torch.zeros(3, device=device, dtype=torch.float64)
                for j, (x, i) in enumerate(data.batches(train_set, idx, args.batch_size, args.augment, gen, **feed)):
                    it = epoch * steps + j
                    for g, scale in zip(opt.param_groups, (5, 1)):  # prompts at 5x, floor and hold included
                        g['lr'] = scale * lr_at(it, steps * epochs, args.hold, args.lr)
                    n_global = min(args.batch_size, len(idx) - j * args.batch_size)
                    if n_global < world:  # a rank would get no image; every rank knows it and skips alike
                        continue
                    y = y_train[i]
                    with autocast():
                        logits, router = ddp(x)
                    logits = logits.float()[:, :hi].clone()
                    logits[:, :lo] = float('-inf')  # only the current task's classes compete
                    ce = F.cross_entropy(logits, y, reduction='sum') / max(1, len(y))
                    loss = ce + args.router_weight * router + args.proto_weight * prompt.prototype_loss()
                    opt.zero_grad(set_to_none=True)  # also drops gradients left by classifier alignment
                    # DDP averages gradients over ranks; weighting by the local share makes it the global-batch mean
                    (loss * len(y) * world / n_global).backward()
                    grads = torch.stack([p.grad.float().sum() for p in trainable])
                    if not torch.isfinite(grads).all():
                        raise FloatingPointError(f'loss is {loss.item()} at task {t + 1}, {name} epoch {epoch + 1}, step {j + 1}: '
                                                 f'lower --lr or use --precision fp32; {ckpt_path} holds the last good state')
                    opt.step()
                    tot += torch.stack([ce.detach() * len(y), (logits.argmax(1) == y).sum(), torch.tensor(len(y), device=device)]).double()
                all_sum(tot, world)
                dt = time.time() - e0
                seen_imgs, busy = seen_imgs + tot[2].item(), busy + dt
                left = (epochs - epoch - 1) * dt
                log(f'task {t + 1}/{T} {name} epoch {epoch + 1}/{epochs}: loss {tot[0] / tot[2]:.4f} acc {100 * tot[1] / tot[2]:.2f} '
                    f'lr {opt.param_groups[1]["lr"]:.2e} {tot[2] / dt:.0f} img/s ETA {left:.0f}s')
        prompt.dense = args.dense

        # usage pass (SPEC section 5), then class statistics (section 6.4) with the new counts, as at test time;
        # the released code feeds training-augmented images to both; we follow it (--no-augment turns it off)
        model.eval()
        sums = torch.zeros(2, C, vit.width, dtype=torch.float64, device=device)  # sum f, sum f^2
        with torch.no_grad():
            for counting in (True, False):
                prompt.counting = counting
                for x, i in data.batches(train_set, idx, args.eval_batch_size, args.augment, gen, **feed):
                    if len(i) == 0:
                        continue
                    with autocast():
                        f = model.features(x).double()
                    if not counting:
                        y = y_train[i]
                        sums[0].index_add_(0, y, f)
                        sums[1].index_add_(0, y, f * f)
                if counting:
                    all_sum(prompt.hits, world)
                    prompt.end_usage_pass()
        all_sum(sums, world)
        n = torch.bincount(y_train[idx.to(device)], minlength=hi)[lo:hi, None].clamp(min=1)  # images per class, all ranks
        stats['mean'][lo:hi] = sums[0, lo:hi] / n
        stats['var'][lo:hi] = (sums[1, lo:hi] / n - stats['mean'][lo:hi] ** 2).clamp(min=0)  # population variance

        if t > 0 and args.ca:
            align_classifier(model.head, stats, hi, lo, args, ca_gen, device)
            if world > 1:  # identical draws on every rank already; broadcasting rules out kernel-level drift
                for p in model.head.parameters():
                    dist.broadcast(p.data, 0)

        row = evaluate(model, test_set, y_test, t + 1, classes_per_task, args, feed, autocast)
        metrics['acc'].append(row)
        metrics['task_seconds'].append(time.time() - t0)
        metrics['images_per_second'].append(seen_imgs / max(busy, 1e-9))
        metrics['peak_memory_mb'].append(  # CUDA: this process's peak allocation; CPU: peak RSS
            torch.cuda.max_memory_allocated(device) / 2**20 if device.type == 'cuda' else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        metrics.update(summarise(metrics['acc']))
        metrics['usage'] = prompt.usage.tolist()
        log(f'task {t + 1}/{T} done in {time.time() - t0:.0f}s: accuracy per task {" ".join(f"{a:.1f}" for a in row)} | '
            f'average {sum(row) / len(row):.2f}')
        log(usage_line(prompt))
        if rank == 0:
            atomic_save(dict(prompt=prompt.state_dict(), head=model.head.state_dict(), stats=stats, metrics=metrics, task=t + 1,
                             gen=gen.get_state(), ca_gen=ca_gen.get_state()), ckpt_path)
            atomic_save(metrics, os.path.join(out, 'metrics.json'), json_too=True)
    if metrics['acc']:
        log_matrix(metrics['acc'], log)
        if rank == 0:
            plot(metrics['acc'], os.path.join(out, 'accuracy.png'))
    return metrics


def align_classifier(head, stats, seen, earlier, args, gen, device):
    """SPEC section 6.5: retrain the head on features drawn from N(mu_c, diag(var_c) + 1e-4) of every seen class.
    Per epoch the released code draws batch*ratio samples per class, shuffles them and uses the first `earlier`
    batches; drawing only the samples it uses gives the same distribution for less work."""
    per = args.batch_size * args.ca_ratio
    opt = torch.optim.AdamW(head.parameters(), lr=args.ca_lr, weight_decay=5e-4)
    mean, std = stats['mean'][:seen].float(), (stats['var'][:seen] + 1e-4).sqrt().float()
    for epoch in range(args.ca_epochs):
        for g in opt.param_groups:
            g['lr'] = lr_at(epoch, args.ca_epochs, 0, args.ca_lr)
        pick = torch.randperm(seen * per, generator=gen)[:earlier * per]
        noise = torch.randn(len(pick), mean.shape[1], generator=gen).to(device)
        y = (pick // per).to(device)
        z = mean[y] + std[y] * noise
        for b in range(earlier):
            sl = slice(b * per, (b + 1) * per)
            loss = F.cross_entropy(head(z[sl])[:, :seen], y[sl])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


@torch.no_grad()
def evaluate(model, test_set, y_test, tasks_seen, classes_per_task, args, feed, autocast):
    """Accuracy (%) on each seen task's test set over all seen classes, no task id (SPEC section 8)."""
    model.eval()
    hi = tasks_seen * classes_per_task
    idx = torch.nonzero(y_test < hi).squeeze(1).cpu()
    hits = torch.zeros(2, tasks_seen, dtype=torch.float64, device=y_test.device)
    for x, i in data.batches(test_set, idx, args.eval_batch_size, False, None, **feed):
        if len(i) == 0:
            continue
        with autocast():
            pred = model.head(model.features(x)).float()[:, :hi].argmax(1)
        y = y_test[i]
        task = y // classes_per_task
        hits[0].index_add_(0, task, (pred == y).double())
        hits[1].index_add_(0, task, torch.ones_like(task, dtype=torch.float64))
    all_sum(hits, feed['world'])
    return (100 * hits[0] / hits[1].clamp(min=1)).tolist()


def usage_line(prompt):
    used = (prompt.usage > 0).sum(-1).float()  # (L, H)
    top = prompt.usage_shares().amax(-1)       # (L, H)
    return ('expert usage per prompted layer (experts used of %d, busiest expert share, frequent set): ' % prompt.experts +
            ' | '.join(f'L{l}: {used[l].mean():.1f}, {100 * top[l].mean():.0f}%, {prompt.frequent[l].sum(-1).float().mean():.1f}'
                       for l in range(prompt.layers)))


def log_matrix(acc, log):
    log('accuracy matrix (row = after task t, column = task i):')
    for r in acc:
        log('  ' + ' '.join(f'{a:6.2f}' for a in r))
    m = summarise(acc)
    log(f"FAA {m['faa']:.2f}  CAA {m['caa']:.2f}  forgetting {m['forgetting']:.2f}")


def plot(acc, path):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return
    T = len(acc)
    grid = [[acc[t][i] if i <= t else float('nan') for i in range(T)] for t in range(T)]
    fig, ax = plt.subplots(figsize=(1 + 0.6 * T, 1 + 0.5 * T))
    im = ax.imshow(grid, vmin=0, vmax=100, cmap='viridis')
    ax.set_xticks(range(T), range(1, T + 1))
    ax.set_yticks(range(T), range(1, T + 1))
    for t in range(T):
        for i in range(t + 1):
            ax.text(i, t, f'{acc[t][i]:.0f}', ha='center', va='center', color='w' if acc[t][i] < 60 else 'k', fontsize=8)
    ax.set_xlabel('task evaluated')
    ax.set_ylabel('after training task')
    fig.colorbar(im, ax=ax, label='accuracy (%)')
    fig.savefig(path + '.tmp.png', dpi=100, bbox_inches='tight')
    plt.close(fig)
    os.replace(path + '.tmp.png', path)


def main(argv=None):
    args = parse_args(argv)
    world, rank = int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0))
    device = torch.device(args.device)
    if world > 1:
        if device.type == 'cuda':
            device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    try:
        results = {s: run(args, s, rank, world, device) for s in args.seeds}
    except (ValueError, OSError, FloatingPointError) as e:  # OSError: missing files, failed downloads
        print(f'error: {e}', file=sys.stderr)
        return 2
    finally:
        if world > 1:
            dist.destroy_process_group()
    done = [m for m in results.values() if len(m['acc']) == args.tasks]
    if rank == 0 and len(done) > 1:
        summary = {}
        for k in ('faa', 'caa', 'forgetting'):
            v = torch.tensor([m[k] for m in done], dtype=torch.float64)
            summary[k] = dict(mean=v.mean().item(), std=v.std().item(), per_seed=v.tolist())
            print(f"{k}: {summary[k]['mean']:.2f} ± {summary[k]['std']:.2f} over seeds {args.seeds}")
        atomic_save(summary, os.path.join(args.out, 'summary.json'), json_too=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
