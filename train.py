"""
SMoPE class-incremental training on a frozen ViT (SPEC.md sections 6-8).

    python train.py --dataset cifar100 --tasks 10          # downloads what is missing, then trains
    python train.py --dataset cub200 --paper --seeds 0 1 2 3 4   # the released protocol, five class orders
    python train.py --dataset synthetic                    # offline demo: tiny random ViT, seconds on a CPU
    python train.py --dataset folder --data-dir ROOT       # your images: ROOT/<class>/ (or train/, test/)
    torchrun --nproc_per_node=4 train.py --dataset imagenet-r --tasks 10   # 4 GPUs, same results as one
"""
import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import math
import os
import re
import resource
import sys
import time
from collections import namedtuple
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
from smope import SMoPE, attach
import vit
from vit import ViT, vit_b_16

# SPEC.md section 8: the released scripts' hyperparameters, with section 6's schedule constants where the
# released config has them (iter_step: schedule entries per epoch; hold: entries at 1e-6 before the cosine)
COLUMNS = 'batch_size lr router_weight proto_weight eps ca_epochs ca_ratio iter_step hold'.split()
PAPER = {row: dict(zip(COLUMNS, values)) for row, values in [
    (('cifar100', 10), (128, 0.005, 1e-5, 1e-5, 0.4, 50, 1, 40, 80)),
    (('imagenet-r', 5), (64, 0.0025, 1e-4, 1e-5, 0.7, 60, 2, 80, 80)),
    (('imagenet-r', 10), (64, 0.0025, 5e-5, 1e-4, 0.5, 50, 6, 40, 40)),
    (('imagenet-r', 20), (64, 0.0025, 1e-4, 5e-5, 0.3, 50, 4, 20, 20)),
    (('cub200', 10), (128, 0.005, 1e-5, 5e-5, 0.4, 50, 1)),  # the per-epoch cosine: no iter_step or hold
    # the offline demo: small enough for two CPU cores, not a paper setting
    (('synthetic', 5), (32, 0.002, 1e-5, 1e-5, 0.4, 10, 1))]}
PAPER['synthetic', 5].update(ca_lr=1e-3, epochs=4, experts=8, top_k=2, prompt_layers=2, arch='tiny',
                             weights=None)
RELEASED_BACKBONE = {'cifar100': 'sup1k', 'imagenet-r': 'sup1k', 'cub200': 'sup21k'}  # SPEC section 7
TINY = dict(image_size=32, patch_size=4, width=96, depth=4, heads=4, mlp_dim=192)  # the demo's backbone
# flags that leave results as they are (the ablation switches live on in eps and the loss weights): a
# checkpoint made with other values of any other flag, or another seed, is not resumed
RUN_ONLY = 'seeds data_dir download out device compile resume stop_after timeout workers row noise router '\
    'proto'.split()
