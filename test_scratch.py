"""New tests, to be merged into test_smope.py by subject."""
import json, os, random, re, subprocess, sys
from pathlib import Path
import pytest, torch
from torchvision.io import write_jpeg
import data, train
from vit import ViT
from test_smope import FAST, REPO, WNIDS, run_train, one_line_error, cifar_dir, imr_dir, cub_dir, base_run  # noqa: F401

import shutil
from torchvision.io import write_png

# ------------------------------------------------------------ data.py: your own folder

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


# ------------------------------------------------------------ train.py: run folder, checkpoints, resume

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


@pytest.mark.parametrize('argv, flag', [
    (['--dataset', 'cifar100', '--data-dir', 'LOOP'], '--data-dir'), (['--dataset', 'cifar100', '--data-dir', 'FILE/x'], '--data-dir'),
    (['--out', 'LOOP'], '--out'), (['--lr', '1e38'], '--lr'), (['--ca-lr', '1e38'], '--ca-lr'), (['--eps', '1e39'], '--eps'),
    (['--router-weight', '1e39'], '--router-weight'), (['--proto-weight', '1e39'], '--proto-weight'),
])
def test_paths_the_os_refuses_and_float32_overflows_fail_first(argv, flag, tmp_path, monkeypatch, capsys):
    (tmp_path / 'LOOP').symlink_to(tmp_path / 'LOOP')
    def work(*a, **k):
        raise AssertionError('loaded or downloaded before the bad flag was reported')
    monkeypatch.setattr(data, 'load', work)
    monkeypatch.setattr(train, 'vit_b_16', work)
    (tmp_path / 'FILE').write_text('x')
    before = sorted(tmp_path.rglob('*'))
    argv = [str(tmp_path / a) if a.split('/')[0] in ('FILE', 'LOOP') else a for a in argv]
    try:
        code = train.main(FAST + ['--out', str(tmp_path / 'run')] + argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if 'error:' in line]
    assert code == 2 and err.splitlines() == errors and len(errors) == 1 and flag in errors[0], err
    assert 'epoch' not in out and sorted(tmp_path.rglob('*')) == before


# ------------------------------------------------------------ train.py: torchrun

def failing_rank_script(tmp_path, body):
    script = tmp_path / 'run.py'
    script.write_text(f"""import os, sys, time
sys.path.insert(0, {REPO!r})
import train
if os.environ['RANK'] == '1':
    statistics = train.class_statistics
    def class_statistics(r, task):
        if task.t == 1:
{body}
        return statistics(r, task)
    train.class_statistics = class_statistics
sys.exit(train.main(sys.argv[1:]))
""")
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script)]


def ranks_lines(stderr):  # what the ranks printed, before torchrun's own report
    lines = [line for line in stderr.splitlines() if 'FutureWarning' not in line and 'DistributedDataParallel(' not in line]
    return lines[:next((i for i, line in enumerate(lines) if 'torch/distributed/elastic' in line), len(lines))]


def test_torchrun_a_rank_failing_mid_run_speaks_last(tmp_path):
    """Rank 1 alone meets an unreadable image at task 2's statistics: its one line is the last any rank prints,
    rank 0 (waiting in a collective) exits without a traceback, the run exits non-zero."""
    cmd = failing_rank_script(tmp_path, "            raise ValueError('/data/x.jpg: not a readable image "
                                        "(truncated or corrupt?): replace it, then --resume')")
    r = subprocess.run(cmd + FAST + ['--out', str(tmp_path / 'out'), '--stop-after', '2'], capture_output=True,
                       text=True, timeout=110, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode != 0
    assert ranks_lines(r.stderr)[-1] == ('error: /data/x.jpg: not a readable image (truncated or corrupt?): '
                                         'replace it, then --resume'), r.stderr[-3000:]
    assert r.stderr.count('error:') == 1 and r.stderr.count('Traceback') == 1  # torchrun's own
    assert torch.load(tmp_path / 'out' / 'seed0' / 'checkpoint.pt', weights_only=False)['task'] == 1


def test_torchrun_a_rank_that_stops_answering_is_named(tmp_path):
    """Rank 1 freezes at task 2's statistics: after --timeout rank 0 says which rank did not answer, in one line,
    with no traceback."""
    cmd = failing_rank_script(tmp_path, '            time.sleep(300)')
    r = subprocess.run(cmd + FAST + ['--out', str(tmp_path / 'out'), '--stop-after', '2', '--timeout', '0.1'],
                       capture_output=True, text=True, timeout=110, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode != 0
    assert ranks_lines(r.stderr)[-1] == ('error: rank 1 did not answer within --timeout 0.1 minutes: see its '
                                         'output, or raise --timeout'), r.stderr[-3000:]
    assert r.stderr.count('error:') == 1 and r.stderr.count('Traceback') == 1


# ------------------------------------------------------------ train.py: the first hour

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


def test_pictures_say_what_every_mark_means(base_run, tmp_path, monkeypatch):
    pytest.importorskip('matplotlib')
    figures = {}

    def keep(obj, path):
        if path.endswith('.png'):
            figures[os.path.basename(path)] = obj
        else:
            save(obj, path)
    save = train.atomic_save
    monkeypatch.setattr(train, 'atomic_save', keep)
    monkeypatch.setattr('matplotlib.pyplot.close', lambda fig: None)
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


def test_no_issue_numbers_in_the_project_files():
    for name in ('smope.py', 'vit.py', 'data.py', 'train.py', 'bench.py', 'test_smope.py', 'README.md', 'SPEC.md'):
        text = Path(REPO, name).read_text()
        assert not re.search(r'issue [0-9]', text, re.I), name
