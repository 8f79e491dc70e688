import json
import os
import subprocess
import sys

import pytest
import torch

import train

FAST = ['--dataset', 'synthetic', '--epochs', '1', '--ca-epochs', '2', '--batch-size', '32', '--workers', '0']


def run_train(tmp_path, *extra, name='run'):
    out = str(tmp_path / name)
    assert train.main(FAST + ['--out', out] + list(extra)) == 0
    with open(os.path.join(out, 'seed0', 'metrics.json')) as f:
        return json.load(f), out


@pytest.fixture(scope='module')
def base_run(tmp_path_factory):
    return run_train(tmp_path_factory.mktemp('base'))


def test_end_to_end_metrics(base_run):
    m, _ = base_run
    acc, T = m['acc'], 5
    assert [len(r) for r in acc] == list(range(1, T + 1))   # lower-triangular T x T
    assert m['faa'] == pytest.approx(sum(acc[-1]) / T)
    assert m['caa'] == pytest.approx(sum(sum(r) / len(r) for r in acc) / T)
    ffm = sum(max(acc[t][i] for t in range(i, T - 1)) - acc[-1][i] for i in range(T - 1)) / (T - 1)
    assert m['forgetting'] == pytest.approx(ffm)
    assert m['faa'] > 5 * 100 / 50                          # chance over 50 classes is 2%
    assert m['prompt_params'] == 2 * 2 * 4 * 8 * 24         # layers x heads x experts x head_dim, keys + values


def test_determinism_and_resume(base_run, tmp_path):
    m, _ = base_run
    again, _ = run_train(tmp_path, name='again')
    assert again['acc'] == m['acc']
    # a run stopped after task 2 and resumed ends with exactly the same metrics
    part, out = run_train(tmp_path, '--stop-after', '2', name='resumed')
    assert len(part['acc']) == 2
    assert train.main(FAST + ['--out', out, '--resume']) == 0
    with open(os.path.join(out, 'seed0', 'metrics.json')) as f:
        assert json.load(f)['acc'] == m['acc']


def test_eval_does_not_depend_on_batch_size():
    import data
    from smope import SMoPE
    from vit import ViT
    torch.manual_seed(0)
    vit = ViT(**train.TINY)
    prompt = SMoPE(2, vit.heads, vit.head_dim, experts=8, top_k=2)
    prompt.usage.random_(0, 2)
    model = train.Learner(vit, prompt, 50).eval()
    _, test = data.synthetic()
    idx = torch.arange(64)
    feed = dict(device=torch.device('cpu'), image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, workers=0)
    x = next(data.batches(test, idx, 64, False, None, **feed))[0]
    with torch.no_grad():
        full = model.head(model.features(x))
        single = torch.cat([model.head(model.features(x[b:b + 1])) for b in range(64)])
    assert (full - single).abs().max() <= 1e-5 and torch.equal(full.argmax(1), single.argmax(1))
    y = torch.arange(len(test)) % 10  # any labels: both batch sizes must count the same hits
    autocast = lambda: torch.autocast('cpu', enabled=False)
    accs = [train.evaluate(model, test, y, 1, 10, type('A', (), dict(eval_batch_size=bs)), dict(feed, rank=0, world=1, resize='cifar'),
                           autocast) for bs in (1, 64)]
    assert accs[0] == accs[1]


def record(monkeypatch):
    """Records (dense, training, eps) at every prompted-layer call and counts classifier alignments."""
    import smope
    seen, forward = {'calls': set(), 'ca': 0}, smope.SMoPE.forward

    def spy(self, i, q, k, v):
        seen['calls'].add((self.dense, self.training, self.eps))
        return forward(self, i, q, k, v)
    align = train.align_classifier

    def ca(*a):
        seen['ca'] += 1
        return align(*a)
    monkeypatch.setattr(smope.SMoPE, 'forward', spy)
    monkeypatch.setattr(train, 'align_classifier', ca)
    return seen


@pytest.mark.parametrize('flag', [None, '--dense', '--no-warmup', '--no-noise', '--no-router', '--no-proto', '--no-ca'])
def test_ablation_switches(flag, tmp_path, monkeypatch):
    seen = record(monkeypatch)
    extra = ['--stop-after', '2'] + ([flag] if flag else [])
    m, out = run_train(tmp_path, *extra)
    cfg = m['config']
    train_calls = {(d, e) for d, tr, e in seen['calls'] if tr}
    if flag == '--dense':        # one shared prompt: every training forward uses all experts
        assert train_calls == {(True, 0.4)} and max(map(max, (m['usage'][0]))) == 0
    elif flag == '--no-warmup':  # no dense phase at all
        assert train_calls == {(False, 0.4)}
    elif flag == '--no-noise':
        assert cfg['eps'] == 0 and train_calls == {(True, 0.0), (False, 0.0)}
    else:                        # dense warm-up on task 1, then sparse
        assert train_calls == {(True, 0.4), (False, 0.4)}
    assert cfg['router_weight'] == (0 if flag == '--no-router' else 1e-5)
    assert cfg['proto_weight'] == (0 if flag == '--no-proto' else 1e-5)
    assert seen['ca'] == (0 if flag == '--no-ca' else 1)  # task 2 only


