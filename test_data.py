"""Tests for data.py on small fake datasets written in the real on-disk formats (no downloads)."""
import hashlib
import os
import pickle
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.io import write_jpeg
from torchvision.transforms.v2 import functional as TF

import data

SHARED = Path(__file__).resolve().parent.parent / 'shared' / 'data'
pytestmark = pytest.mark.filterwarnings('ignore:The image decoding and encoding:DeprecationWarning')


def one_line_error(fn, *args, match=None, **kw):
    with pytest.raises(ValueError, match=match) as e:
        fn(*args, **kw)
    assert '\n' not in str(e.value)
    return str(e.value)

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


def test_cifar100_missing(tmp_path):
    assert '--download' in one_line_error(data.load, 'cifar100', data_dir=tmp_path)

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
    assert '--download' in one_line_error(data.load, 'imagenet-r', data_dir=imr_dir)
    msg = one_line_error(data.load, 'imagenet-r', data_dir=tmp_path_factory.mktemp('empty'))
    assert '--download' in msg and data.IMR_URL in msg


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


@pytest.mark.skipif(not (SHARED / 'imagenet-r_train.yaml').exists(), reason='no shared/data split lists')
def test_real_split_lists():
    files = {}
    for part, n in (('train', 24000), ('test', 6000)):
        path = SHARED / f'imagenet-r_{part}.yaml'
        data.verify(path, data.SPLIT_SHA256[part])
        files[part], labels = data.read_split(path)
        assert len(files[part]) == len(labels) == n and len(set(files[part])) == n
        assert sorted(set(labels)) == list(range(200))
        assert all(f.startswith('data/imagenet-r/n') and f.endswith('.jpg') for f in files[part])
    assert not set(files['train']) & set(files['test'])


def test_verify_and_fetch(tmp_path, monkeypatch):
    f = tmp_path / 'imagenet-r_train.yaml'
    f.write_text('precious')
    msg = one_line_error(data.verify, f, '0' * 64)
    assert str(f) in msg and '0' * 64 in msg and hashlib.sha256(b'precious').hexdigest() in msg
    assert f.read_text() == 'precious'
    data.verify(f, hashlib.sha256(b'precious').hexdigest())
    # a download (faked) lands under a temporary name and replaces the target only once verified
    monkeypatch.setattr(data, 'download_url', lambda url, root, filename: Path(root, filename).write_text('got'))
    target = tmp_path / 'imagenet-r_test.yaml'
    one_line_error(data.fetch, 'https://x', target, '0' * 64)
    assert not target.exists() and (tmp_path / 'imagenet-r_test.yaml.part').read_text() == 'got'
    data.fetch('https://x', target, hashlib.sha256(b'got').hexdigest())  # fetched again, despite the leftover
    assert target.read_text() == 'got' and not (tmp_path / 'imagenet-r_test.yaml.part').exists()

# -----------------------------------------------------------------------------
# batched augmentation of tensor datasets

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


def test_errors():
    assert 'cifar100' in one_line_error(data.load, 'mnist')
    one_line_error(data.split_tasks, list(range(100)), 7, match='7 tasks')
    one_line_error(data.load, 'imagenet-r', split='half', match='split')
