import json
import math

import bench


def test_bench_smoke(tmp_path, capsys):
    # tiny ViT so this runs in seconds; every variant must be timed, finite and positive
    path = tmp_path / 'bench.json'
    res = bench.main(['--device', 'cpu', '--tiny', '--batch-size', '2', '--repeats', '2', '--json', str(path)])
    out = capsys.readouterr().out
    names = ['a', 'b', 'b_ref', 'c', 'd', 'e', 'f']
    assert set(res['ms']) == set(names)
    assert all(math.isfinite(v) and v > 0 for v in res['ms'].values())
    assert all(math.isfinite(v) and v > 0 for v in res['ratios'].values())
    for k in names:
        assert any(line.split()[:1] == [k] for line in out.splitlines()), k
    assert res['fused_vs_ref_max_abs_diff'] < 1e-4
    assert res['params']['prompt'] == 2 * 4 * 25 * 2 * 24  # layers * heads * experts * (key, value) * head_dim
    assert json.loads(path.read_text())['ms'] == res['ms']
