"""Datasets, class orders and augmented batches for class-incremental learning (SPEC section 7).
Every random draw comes from the caller's generator and each global batch is drawn identically on
every rank, so runs are reproducible, resumable and independent of the number of ranks and workers."""
import os
import random
import shutil
import stat
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchvision import datasets
from torchvision.datasets.folder import find_classes, has_file_allowed_extension, make_dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

import vit

IMR_URL = 'https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar'
IMR_MD5 = 'a61312130a589d0ca1a8fca1f2bd3337'
SPLIT_URL = 'https://raw.githubusercontent.com/GT-RIPL/CODA-Prompt/main/dataloaders/splits/imagenet-r_{}.yaml'
SPLIT_SHA256 = {'train': '6bcaa14ca9359915ac3a44c48ae71388146385686eb15da79a37844421a0b845',
                'test': '57275ac242d68983a4f39ccb81ec34f48b1bd920b9cd79e6e8040d7c042db02a'}
CUB_URL = 'https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1'
CUB_MD5 = '97eceeb196236b17998738112f37df78'
CUB_FILES = ('images.txt', 'image_class_labels.txt', 'train_test_split.txt')
NAMES = ('cifar100', 'imagenet-r', 'cub200', 'folder', 'synthetic')
CLASSES = {'cifar100': 100, 'imagenet-r': 200, 'cub200': 200, 'synthetic': 50}  # a folder's are counted
EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp')  # of torchvision's IMG_EXTENSIONS, those decode_image reads


@dataclass(eq=False)
class Images:
    """A labelled image set held either as a uint8 tensor or as files."""
    labels: torch.Tensor                # (N,) int64 original class ids
    num_classes: int
    images: torch.Tensor | None = None  # (N,3,h,w) uint8
    files: list[str] | None = None      # absolute paths
    classes: list[str] | None = None    # class names by id, where the data set has its own
    _cache: dict = field(default_factory=dict, repr=False)  # device -> images there; (S, resize) -> tests

    def __len__(self):
        return len(self.labels)

    def names(self):  # class names by id: its own, else each class's image folder (wnids, CUB-200's)
        found = dict(zip(self.labels.tolist(), (Path(f).parent.name for f in self.files or [])))
        return self.classes or [found.get(c, str(c)) for c in range(self.num_classes)]

    def on(self, device):  # the whole uint8 set on `device`, moved once
        if str(device) not in self._cache:
            self._cache[str(device)] = self.images.to(device)
        return self._cache[str(device)]

# -----------------------------------------------------------------------------
# datasets

def load(name, data_dir='data', download=True, split='fixed', seed=0):
    """(train, test) Images of a benchmark; a missing data set is downloaded unless download=False."""
    if name not in NAMES:
        raise ValueError(f'unknown dataset {name!r}: choose one of {", ".join(NAMES)}')
    check_data_dir(name, data_dir)
    if name == 'cifar100':
        return cifar100(data_dir, download)
    if name in ('cub200', 'folder'):
        return cub200(data_dir, download) if name == 'cub200' else folder(Path(data_dir).absolute(), seed)
    return imagenet_r(data_dir, download, split, seed) if name == 'imagenet-r' else synthetic(seed=seed)


def check_data_dir(name, data_dir, tasks=None):
    """What can be known before any download (train.py asks before it makes --out): --data-dir is a folder,
    or absent; a folder data set's tree is whole; `tasks` divides the classes."""
    try:
        if name != 'synthetic' and not stat.S_ISDIR(os.stat(data_dir).st_mode):
            raise ValueError(f'--data-dir {data_dir} is not a folder')
    except FileNotFoundError:  # made by a download; a folder data set finds no class folders
        pass
    except OSError as e:  # a symbolic link loop, a file on the way, no permission
        raise ValueError(f'--data-dir {data_dir}: {e.strerror}') from None
    if tasks and (C := CLASSES.get(name) or folder(Path(data_dir).absolute(), 0)[0].num_classes) % tasks:
        where = name if name in CLASSES else data_dir
        raise ValueError(f'--tasks {tasks} must divide the {C} classes of {where}')


def cifar100(data_dir, download):
    C = datasets.CIFAR100
    root = Path(data_dir).resolve() / C.base_folder
    fetch_archive(root, C.filename, C.url, C.tgz_md5, download, f'CIFAR-100 not found: expected {root}/ '
                  "holding train, test and meta (torchvision's layout)")
    try:  # torchvision checks each file's md5
        sets = [C(root=str(root.parent), train=train, download=False) for train in (True, False)]
    except RuntimeError:
        raise ValueError(f'{root} is incomplete or corrupted (md5 of train, test or meta): '
                         'delete it to download it again') from None
    # .data is (N,32,32,3) uint8 -> (N,3,32,32)
    return tuple(Images(torch.tensor(d.targets), 100, classes=d.classes,
                        images=torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous()) for d in sets)