def test_masking_and_alignment_touch_only_what_they_should(tmp_path):
    def state(out):
        return torch.load(os.path.join(out, 'seed0', 'checkpoint.pt'), weights_only=False)
    _, one = run_train(tmp_path, '--stop-after', '1', '--no-ca', name='one')
    first = state(one)
    _, ca = run_train(tmp_path, '--stop-after', '2', name='ca')
    _, no_ca = run_train(tmp_path, '--stop-after', '2', '--no-ca', name='no_ca')
    with_ca, without = state(ca), state(no_ca)
    # task 2 training masks task 1's logits, so without alignment task 1's head rows are exactly as after task 1
    assert torch.equal(without['head']['weight'][:10], first['head']['weight'][:10])
    assert not torch.equal(without['head']['weight'][10:20], first['head']['weight'][10:20])
    # alignment retrains the head only
    for k in without['prompt']:
        assert torch.equal(with_ca['prompt'][k], without['prompt'][k]), k
    assert not torch.equal(with_ca['head']['weight'][:20], without['head']['weight'][:20])


def test_bf16_runs(tmp_path):
    m, _ = run_train(tmp_path, '--stop-after', '1', '--precision', 'bf16')
    assert m['acc'][0][0] > 10


def test_bad_inputs(tmp_path, capsys):
    for argv, msg in [(['--top-k', '30', '--experts', '25'], '--top-k must be between 1 and --experts'),
                      (['--bogus'], 'unrecognized arguments'), (['--gate', 'relu'], 'invalid choice'),
                      (['--arch', 'tiny', '--weights', 'IMAGENET1K_V1'], '--weights needs')]:
        with pytest.raises(SystemExit):
            train.main(FAST + argv)
        assert msg in capsys.readouterr().err
    out = str(tmp_path / 'x')
    checks = [(['--dataset', 'cifar100', '--data-dir', str(tmp_path / 'none'), '--weights', 'none'], '--download'),
              (['--arch', 'vit_b_16', '--weights', str(tmp_path / 'missing.pth')], 'not found'),
              (FAST + ['--lr', '1e30', '--out', out], 'loss is')]
    for argv, msg in checks:
        assert train.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith('error:') and msg in err and '\n' not in err, err
    assert train.main(FAST + ['--out', out, '--stop-after', '1']) == 0
    capsys.readouterr()
    assert train.main(FAST + ['--out', out]) == 2                       # would overwrite: refused
    assert '--resume' in capsys.readouterr().err
    assert train.main(FAST + ['--out', out, '--resume', '--eps', '0.3']) == 2
    assert "eps: checkpoint 0.4, now 0.3" in capsys.readouterr().err
    assert len(json.load(open(os.path.join(out, 'seed0', 'metrics.json')))['acc']) == 1  # kept as it was


def test_torchrun_two_processes_match_one(tmp_path):
    """2 CPU processes (gloo) vs 1, same global batch, augmentation off. Each rank runs half of every global batch,
    so matmuls see other shapes and DDP sums gradients in another order: parameters then differ by float32
    rounding (~1e-7 relative per step) and nothing else. Accuracy and usage counts are discrete and agree
    exactly; class statistics agree to 1e-5 (their values are O(1), so this is still ~100x the rounding seen)."""
    args = FAST + ['--no-augment', '--stop-after', '3']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    for n, out in [(1, tmp_path / 'one'), (2, tmp_path / 'two')]:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}', 'train.py']
        r = subprocess.run(cmd + args + ['--out', str(out)], env=env, capture_output=True, text=True, timeout=110,
                           cwd=os.path.dirname(os.path.abspath(train.__file__)))
        assert r.returncode == 0, r.stderr[-2000:]
    one, two = (torch.load(tmp_path / d / 'seed0' / 'checkpoint.pt', weights_only=False) for d in ('one', 'two'))
    assert one['metrics']['world_size'] == 1 and two['metrics']['world_size'] == 2
    assert one['metrics']['acc'] == two['metrics']['acc']
    assert torch.equal(one['prompt']['usage'], two['prompt']['usage']) and one['prompt']['usage'].sum() > 0
    assert torch.equal(one['prompt']['frequent'], two['prompt']['frequent'])
    for k in ('mean', 'var'):
        assert torch.allclose(one['stats'][k], two['stats'][k], rtol=0, atol=1e-5)
    for k in ('keys', 'values'):
        assert torch.allclose(one['prompt'][k], two['prompt'][k], rtol=0, atol=1e-5)