STEPS = ('training', 'usage pass', 'statistics', 'alignment', 'evaluation', 'checkpointing')  # SPEC section 6


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='row: the default is the released row of the data set and task count '
                                '(SPEC section 8); shown: the CIFAR-100 row\'s')
    p.error = lambda message: sys.exit(print(f'error: {message} (see --help)', file=sys.stderr) or 2)
    a, row = p.add_argument, lambda k: f" (row; cifar100: {PAPER['cifar100', 10][k]})"
    a('--dataset', default='cifar100', choices=data.NAMES, help='a benchmark (downloaded when missing); '
      'folder: your images in --data-dir (SPEC section 7); synthetic: the offline demo')
    a('--tasks', type=int, help='tasks, each the next classes of the class order: 10 (synthetic: 5)')
    a('--paper', action='store_true', help="the released code's own choices: its backbone (sup1k; cub200: "
      "sup21k), pixels in [0,1] without normalisation, fp32, --released-quirks; the rest is its row anyway")
    a('--released-quirks', action='store_true', help="reproduce the released code's slips (SPEC section 9)")
    a('--epochs', type=int, help='epochs per task (20); task 1 adds half as dense warm-up')
    a('--batch-size', type=int, help='GLOBAL batch, split across torchrun ranks' + row('batch_size'))
    a('--lr', type=float, help='head lr; prompts get 5x' + row('lr'))
    a('--iter-step', type=int, help="schedule entries per epoch (SPEC section 6): the released row's (at its "
      'task count and batch size), else ceil(task images / batch)')
    a('--hold', type=int, help="entries at lr 1e-6 before the cosine: the released row's x epochs / 20, else "
      'one epoch in 20 (as the ImageNet-R rows): round(iter_step x epochs / 20)')
    a('--experts', type=int, help='experts per layer and head (25)')
    a('--top-k', type=int, help='active experts per image (5)')
    a('--prompt-layers', type=int, help='prompted blocks, counted from the first (6)')
    a('--eps', type=float, help='adaptive noise (Eq. 2), also the router loss margin (Eq. 5)' + row('eps'))
    a('--router-weight', type=float, help='alpha_router (Eq. 5)' + row('router_weight'))
    a('--proto-weight', type=float, help='alpha_proto (Eq. 6)' + row('proto_weight'))
    a('--ca-epochs', type=int, help='classifier alignment epochs' + row('ca_epochs'))
    a('--ca-ratio', type=int, help='alignment samples per class = batch size x ratio' + row('ca_ratio'))
    a('--ca-lr', type=float, help='alignment lr, per-iteration cosine down to 1e-6 (1e-5)')
    a('--gate', default='linear', choices=['linear', 'tanh', 'sigmoid', 'gelu'],
      help="linear: SMoPE's gate; tanh, sigmoid, gelu: NoRGa's")
    a('--arch', choices=['vit_b_16', 'tiny'], help='backbone: ViT-B/16 (default), or the demo\'s tiny ViT')
    a('--weights', help="backbone: sup21k, sup1k, dino1k, ibot1k (the released code's, SPEC section 7), a "
      "torchvision enum (default IMAGENET1K_V1), a torchvision/timm checkpoint file, or 'none'")
    a('--normalize', choices=['backbone', 'none'], help="backbone: its mean and std (default); none: [0, 1]")
    a('--split', default='fixed', choices=['fixed', 'random'], help='imagenet-r: released lists, or 80/20')
    a('--seeds', type=int, nargs='+', default=[0], help="a run per class order (0-4: the paper's five runs)")
    a('--data-dir', help='where data sets are downloaded and read (default: data); folder: your ROOT')
    a('--no-download', dest='download', action='store_false', help='never download (offline clusters)')
    a('--out', help='run folder (default runs/<dataset>-<tasks>)')
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu, cuda or cuda:N')
    a('--precision', choices=['auto', 'bf16', 'fp32'], help='auto (default): bf16 autocast on CUDA, fp32 on '
      'CPU; fp32 on CUDA allows TF32 matmuls (not with --paper). Routing always runs in fp32')
    a('--compile', action='store_true', help='torch.compile the training loss (one graph) and the backbone')
    a('--resume', action='store_true', help='continue after the last completed task in --out')
    a('--stop-after', type=int, help='stop after this many tasks (resume later with --resume)')
    a('--timeout', type=float, default=30, help='torchrun: minutes a rank waits for the others, then fails')
    a('--eval-batch-size', type=int, default=256, help='batch of the usage, statistics and evaluation passes')
    a('--workers', type=int, help='image decoding processes (imagenet-r, cub200, folder); default: cores - 1')
    a('--no-augment', dest='augment', action='store_false', help='train on un-augmented images')
    a('--dense', action='store_true', help='ablation: one shared prompt, all experts active')
    a('--no-noise', dest='noise', action='store_false', help='ablation: eps = 0 (and no router loss margin)')
    a('--no-router', dest='router', action='store_false', help='ablation: no router loss')
    a('--no-proto', dest='proto', action='store_false', help='ablation: no prototype loss')
    a('--no-warmup', dest='warmup', action='store_false', help='ablation: no task-1 dense warm-up')
    a('--no-ca', dest='ca', action='store_false', help='ablation: no classifier alignment')
    args = p.parse_args(argv)
    if not re.fullmatch(r'cpu|cuda(:\d+)?', args.device):
        p.error(f'--device {args.device}: give cpu, cuda or cuda:N')
    if args.paper and args.dataset not in RELEASED_BACKBONE:
        p.error(f"--paper needs one of the paper's benchmarks: {', '.join(RELEASED_BACKBONE)}")
    if args.dataset == 'folder' and args.data_dir is None:
        p.error('--dataset folder reads your images in --data-dir ROOT: give it')
    args.data_dir = args.data_dir or 'data'
    args.tasks = (5 if args.dataset == 'synthetic' else 10) if args.tasks is None else args.tasks
    released = (args.dataset, args.tasks) in PAPER
    first = ('imagenet-r', 10) if args.dataset == 'folder' else next(k for k in PAPER if k[0] == args.dataset)
    args.row = (args.dataset, args.tasks) if released else first  # a folder's: SPEC section 7
    row = PAPER[args.row]
    own = released and args.batch_size in (None, row['batch_size'])  # the released schedule: its own row only
    defaults = dict(ca_lr=1e-5, epochs=20, experts=25, top_k=5, prompt_layers=6, arch='vit_b_16',
                    weights='IMAGENET1K_V1', normalize='backbone', precision='auto')
    if args.paper:
        defaults.update(weights=RELEASED_BACKBONE[args.dataset], normalize='none', precision='fp32')
        args.released_quirks = True
    for k, v in {**defaults, **row}.items():  # hold comes after epochs, which it needs
        if getattr(args, k) is None and (own or k not in ('iter_step', 'hold')):
            # the released hold belongs to 20 epochs: scaled (SPEC section 9)
            setattr(args, k, round(v * args.epochs / 20) if k == 'hold' else v)
    if args.precision == 'auto':
        args.precision = 'bf16' if args.device.startswith('cuda') else 'fp32'
    args.weights = None if str(args.weights).lower() == 'none' else args.weights
    for k, on in (('eps', args.noise), ('router_weight', args.router), ('proto_weight', args.proto)):
        setattr(args, k, getattr(args, k) if on else 0.0)  # the ablation switches
    args.out = args.out or f'runs/{args.dataset}-{args.tasks}'
    if not 1 <= args.top_k <= args.experts:
        p.error(f'--top-k must be between 1 and --experts ({args.experts}), got {args.top_k}')
    if args.arch == 'tiny' and args.weights is not None:
        p.error('--weights needs --arch vit_b_16 (the tiny demo backbone is randomly initialised)')
    if args.dataset == 'cub200' and (args.iter_step or args.hold is not None):
        p.error("--iter-step and --hold do not apply to cub200: its released schedule is a per-epoch cosine")
    if args.split != 'fixed' and args.dataset != 'imagenet-r':
        p.error('--split applies to imagenet-r only')
    positive = ('tasks epochs batch_size eval_batch_size lr ca_lr iter_step stop_after ca_ratio timeout '
                'prompt_layers').split()
    big = torch.finfo().max  # float32 where they are used (5 x lr, 10 x ca_lr); minutes that timedelta holds
    most = dict(lr=big / 5, ca_lr=big / 10, timeout=timedelta.max.total_seconds() / 60)
    for k in positive + ['hold', 'ca_epochs', 'workers', 'eps', 'router_weight', 'proto_weight']:
        v, pos, top = getattr(args, k), k in positive, most.get(k, big)
        if v is not None and not (0 < v <= top if pos else 0 <= v <= top):  # `not`: NaN fails too
            p.error(f"--{k.replace('_', '-')} must be {'> 0' if pos else 'at least 0'} and at most "
                    f'{top:.3g}, got {v}')
    if len(set(args.seeds)) < len(args.seeds) or not all(0 <= s < 2**32 for s in args.seeds):
        p.error(f'--seeds {" ".join(map(str, args.seeds))}: each once, from 0 to 2**32 - 1')
    depth = TINY['depth'] if args.arch == 'tiny' else 12
    if args.prompt_layers > depth:
        p.error(f'--prompt-layers {args.prompt_layers}: the {args.arch} backbone has {depth} blocks')
    w = args.weights
    if w and w not in vit.BACKBONES and not os.path.isfile(w):  # a file, else a torchvision enum name
        if not vit.enum_name(w):
            p.error(f'--weights {w}: no such file')
        try:
            vit._tv_weights(w)  # known without downloading anything
        except ValueError as e:
            p.error(f'--weights: {e}')
    return args