def imagenet_r(data_dir, download, split, seed):
    if split not in ('fixed', 'random'):
        raise ValueError(f"unknown split {split!r}: choose 'fixed' or 'random'")
    data_dir = Path(data_dir).resolve()
    root = data_dir / 'imagenet-r'
    fetch_archive(root, 'imagenet-r.tar', IMR_URL, IMR_MD5, download,
                  f'ImageNet-R not found: expected {root}/<wnid>/<image>.jpg (200 class folders)')
    if split == 'random':
        return random_split(root, seed)
    parts = []
    for part in ('train', 'test'):
        path, url = data_dir / f'imagenet-r_{part}.yaml', SPLIT_URL.format(part)
        if not path.exists():
            if not download:
                raise ValueError(f'{path} not found (the released {part} split list): run without '
                                 f'--no-download to fetch {url}, or use --split random')
            vit.fetch(url, path, 'sha256', SPLIT_SHA256[part])
        files, labels = read_split(path)
        # listed as data/imagenet-r/<wnid>/<file>.jpg, relative to the released code's root
        parts.append(_existing([str(data_dir / f.removeprefix('data/')) for f in files], labels, path))
    C = 1 + max(int(y.max()) for _, y in parts)
    return tuple(Images(y, C, files=f) for f, y in parts)


def _existing(files, labels, listed_in):
    if missing := [f for f in files if not os.path.isfile(f)]:
        raise ValueError(f'{len(missing)} files listed in {listed_in} are missing, e.g. {missing[0]}')
    return files, torch.tensor(labels)


def cub200(data_dir, download):
    """CUB-200-2011 with its official split (SPEC section 7): label = class id - 1, paths from images.txt."""
    root = Path(data_dir).resolve() / 'CUB_200_2011'
    fetch_archive(root, 'CUB_200_2011.tgz', CUB_URL, CUB_MD5, download, f'CUB-200-2011 not found: expected '
                  f'{root}/ holding {", ".join(CUB_FILES)} and images/<class>/<image>.jpg')
    cols = []  # per file: image id -> its value
    for name in CUB_FILES:
        path = root / name
        rows = [r for r in map(str.split, path.read_text().splitlines()) if r] if path.is_file() else []
        if not rows or any(len(r) != 2 for r in rows):
            raise ValueError(f'{path}: missing, empty or not "<image id> <value>" per line '
                             '(the CUB-200-2011 layout)')
        cols.append(dict(rows))
    paths, classes, is_train = cols
    if not paths.keys() == classes.keys() == is_train.keys():
        raise ValueError(f'{root}: {", ".join(CUB_FILES)} do not list the same image ids')
    if not all(c.isdigit() and int(c) >= 1 for c in classes.values()) or set(is_train.values()) - {'0', '1'}:
        raise ValueError(f'{root}: class ids must be whole numbers from 1 and train/test flags 0 or 1')
    parts = []
    for flag in ('1', '0'):  # 1 = train
        ids = [i for i in paths if is_train[i] == flag]
        files = [str(root / 'images' / paths[i]) for i in ids]
        parts.append(_existing(files, [int(classes[i]) - 1 for i in ids], root / 'images.txt'))
    C = max(int(c) for c in classes.values())
    return tuple(Images(y, C, files=f) for f, y in parts)


def read_split(path):
    """The published lists are YAML holding two flat lists, 'data:' then 'targets:': no YAML parser needed."""
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    k = lines.index('targets:') if 'targets:' in lines else 0
    items = lines[1:k] + lines[k + 1:]
    if lines[:1] != ['data:'] or len(lines) != 2 * k or not all(s.startswith('- ') for s in items):
        raise ValueError(f"{path}: expected a 'data:' list and a 'targets:' list of the same length")
    return [s[2:].strip() for s in lines[1:k]], [int(s[2:]) for s in lines[k + 1:]]