# -----------------------------------------------------------------------------
# the released schedules (SPEC section 6)

def cosine(k, T, base):  # from base at k = 0 down to 1e-6 at k = T
    return 1e-6 + 0.5 * (base - 1e-6) * (1 + math.cos(math.pi * k / T))


def lr_schedule(args, n_images, epochs):
    """(prompt lr, head lr) per optimizer step of one phase over n_images, floor(n_images / batch) per epoch:
    step k at entry k of the released table (CosineSchedulerIter; CUB-200: a per-epoch cosine), SPEC section 6
    step 2. --released-quirks: the first step at the bases, then one entry late (SPEC section 9)."""
    per_epoch, q, bases = n_images // args.batch_size, args.released_quirks, (5 * args.lr, args.lr)
    if args.dataset == 'cub200':
        cos = [math.cos(99 * math.pi * max(0, e - q) / (200 * max(1, epochs - 1))) for e in range(epochs)]
        return [(bases[0] * c, bases[1] * c) for c in cos for _ in range(per_epoch)]
    iter_step = args.iter_step or math.ceil(n_images / args.batch_size)
    hold = args.hold if args.hold is not None else round(iter_step * args.epochs / 20)
    T = iter_step * epochs
    table = [tuple(1e-6 if k < hold or k >= T else cosine(k - hold, T - hold, b) for b in bases)
             for k in range(per_epoch * epochs)]
    return ([bases] + table)[:len(table)] if q else table


def ca_lr_schedule(args, earlier_classes):
    """One lr per alignment iteration, crct_num = earlier_classes per epoch (SPEC section 6 step 5).
    --released-quirks: the first at the released --ca_lr, 10 x --ca-lr, then one entry late."""
    T = earlier_classes * args.ca_epochs
    table = [cosine(k, T, args.ca_lr) for k in range(T)]
    return ([10 * args.ca_lr] + table)[:T] if args.released_quirks else table


# -----------------------------------------------------------------------------
# one seed's run

class Learner(nn.Module):
    """Frozen ViT with the prompt attached + linear head. forward returns (logits, router loss) for DDP."""
    def __init__(self, vit, prompt, num_classes):
        super().__init__()
        self.vit = attach(vit.requires_grad_(False), prompt)  # freeze first: attach makes the prompt a child
        self.prompt, self.head = prompt, nn.Linear(vit.width, num_classes)

    def forward(self, x):  # self.vit(x): (B, width) final CLS features
        return self.head(self.vit(x)), self.prompt.router_loss()


@dataclass
class SeedRun:
    """What one seed's run carries from task to task."""
    args: argparse.Namespace
    model: Learner
    ddp: nn.Module            # model, or its DistributedDataParallel wrapper under torchrun
    train_set: data.Images
    test_set: data.Images
    y_train: torch.Tensor     # (N,) labels in class-order positions: task t owns [t, t + 1) * per_task
    y_test: torch.Tensor
    per_task: int             # classes per task
    feed: dict                # data.batches settings
    out: str                  # this seed's folder
    rank: int
    world: int
    device: torch.device
    gen: torch.Generator      # shuffling and augmentation
    ca_gen: torch.Generator   # classifier-alignment samples
    stats: dict               # SPEC section 6 step 4: 'mean', 'var', (C, width) float64
    metrics: dict
    estimate: bool = False    # ViT-B/16 on a CPU: print the run's time, measured on its second step
    checkpoint = property(lambda self: os.path.join(self.out, 'checkpoint.pt'))  # derived: not a field

    def log(self, *a):
        if self.rank == 0:
            print(*a, flush=True)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.precision == 'bf16')


Task = namedtuple('Task', 't lo hi idx')  # t 0-based; its logits [lo, hi), seen classes [0, hi); its images