def fetch_archive(root, archive, url, md5, download, missing):
    """Unless folder root is there (else `missing`, under download=False): download `archive` beside it unless
    it is there, check it and unpack it so that root appears whole or not at all (extracted into a hidden
    folder first, then moved into place)."""
    if root.is_dir():
        return
    if not download:
        raise ValueError(f'{missing}; run without --no-download to fetch {url}')
    path, tmp = root.parent / archive, root.parent / f'.{root.name}.unpacking'
    with vit.locked(root):
        if root.is_dir():  # another run unpacked it while this one waited its turn
            return
        if path.is_file() and (got := vit.checksum(path, 'md5')) != md5:  # put there by hand, or left earlier
            raise ValueError(f'{path}: md5 {got} does not match the expected {md5}: delete it to download it '
                             'again')
        vit.fetch(url, path, 'md5', md5)  # unless it is there
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with tarfile.open(path) as tar:
                tar.extraction_filter = getattr(tarfile, 'data_filter', None)  # Python's own, where it has it
                tar.extractall(tmp, (_inside(m) for m in tar))
            os.replace(tmp / root.name, root)
        except Exception as e:
            raise ValueError(f'{path} did not unpack into {root.name}/ ({" ".join(str(e).split())}): '
                             'delete it to download it again') from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _inside(m):  # a file, folder or link, its name and target relative without '..': none lands outside
    paths = [m.name] + ([m.linkname] if m.issym() or m.islnk() else [])
    if not (m.isfile() or m.isdir() or paths[1:]) or any(p[:1] == '/' or '..' in p.split('/') for p in paths):
        raise ValueError(f"member {' -> '.join(paths)} is not a file, folder or link inside it: refused")
    return m


def folder(root, seed):
    """--dataset folder (SPEC section 7): root/train/<class>/ and root/test/<class>/ as given, else
    root/<class>/ split 80/20 per class by the seed, as ImageNet-R's --split random. Labels: sorted names."""
    if not (root / 'train').is_dir() and not (root / 'test').is_dir():
        return random_split(root, seed)
    (names, *train), (test_names, *test) = (image_folder(root / part) for part in ('train', 'test'))
    if odd := sorted(set(names) ^ set(test_names)):
        raise ValueError(f"{root}: train/ and test/ must hold the same class folders, but {odd[0]!r} is in "
                         f"{'train' if odd[0] in names else 'test'}/ only")
    return tuple(Images(torch.tensor(y), len(names), files=f, classes=names) for f, y in (train, test))


def image_folder(root):
    """torchvision's ImageFolder listing, hidden files and folders skipped: (class names, files, labels), the
    files sorted and grouped by class."""
    image = lambda p: has_file_allowed_extension(p, EXTENSIONS) and '/.' not in p[len(str(root)):]
    try:
        if not (names := [c for c in find_classes(root)[0] if not c.startswith('.')]):
            raise FileNotFoundError('no class folders')
        files, labels = zip(*make_dataset(root, {c: i for i, c in enumerate(names)}, is_valid_file=image))
    except FileNotFoundError as e:  # no folder, no class folders, class folders without images
        raise ValueError(f'{root}: {str(e).strip()} (expected {root}/<class>/<image>, '
                         f'{"/".join(EXTENSIONS)})') from None
    return names, list(files), list(labels)


def random_split(root, seed, test_frac=0.2):
    """A seeded per-class 80/20 split of every image under root/<class>/; label = index of the sorted name."""
    g = torch.Generator().manual_seed(seed)
    names, files, labels = image_folder(root)
    train, test, start = ([], []), ([], []), 0  # (files, labels)
    for c, n in enumerate(torch.bincount(torch.tensor(labels)).tolist()):
        if n < 2:
            raise ValueError(f'{root / names[c]} has {n} image: the 80/20 split needs 2 per class')
        n_test = min(max(1, round(test_frac * n)), n - 1)
        perm = (start + torch.randperm(n, generator=g)).tolist()
        for part, ks in ((test, perm[:n_test]), (train, perm[n_test:])):
            part[0].extend(files[k] for k in ks)
            part[1].extend([c] * len(ks))
        start += n
    return tuple(Images(torch.tensor(y), len(names), files=f, classes=names) for f, y in (train, test))


def synthetic(num_classes=50, train_per_class=40, test_per_class=10, size=32, seed=0):
    """Class prototypes = a base colour plus a smooth random pattern; samples: shifted, rescaled, noisy."""
    g = torch.Generator().manual_seed(seed)
    m = size // 8  # max shift in pixels
    pattern = torch.nn.functional.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), size + 2 * m,
                                              mode='bilinear')
    protos = 0.5 * torch.rand(num_classes, 3, 1, 1, generator=g) + 0.5 * pattern  # (C,3,s+2m,s+2m)

    def draw(per_class):
        y = torch.arange(num_classes).repeat_interleave(per_class)
        dy, dx = torch.randint(0, 2 * m + 1, (2, len(y), 1), generator=g)
        rows, cols = dy + torch.arange(size), dx + torch.arange(size)                  # (n,s)
        x = protos[y[:, None, None], :, rows[:, :, None], cols[:, None, :]]            # (n,s,s,3)
        x = x.permute(0, 3, 1, 2) * (0.8 + 0.4 * torch.rand(len(y), 1, 1, 1, generator=g))
        x = x + 0.1 * torch.randn(x.shape, generator=g)
        return Images(y, num_classes, images=(x.clamp(0, 1) * 255).round().to(torch.uint8))
    return draw(train_per_class), draw(test_per_class)

# -----------------------------------------------------------------------------
# class-incremental tasks

def class_order(num_classes, seed):
    order = list(range(num_classes))
    random.Random(seed).shuffle(order)  # the released code's random.seed(seed); random.shuffle(order)
    return order


def split_tasks(order, tasks):
    if tasks < 1 or len(order) % tasks:
        raise ValueError(f'{tasks} tasks do not divide {len(order)} classes evenly')
    n = len(order) // tasks
    return [order[t * n:(t + 1) * n] for t in range(tasks)]


def remap(labels, order):  # class id -> its position in the order (argsort inverts a permutation)
    return torch.argsort(torch.tensor(order))[labels.cpu()].to(labels.device)

# -----------------------------------------------------------------------------
# batches