def run(args, seed, rank, world, device):
    r = setup(args, seed, rank, world, device)
    start = resume(r) if args.resume else 0
    r.log(f'seed {seed}: {r.stats["mean"].shape[0]} classes in {args.tasks} tasks, '
          f'{r.metrics["trainable_params"]:,} trainable parameters '
          f'({r.metrics["prompt_params"]:,} in prompts), {device}, {args.precision}, {world} rank(s)')
    for t in range(start, min(args.tasks, args.stop_after or args.tasks)):
        t0, lo, hi = time.time(), t * r.per_task, (t + 1) * r.per_task
        task = Task(t, lo, hi, torch.nonzero((r.y_train >= lo) & (r.y_train < hi)).squeeze(1).cpu())
        r.model.prompt.begin_task()
        phases = [('train', args.dense, args.epochs)]  # SPEC section 6 steps 1-2: task 1 opens with a warm-up
        if t == 0 and args.warmup and not args.dense:
            phases.insert(0, ('warm-up', True, max(1, args.epochs // 2)))
        images, seconds = zip(*timed(r, 'training', lambda: [train_phase(r, task, *p) for p in phases]))
        timed(r, 'usage pass', usage_pass, r, task)
        timed(r, 'statistics', class_statistics, r, task)
        if t > 0 and args.ca:
            timed(r, 'alignment', align_classifier, r, task)
        row = timed(r, 'evaluation', evaluate, r, task)
        record(r, task, row, time.time() - t0, sum(images) / max(sum(seconds), 1e-9))
        timed(r, 'checkpointing', save_checkpoint, r, task)
    finish(r)
    return r.metrics


def setup(args, seed, rank, world, device):
    """Data, backbone (both downloaded when missing, before anything is written), prompt, head, generators.
    Under torchrun the ranks take turns loading, so that no two download into the same files: rank 0, then the
    first rank of every other machine (whose disk may be its own), then the rest."""
    turn = 0 if rank == 0 else 1 if int(os.environ.get('LOCAL_RANK', 0)) == 0 else 2
    for k in range(3):  # a rank that fails ends the run (main's `failed`), the others wait for its turn
        if k == turn:
            download = args.download and turn < 2
            torch.manual_seed(seed)  # backbone (tiny), prompt, head init; later: the run's generators
            # the backbone first: a weights file is read before a data set (up to 2 GB) is downloaded
            vit = ViT(**TINY) if args.arch == 'tiny' else vit_b_16(args.weights, download=download)
            train_set, test_set = data.load(args.dataset, args.data_dir, download, args.split, seed)
        if world > 1:
            dist.barrier()
    C, order = train_set.num_classes, data.class_order(train_set.num_classes, seed)
    tasks, names = data.split_tasks(order, args.tasks), train_set.names()
    prompt = SMoPE(args.prompt_layers, vit.heads, vit.head_dim, args.experts, args.top_k, args.eps, args.gate)
    model = Learner(vit, prompt, C).to(device)
    if args.compile:
        model.vit = torch.compile(model.vit)
    norm = args.normalize == 'backbone'
    feed = dict(device=device, image_size=vit.image_size, mean=vit.mean if norm else None,
                std=vit.std if norm else None, rank=rank, world=world, workers=args.workers,
                resize='cifar' if args.dataset in ('cifar100', 'synthetic') else 'imagenet')
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    metrics = dict(acc=[], task_seconds=[], images_per_second=[], peak_memory_mb=[], task_usage=[],
                   step_seconds=dict.fromkeys(STEPS, 0.0), seed=seed, world_size=world,
                   config=config(args, seed), weights_sha256=vit.weights_sha256, peak_memory='per task, CUDA '
                   'allocator' if device.type == 'cuda' else 'process peak RSS so far',
                   trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                   prompt_params=prompt.keys.numel() + prompt.values.numel(),
                   task_classes=[[names[c] for c in classes] for classes in tasks])
    stats = {k: torch.zeros(C, vit.width, dtype=torch.float64, device=device) for k in ('mean', 'var')}
    y_train, y_test = (data.remap(s.labels, order).to(device) for s in (train_set, test_set))
    r = SeedRun(args=args, model=model, ddp=ddp, train_set=train_set, test_set=test_set, y_train=y_train,
                y_test=y_test, per_task=len(tasks[0]), feed=feed, stats=stats, metrics=metrics,
                out=os.path.join(args.out, f'seed{seed}'), rank=rank, world=world, device=device,
                gen=torch.Generator().manual_seed(seed), ca_gen=torch.Generator().manual_seed(seed + 10_000),
                estimate=device.type == 'cpu' and args.arch == 'vit_b_16')
    if vit.weights_sha256:  # no checksums are published for the released backbones: this identifies the file
        r.log(f'backbone {args.weights}: sha256 {vit.weights_sha256}')
    return r


def claim_out(args):
    """(lock, new): rank 0 locks <out>/.lock for the run's life, so a second run on it stops at once; new:
    the folders made for --out, deepest first. Before any download: the run's longest path must be one the
    OS accepts, each seed's checkpoint one to resume (--resume only)."""
    for seed in args.seeds:
        try:
            os.stat(longest := os.path.join(args.out, f'seed{seed}', 'checkpoint.pt.tmp'))
        except (FileNotFoundError, NotADirectoryError):  # to be made; a file in the way: named below
            pass
        except OSError as e:  # too long a path, a loop, no permission
            raise ValueError(f'--out {args.out}: the OS refuses {longest} ({e.strerror}): choose another '
                             '--out') from None
    new, d = [], os.path.abspath(args.out)
    while not os.path.lexists(d):
        new, d = new + [d], os.path.dirname(d)
    try:
        os.makedirs(args.out, exist_ok=True)
        lock = open(os.path.join(args.out, '.lock'), 'a')
    except OSError as e:
        release(None, new)
        raise ValueError(f'--out {args.out} is not a folder this run can write to ({e.strerror})') from None
    try:
        lock_and_check(args, lock)
    except ValueError:
        lock.close()  # the folder is another run's, or was there before: left as it is
        raise
    return lock, new


def release(lock, new):
    """Unlocks --out (held); the folders made for it go again if the run wrote nothing there."""
    if lock:
        if new and os.listdir(new[0]) == ['.lock']:
            os.remove(lock.name)
        lock.close()
    for d in new:
        with contextlib.suppress(OSError):  # not empty: it stays, and so do the folders above it
            os.rmdir(d)


def lock_and_check(args, lock):
    """Takes the lock, then checks every seed folder: a folder, its checkpoint only with --resume, and then
    intact and made with these settings."""
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # POSIX lock: forked loader workers do not hold it
    except OSError:  # EAGAIN or EACCES: another process holds it
        raise ValueError(f'--out {args.out} is in use by another run: wait or choose another --out') from None
    for seed in args.seeds:
        folder = os.path.join(args.out, f'seed{seed}')
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f'{folder} is not a folder: move it away, or choose another --out')
        if os.path.exists(checkpoint := os.path.join(folder, 'checkpoint.pt')):
            if not args.resume:
                raise ValueError(f'{checkpoint} exists: pass --resume to continue it, or choose another '
                                 '--out')
            read_checkpoint(checkpoint, config(args, seed))


def config(args, seed):  # the settings a checkpoint must share with the run that resumes it
    return {**{k: v for k, v in vars(args).items() if k not in RUN_ONLY}, 'seed': seed}


def read_checkpoint(path, now, r=None):
    """The task after which the checkpoint at path was written, refused in one line unless intact and made
    with the settings `now` (config; if given, the backbone's sha256 and classes); loaded into r if given."""
    try:
        ck = torch.load(path, map_location='cpu', weights_only=False)  # generator states: host only
        if ck.pop('sha256', None) != digest(ck):  # a flipped byte anywhere, a missing part
            raise ValueError('its sha256 does not match its content')
        m = ck['metrics']
        saved = {**m['config'], 'backbone sha256': m.get('weights_sha256'), 'classes': m.get('task_classes')}
        diff = [f'{k}: checkpoint {saved.get(k)!r}, now {v!r}' if k != 'classes' else 'the classes per task'
                for k, v in now.items() if saved.get(k) != v]
        if r and not diff:
            for k in ('prompt', 'head'):
                getattr(r.model, k).load_state_dict(ck[k])
            for k in ('gen', 'ca_gen'):  # the generators of shuffling, augmentation and alignment
                getattr(r, k).set_state(ck[k])
            r.stats, r.metrics = {k: v.to(r.device) for k, v in ck['stats'].items()}, m
    except Exception as e:
        raise ValueError(f'{path} is not a readable checkpoint of train.py ({type(e).__name__}: '
                         f'{" ".join(str(e).split())}): move it away, or choose another --out') from None
    if diff:
        raise ValueError(f"{path} was made with other settings ({'; '.join(diff)}): use the same flags or "
                         'another --out')
    return ck['task']


def resume(r):
    """Continue after the last completed task: of this seed's checkpoint, with this data set and backbone."""
    if not os.path.exists(r.checkpoint):
        r.log(f'{r.checkpoint} does not exist: starting from task 1')
        return 0
    m = r.metrics
    task = read_checkpoint(r.checkpoint, {**m['config'], 'backbone sha256': m['weights_sha256'],
                                          'classes': m['task_classes']}, r)
    r.log(f'resuming {r.out} after task {task}/{r.args.tasks}')
    return task


def train_phase(r, task, name, dense, epochs):
    """SPEC section 6 step 2, one phase: a fresh AdamW and schedule, shuffled full global batches, the loss of
    Eq. 7. Returns (images, seconds) for the images/s in metrics."""
    args, prompt, head = r.args, r.model.prompt, r.model.head
    if len(task.idx) < args.batch_size:
        raise ValueError(f'task {task.t + 1} has {len(task.idx)} training images, fewer than one global '
                         f'batch of {args.batch_size} (incomplete batches are dropped): lower --batch-size')
    prompt.dense = dense
    # NoRGa's alpha and tau train on task 1 only, then freeze: no gradient computed or all-reduced (new DDP)
    if args.gate != 'linear' and task.t > 0 and prompt.alpha.requires_grad:
        prompt.alpha.requires_grad = prompt.tau.requires_grad = False
        if r.world > 1:
            r.ddp = nn.parallel.DistributedDataParallel(r.model, broadcast_buffers=False)
    trainable = [p for p in prompt.parameters() if p.requires_grad]
    # fused on CUDA: one kernel, its step count on the GPU (for-loop AdamW reads it on the host); CPU as is
    opt = torch.optim.AdamW([dict(params=trainable), dict(params=head.parameters())], lr=0.0,
                            weight_decay=0.0, fused=r.device.type == 'cuda')  # lr: from the schedule
    schedule = iter(lr_schedule(args, len(task.idx), epochs))
    loss_fn = torch.compile(step_loss) if args.compile else step_loss
    images, seconds, never = 0, 0.0, torch.iinfo(torch.long).max
    for epoch in range(epochs):
        r.model.train()
        e0, tot = time.time(), torch.zeros(2, device=r.device, dtype=torch.float64)  # CE sum, correct
        bad = torch.full((), never, device=r.device)  # first step with a non-finite loss, checked per epoch
        for j, (x, i) in enumerate(data.batches(r.train_set, task.idx, args.batch_size, args.augment, r.gen,
                                                drop_last=True, shuffle=True, **r.feed)):
            for group, lr in zip(opt.param_groups, next(schedule)):
                group['lr'] = lr
            y = r.y_train[i]
            loss, stats = loss_fn(r.ddp, prompt, x, y, task.lo, task.hi, args)
            opt.zero_grad(set_to_none=True)  # also drops gradients left by classifier alignment
            # DDP averages gradients over ranks; weighting by the local share makes it the global-batch mean
            (loss * len(y) * r.world / args.batch_size).backward()
            opt.step()
            bad = torch.where((bad == never) & ~torch.isfinite(loss.detach()), j, bad)
            tot += stats
            if r.estimate and j == 1:  # a CPU waits for each step: the second alone, decoding included
                estimate(r, (time.time() - t1) / args.batch_size, len(task.idx))
            t1 = time.time()
        n = (j + 1) * args.batch_size  # images this epoch: full global batches only
        all_sum(tot, r.world)
        if r.world > 1:  # every rank must stop alike, whichever rank saw it
            dist.all_reduce(bad, dist.ReduceOp.MIN)
        if bad.item() != never:
            kept = f'{r.checkpoint} holds the last completed task' if task.t else 'no task was completed'
            raise FloatingPointError(f'loss is not finite at task {task.t + 1}, {name} epoch {epoch + 1}, '
                                     f'step {bad.item() + 1}: lower --lr; {kept}')
        dt = time.time() - e0
        images, seconds = images + n, seconds + dt
        r.log(f'task {task.t + 1}/{args.tasks} {name} epoch {epoch + 1}/{epochs}: loss {tot[0] / n:.4f} '
              f'acc {100 * tot[1] / n:.2f} lr {opt.param_groups[1]["lr"]:.2e} {n / dt:.0f} img/s '
              f'ETA {(epochs - epoch - 1) * dt:.0f}s')
    prompt.dense = args.dense
    return images, seconds


def estimate(r, seconds, n):
    """One line before the first epoch: the run's time at `seconds` per training image, n images per task; its
    usage, statistics and evaluation passes (forward only) take about one epoch's time per task."""
    a, r.estimate = r.args, False
    epochs = a.tasks * (a.epochs + 1) + max(1, a.epochs // 2) * (a.warmup and not a.dense)  # warm-up: task 1
    r.log(f'ViT-B/16 on a CPU: this run takes about {seconds * n * epochs / 3600:.1f} hours ({seconds:.2f}'
          ' s per training image): a GPU takes a fraction; offline demo: python train.py --dataset synthetic')


def step_loss(model, prompt, x, y, lo, hi, args):
    """Eq. 7 for one batch: CE over the current task's classes, router loss (Eq. 5), prototype loss (Eq. 6);
    and (CE sum, correct). Nothing in it waits for the GPU, and torch.compile traces it into one graph."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.precision == 'bf16'):
        logits, router = model(x)
    logits = logits.float()[:, :hi].clone()
    logits[:, :lo] = float('-inf')  # only the current task's classes compete (SPEC section 4)
    ce = F.cross_entropy(logits, y)
    loss = ce + args.router_weight * router + args.proto_weight * prompt.prototype_loss()
    return loss, torch.stack([ce.detach() * len(y), (logits.argmax(1) == y).sum()])


@torch.no_grad()
def task_features(r, task, released=False):
    """(final CLS features, dataset indices) of ALL the task's training images (no drop_last, SPEC section 9),
    prompts in evaluation mode, training augmentation as released; released: the released pass's loader."""
    r.model.eval()
    size = r.args.batch_size if released else r.args.eval_batch_size
    for x, i in data.batches(r.train_set, task.idx, size, r.args.augment, r.gen, drop_last=released,
                             shuffle=released, **r.feed):
        if len(i):
            with r.autocast():
                f = r.model.vit(x)
            yield f, i


def usage_pass(r, task):
    """SPEC section 5: each expert's top-K hits over the task's training images, summed over ranks.
    --released-quirks: the released pass (SPEC section 9), each batch's hits joining `usage` at once."""
    prompt, released = r.model.prompt, r.args.released_quirks
    prompt.usage_pass = 'released' if released else 'no-exclusion'
    for _ in task_features(r, task, released):
        if released:  # drop_last with batch >= ranks: every rank has every batch
            all_sum(prompt.hits, r.world)
            prompt.end_usage_pass()
    prompt.usage_pass = None
    if not released:
        all_sum(prompt.hits, r.world)
        prompt.end_usage_pass()


def class_statistics(r, task):
    """SPEC section 6 step 4: per-class mean and population variance of the task's final CLS features."""
    sums = torch.zeros(2, *r.stats['mean'].shape, dtype=torch.float64, device=r.device)  # sum f, sum f^2
    for f, i in task_features(r, task):
        f = f.double()
        sums.index_add_(1, r.y_train[i], torch.stack([f, f * f]))
    all_sum(sums, r.world)
    # images per class, known to every rank
    n = torch.bincount(r.y_train[task.idx.to(r.device)] - task.lo, minlength=r.per_task)[:, None].clamp(min=1)
    mean = r.stats['mean'][task.lo:task.hi] = sums[0, task.lo:task.hi] / n
    r.stats['var'][task.lo:task.hi] = (sums[1, task.lo:task.hi] / n - mean ** 2).clamp(min=0)


def align_classifier(r, task):
    """SPEC section 6 step 5: retrain the head on features drawn from N(mu_c, diag(var_c) + 1e-4) of every
    seen class; of the released pool of batch x ratio samples per class, only the crct_num batches used."""
    args, head, seen, earlier = r.args, r.model.head, task.hi, task.lo
    per = args.batch_size * args.ca_ratio
    opt = torch.optim.AdamW(head.parameters(), lr=0.0, weight_decay=5e-4)
    schedule = iter(ca_lr_schedule(args, earlier))
    mean, std = r.stats['mean'][:seen].float(), (r.stats['var'][:seen] + 1e-4).sqrt().float()
    for epoch in range(args.ca_epochs):
        pick = torch.randperm(seen * per, generator=r.ca_gen)[:earlier * per]
        noise = torch.randn(len(pick), mean.shape[1], generator=r.ca_gen).to(r.device)
        y = (pick // per).to(r.device)
        z = mean[y] + std[y] * noise
        for b in range(earlier):
            opt.param_groups[0]['lr'] = next(schedule)
            loss = F.cross_entropy(head(z[b * per:(b + 1) * per])[:, :seen], y[b * per:(b + 1) * per])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if r.world > 1:  # identical draws on every rank already; broadcasting rules out kernel-level drift
        for p in head.parameters():
            dist.broadcast(p.data, 0)
    if not torch.stack([p.isfinite().all() for p in head.parameters()]).all():  # one host read per task
        raise FloatingPointError(f'classifier alignment diverged at task {task.t + 1} (a non-finite head): '
                                 f'lower --ca-lr; {r.checkpoint} holds the last completed task')


@torch.no_grad()
def evaluate(r, task):
    """SPEC section 6 step 6: accuracy (%) on each seen task's test set over all seen classes, no task id."""
    r.model.eval()
    idx = torch.nonzero(r.y_test < task.hi).squeeze(1).cpu()
    counts = torch.zeros(2, task.t + 1, dtype=torch.float64, device=r.y_test.device)  # right, all: per task
    for x, i in data.batches(r.test_set, idx, r.args.eval_batch_size, False, None, **r.feed):
        if len(i):
            with r.autocast():
                pred = r.model.head(r.model.vit(x)).float()[:, :task.hi].argmax(1)
            y = r.y_test[i]
            counts.index_add_(1, y // r.per_task, torch.stack([pred == y, torch.ones_like(y)]).double())
    right, images = all_sum(counts, r.world)
    return (100 * right / images.clamp(min=1)).tolist()


def record(r, task, row, seconds, images_per_second):
    m, prompt = r.metrics, r.model.prompt
    for k, v in dict(acc=row, task_seconds=seconds, images_per_second=images_per_second,
                     peak_memory_mb=peak_memory_mb(r.device)).items():
        m[k].append(v)
    usage = prompt.usage.cpu()
    m['task_usage'].append((usage - torch.tensor(m.get('usage', 0))).sum(1).tolist())  # (L, E) this task's
    m.update(summarise(m['acc']), usage=usage.tolist())
    r.log(f'task {task.t + 1}/{r.args.tasks} done in {seconds:.0f}s: accuracy per task '
          f'{" ".join(f"{a:.1f}" for a in row)} | average {sum(row) / len(row):.2f}')
    used = (prompt.usage > 0).sum(-1).float()  # (L, H)
    top = prompt.usage_shares().amax(-1)       # (L, H)
    freq = prompt.frequent.sum(-1).float()     # (L, H)
    r.log(f'expert usage per prompted block, mean over heads (experts used of {prompt.experts}, busiest '
          'expert share, experts in U): ' + ' | '.join(f'block {l}: {used[l].mean():.1f}, '
                                                       f'{100 * top[l].mean():.0f}%, {freq[l].mean():.1f}'
                                                       for l in range(prompt.layers)))


def save_checkpoint(r, task):
    """After every task, by rank 0, atomically: all a resumed run needs to end exactly as an uninterrupted
    one, and the sha256 of it, inside the same file (a kill cannot part them)."""
    if r.rank == 0:
        os.makedirs(r.out, exist_ok=True)
        state = dict(prompt=r.model.prompt.state_dict(), head=r.model.head.state_dict(), stats=r.stats,
                     metrics=r.metrics, task=task.t + 1, gen=r.gen.get_state(), ca_gen=r.ca_gen.get_state())
        atomic_save(dict(state, sha256=digest(state)), r.checkpoint)
        atomic_save(r.metrics, os.path.join(r.out, 'metrics.json'))
        plot(r)  # after every task, so a long run can be watched


def finish(r):
    """The accuracy matrix, the time of each protocol step and the peak memory; metrics.json gets them too."""
    m = r.metrics  # at least one task is done: --stop-after is at least 1
    r.log('accuracy matrix (row = after task t, column = task i):')
    for row in m['acc']:
        r.log('  ' + ' '.join(f'{a:6.2f}' for a in row))
    part = '' if len(m['acc']) == r.args.tasks else f"  (after task {len(m['acc'])} of {r.args.tasks})"
    r.log(f"FAA {m['faa']:.2f}  CAA {m['caa']:.2f}  forgetting {m['forgetting']:.2f}{part}")
    steps, peak = m['step_seconds'], max(m['peak_memory_mb']) / 1024
    r.log('time per protocol step: ' + ' | '.join(f'{k} {v:.1f}s' for k, v in steps.items()) +
          f' | total {sum(steps.values()):.1f}s; peak memory {peak:.2f} GiB')
    if r.rank == 0:
        atomic_save(m, os.path.join(r.out, 'metrics.json'))
        if importlib.util.find_spec('matplotlib') is None:  # plot() skipped them after every task
            r.log('accuracy.png and usage.png skipped: matplotlib is not installed (pip install matplotlib)')


# -----------------------------------------------------------------------------
# small helpers

def all_sum(t, world):
    if world > 1:
        dist.all_reduce(t)
    return t


def atomic_save(obj, path):
    """obj to path, by its suffix (.json, .png: a matplotlib figure, else torch.save), through path.tmp."""
    tmp = path + '.tmp'
    try:
        if path.endswith('.json'):
            with open(tmp, 'w') as f:
                json.dump(obj, f, indent=1)
        elif path.endswith('.png'):
            obj.savefig(tmp, format='png', dpi=100)
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)  # a kill never leaves a half-written file under the real name
    except (OSError, RuntimeError) as e:  # torch.save: RuntimeError on a full disk or a read-only folder
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OSError(f'cannot write {path} ({" ".join(str(e).split())}): free space or fix permissions')


def digest(state):
    """sha256 of checkpoint content wherever its tensors are: their bytes in order, then the rest as JSON."""
    h = hashlib.sha256()
    h.update(json.dumps(state, default=lambda t: h.update(t.cpu().contiguous().numpy())).encode())
    return h.hexdigest()


def summarise(acc):
    """SPEC section 8 from the lower-triangular accuracy matrix acc[t][i] (percent)."""
    T = len(acc)
    ffm = sum(max(acc[t][i] for t in range(i, T - 1)) - acc[-1][i] for i in range(T - 1)) / max(1, T - 1)
    return dict(faa=sum(acc[-1]) / T, caa=sum(sum(row) / len(row) for row in acc) / T, forgetting=ffm)


# -----------------------------------------------------------------------------
# instrumentation: step times, memory and the pictures

def timed(r, step, fn, *a):
    """fn(*a), its wall time (CUDA work included) added to metrics['step_seconds'][step]: a protocol step."""
    sync = torch.cuda.synchronize if r.device.type == 'cuda' else (lambda: None)
    sync()
    t0 = time.time()
    out = fn(*a)
    sync()
    r.metrics['step_seconds'][step] += time.time() - t0
    return out


def peak_memory_mb(device):  # CUDA: peak allocation since the last call (a task); CPU: the process's peak RSS
    if device.type != 'cuda':
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def plot(r):
    """accuracy.png (the accuracy matrix) and usage.png (each task's top-K hits per expert, heads summed, a
    panel per prompted block; triangles: experts in the frequently-used set U, sized by share of heads)."""
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure  # not pyplot: no GUI backend, no figures kept open
    except ImportError:
        return
    m, prompt = r.metrics, r.model.prompt
    acc, T, name = m['acc'], len(m['acc']), f"{r.args.dataset}, seed {m['seed']}"
    grid = [[acc[t][i] if i <= t else float('nan') for i in range(T)] for t in range(T)]
    ax = (fig := Figure(figsize=(2.5 + 0.5 * T, 1.5 + 0.45 * T), layout='constrained')).subplots()
    im = ax.imshow(grid, vmin=0, vmax=100, cmap='viridis')
    ax.set(xticks=range(T), xticklabels=range(1, T + 1), yticks=range(T), yticklabels=range(1, T + 1),
           xlabel='task evaluated', ylabel='after training task', title=f"{name}\nFAA {m['faa']:.2f}")
    for t in range(T):
        for i in range(t + 1):
            ax.text(i, t, f'{acc[t][i]:.0f}', ha='center', va='center', fontsize=8,
                    color='w' if acc[t][i] < 60 else 'k')
    fig.colorbar(im, ax=ax, label='accuracy (%)')
    atomic_save(fig, os.path.join(r.out, 'accuracy.png'))
    hits = torch.tensor(m['task_usage'], dtype=torch.float64)  # (T, L, E)
    L, E = hits.shape[1:]
    share = prompt.frequent.double().mean(1).cpu()             # (L, E) heads with the expert in U
    fig = Figure(figsize=(3.5 + 0.25 * E, 1 + 1.4 * L), layout='constrained')
    axes = fig.subplots(L, 1, sharex=True, squeeze=False)
    colors = colormaps['viridis'](torch.linspace(0, 1, T).tolist())
    for l, ax in enumerate(axes[:, 0]):
        for t in range(T):
            ax.bar(range(E), hits[t, l], bottom=hits[:t, l].sum(0), color=colors[t], label=f'task {t + 1}')
        bottom = hits[:, l].sum(0)
        ax.scatter(range(E), bottom * 1.05 + 1, s=40 * share[l], marker='v', c='k')  # size 0: not in U
        ax.set(ylabel='top-K hits', ylim=(0, 1.2 * bottom.max().item() + 1), xticks=range(E))
        ax.set_title(f'block {l}', loc='left', fontsize=9)
    for size, heads in ((40, 'all heads'), (20, 'half the heads')):  # legend entries for the markers
        axes[0, 0].scatter([], [], s=size, marker='v', c='k', label=f'in U (frequently used), {heads}')
    axes[-1, 0].set_xlabel(f'expert (of {E} per head)')
    fig.legend(*axes[0, 0].get_legend_handles_labels(), fontsize=7, loc='outside right center',
               ncols=math.ceil((T + 2) / (7 * L)))  # a column per 7 entries per panel: none overflows
    fig.suptitle(f'{name}: expert usage after task {T}\n(hits summed over {prompt.heads} heads)', fontsize=10)
    atomic_save(fig, os.path.join(r.out, 'usage.png'))


def main(argv=None):
    args = parse_args(argv)
    world, rank = int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0))
    lock, new = None, []
    try:
        if args.batch_size < world:
            raise ValueError(f'--batch-size {args.batch_size} is the global batch: it must be at least the '
                             f'{world} processes')
        device, gpus = torch.device(args.device), torch.cuda.device_count()
        if device.type == 'cuda' and world > 1:  # torchrun: the process's own GPU
            device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        if device.type == 'cuda' and (device.index or 0) >= gpus:
            raise ValueError(f'--device {device}: torch finds ' + (f'{gpus} CUDA GPU(s) here, cuda:0 to '
                             f'cuda:{gpus - 1}' if gpus else 'no CUDA GPU here: use --device cpu'))
        if args.workers is None:  # the cores this process may use, shared by this machine's ranks, less one
            cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
            args.workers = max(1, cores // int(os.environ.get('LOCAL_WORLD_SIZE', 1)) - 1)
        if rank == 0 and args.top_k == args.experts and not args.dense:  # SPEC section 3
            print(f'--top-k {args.top_k} = --experts: dense mode (no routing, usage counts, prototype loss)')
        if rank == 0 and args.row != (args.dataset, args.tasks):  # SPEC section 8: rows for some runs only
            whose = 'its' if args.row[0] == args.dataset else f"{args.row[0]}'s"
            print(f'{args.dataset} has no row for {args.tasks} tasks: hyperparameters from {whose} '
                  f'{args.row[1]}-task row' + ', iter_step and hold derived' * (args.dataset != 'cub200'))
        if device.type == 'cuda' and args.precision == 'fp32' and not args.paper:
            torch.set_float32_matmul_precision('high')  # TF32 matmuls; expert routing stays in exact fp32
        if device.type == 'cuda' and device.index is not None:  # GPU N: timing and pinned copies there too
            torch.cuda.set_device(device)
        if world > 1:
            dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                                    timeout=timedelta(minutes=args.timeout))
        data.check_data_dir(args.dataset, args.data_dir, args.tasks)  # what the file system tells, first
        lock, new = claim_out(args) if rank == 0 else (None, [])
        if world > 1:
            dist.barrier()
        metrics = [run(args, s, rank, world, device) for s in args.seeds]
        done = {s: m for s, m in zip(args.seeds, metrics) if len(m['acc']) == args.tasks}  # each seed once
        if rank == 0 and len(done) > 1:
            summary = dict(seeds=list(done))
            for k in ('faa', 'caa', 'forgetting'):
                v = torch.tensor([m[k] for m in done.values()], dtype=torch.float64)
                summary[k] = dict(mean=v.mean().item(), std=v.std().item(), per_seed=v.tolist())
                print(f"{k}: {summary[k]['mean']:.2f} ± {summary[k]['std']:.2f} over seeds {list(done)}")
            atomic_save(summary, os.path.join(args.out, 'summary.json'))
        if rank == 0:
            print(f"results in {os.path.join(args.out, f'seed{args.seeds[0]}' * (len(args.seeds) == 1))}"
                  ' (a second run there needs --resume or another --out)')
    except (ValueError, OSError, FloatingPointError, RuntimeError) as e:  # OSError: files, downloads
        return failed(e, args, world, rank)
    finally:
        release(lock, new)
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def failed(e, args, world, rank):
    """The exit status of a failed run: one `error:` line and 2 from the first rank to fail, a quiet 0 from
    the others (they learn of it at their next collective), so that the line is the last any rank prints."""
    store = dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
    first = store is None
    with contextlib.suppress(Exception):  # torchrun's store; gone, it went with the failed rank that held it
        first = first or store.compare_set('smope/failed', '', str(rank)) == str(rank).encode()
    if isinstance(e, RuntimeError) and first and (store is None or 'timed out' not in str(e).lower()):
        raise e  # not a collective waiting in vain for another rank: a bug, with its traceback
    if not first:
        return 0
    if isinstance(e, RuntimeError):
        e = (f"{f'rank {1 - rank}' if world == 2 else 'a rank'} did not answer within --timeout "
             f'{args.timeout:g} minutes: see its output, or raise --timeout')
    print(f'error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main())