def crop_boxes(n, H, W, g, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params for n images at once: (n,4) int64 top, left, h, w."""
    area = H * W * torch.empty(n, 10).uniform_(*scale, generator=g)  # 10 tries per image, at once
    aspect = torch.exp(torch.empty(n, 10).uniform_(*torch.log(torch.tensor(ratio)), generator=g))
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.int().argmax(1, keepdim=True)  # the first of the 10 tries that fits
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    r = min(max(W / H, ratio[0]), ratio[1])  # fallback: a central crop, its ratio clamped into range
    fw, fh, hit = min(W, round(H * r)), min(H, round(W / r)), ok.any(1)
    w, h = torch.where(hit, w, float(fw)), torch.where(hit, h, float(fh))
    u = torch.rand(2, n, generator=g)
    top = torch.where(hit, (u[0] * (H - h + 1)).floor().clamp(max=H - h), (H - h) // 2)
    left = torch.where(hit, (u[1] * (W - w + 1)).floor().clamp(max=W - w), (W - w) // 2)
    return torch.stack([top, left, h, w], 1).long()


def _weights(start, length, n_in, n_out):
    """(n,) crop starts and lengths -> (n,n_out,n_in) weights of torchvision's bilinear resize of a crop."""
    start, length = start[:, None].float(), length[:, None].float()
    # align_corners=False
    src = ((torch.arange(n_out, device=start.device) + 0.5) * length / n_out - 0.5).clamp(min=0)
    src = start + torch.minimum(src, length - 1)  # (n,n_out) source coordinates, clamped inside the crop
    return (1 - (src[..., None] - torch.arange(n_in, device=start.device)).abs()).clamp(min=0)  # a tent


def augment(x, boxes, flips, S):
    """(n,3,H,W) uint8 -> (n,3,S,S) float in [0,1]: crop each box, bilinear-resize to SxS, mirror where flips.
    Resizing is two small matmuls per image: exactly torchvision's crop-then-resize, fast on any device."""
    wy = _weights(boxes[:, 0], boxes[:, 2], x.shape[2], S) / 255  # (n,S,H), scaling to [0,1] for free
    wx = _weights(boxes[:, 1], boxes[:, 3], x.shape[3], S)        # (n,S,W)
    wx = torch.where(flips[:, None, None], wx.flip(1), wx)  # mirroring = reversing the output columns
    return (wy[:, None] @ x.float() @ wx[:, None].transpose(2, 3)).clamp_(0, 1)


def _eval(x, S, resize):  # uint8 (...,3,H,W) -> (...,3,S,S): the released test transforms
    if resize == 'imagenet':  # Resize(256) then CenterCrop(224), scaled to S
        return TF.center_crop(TF.resize(x, [round(S * 256 / 224)], antialias=True), [S, S])
    return TF.resize(x, [S, S], antialias=True)  # 'cifar': the released Resize(224) of a square image


def _read(path):  # (3,h,w) uint8
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders and warns on every image
            warnings.simplefilter('ignore', DeprecationWarning)
            return decode_image(path, mode=ImageReadMode.RGB)
    except RuntimeError:
        raise ValueError(f'{path}: not a readable image (truncated or corrupt?): replace it, then --resume') \
            from None


class _Decode(torch.utils.data.Dataset):
    """Decodes one file per item (file index, seed); seed < 0 means the eval transform."""
    def __init__(self, files, S, resize):
        self.files, self.S, self.resize = files, S, resize

    def __getitem__(self, item):
        k, seed = item
        x, S = _read(self.files[k]), self.S
        if seed >= 0:  # per-sample generator: results do not depend on which worker runs it
            g = torch.Generator().manual_seed(seed)
            x = TF.resized_crop(x, *crop_boxes(1, *x.shape[1:], g)[0].tolist(), [S, S], antialias=True)
            return TF.horizontal_flip(x) if torch.rand(1, generator=g) < 0.5 else x
        return _eval(x, S, self.resize)


def batches(ds, idx, batch_size, train, generator, device, image_size=224, mean=None, std=None,
            resize='cifar', rank=0, world=1, workers=2, drop_last=False, shuffle=False):
    """Yields (images (b,3,S,S) float, dataset indices (b,)) of this rank's share of each global batch; train:
    shuffled and augmented, shuffle: shuffled, drop_last: full global batches only (SPEC section 6)."""
    if resize not in ('cifar', 'imagenet'):
        raise ValueError(f"unknown resize {resize!r}: choose 'cifar' or 'imagenet'")
    S, idx = image_size, idx.cpu()
    if mean is not None:  # (3,) each
        mean, std = (torch.as_tensor(v, device=device).float().view(3, 1, 1) for v in (mean, std))
    finish = lambda x: x if mean is None else x.sub_(mean).div_(std)  # x is always a fresh tensor
    # host -> GPU copies from pinned memory, queued without waiting (the caching host allocator keeps the
    # pinned block until its copy is done); on the CPU, t itself
    cuda = torch.device(device).type == 'cuda'
    put = lambda t: t.pin_memory().to(device, non_blocking=True) if cuda else t.to(device)
    mine = lambda t: t.tensor_split(world)[rank]  # this rank's slice of a global batch
    if train or shuffle:
        idx = idx[torch.randperm(len(idx), generator=generator)]
    starts = range(0, len(idx) - (batch_size - 1 if drop_last else 0), batch_size)

    if ds.files is None:
        for s in starts:
            b = idx[s:s + batch_size]
            i = put(mine(b))
            x = ds.on(device)[i]  # (b,3,H,W) uint8
            if train:  # draw for the whole global batch, so every rank draws the same
                boxes = crop_boxes(len(b), *ds.images.shape[2:], generator)
                flips = torch.rand(len(b), generator=generator) < 0.5
                x = augment(x, put(mine(boxes)), put(mine(flips)), S)
            else:
                x = _eval(x, S, resize).float().div_(255)
            yield finish(x), i
        return

    seeds = torch.randint(0, 2 ** 62, idx.shape, generator=generator) if train else torch.full(idx.shape, -1)
    plan = [list(zip(mine(idx[s:s + batch_size]).tolist(), mine(seeds[s:s + batch_size]).tolist()))
            for s in starts]
    # test images are evaluated after every task: decode each once per run and keep it (uint8, S×S;
    # ImageNet-R's 6,000 test images take 0.9 GB), decode training images afresh in the workers
    store = ds._cache.setdefault((S, resize), {}) if not train else None
    cached = lambda b: store is not None and all(k in store for k, _ in b)
    todo = [b for b in plan if b and not cached(b)]
    loader = iter(torch.utils.data.DataLoader(_Decode(ds.files, S, resize), batch_sampler=todo,
                                              num_workers=workers, pin_memory=torch.cuda.is_available()))
    for b in plan:  # a rank whose slice is empty still yields, so all ranks take the same number of steps
        if not b:
            x = torch.empty(0, 3, S, S, dtype=torch.uint8)
        elif cached(b):
            x = torch.stack([store[k] for k, _ in b])
        else:
            try:
                x = next(loader)
            except ValueError as e:  # a worker's error comes with its traceback in the message: keep our line
                loader = e.__traceback__ = None  # workers stop now (no frame holds them), not at a later gc
                raise ValueError(str(e).splitlines()[-1].removeprefix('ValueError: ')) from None
            if store is not None:
                store.update((k, xk.clone()) for (k, _), xk in zip(b, x))
        x = put(x).float().div_(255)
        yield finish(x), put(torch.tensor([k for k, _ in b], dtype=torch.long))
