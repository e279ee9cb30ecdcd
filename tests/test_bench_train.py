"""scripts/bench_train.py at tiny settings: its table, host-sync counts and loader-only mode."""
from __future__ import annotations

import json

from scripts import bench_train
from tests.fixtures_data import write_cifar100

TINY = ['--model_s', 'resnet8', '--model_t', 'resnet8', '--dataset', 'cifar100', '--device', 'cpu',
        '--batch_size', '16', '--num_workers', '0', '--steps', '2', '--repeats', '1', '--warmup', '1', '--threads', '1']


def test_bench_prints_reference_and_fast_rows_with_their_syncs(tmp_path, capsys):
    write_cifar100(tmp_path, n_train_per_class=4, n_test_per_class=1, num_classes=10)
    out = tmp_path / 'rows.json'
    code = bench_train.main([*TINY, '--data_folder', str(tmp_path), '--methods', 'kd',
                             '--configs', 'reference', 'device_data', '--json', str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert '| kd | reference |' in table and '| kd | device_data |' in table and '1.00x' in table
    rows = {r['config']: r for r in json.loads(out.read_text())}
    assert rows['reference']['syncs_per_step'] >= 5           # .item() per loss term, accuracy, isfinite
    assert rows['device_data']['syncs_per_step'] == 0
    assert all(r['ms_per_step'] > 0 and r['peak_mib'] > 100 for r in rows.values())


def test_loader_only_mode_measures_both_data_paths(tmp_path):
    write_cifar100(tmp_path, n_train_per_class=4, n_test_per_class=1, num_classes=10)
    args = bench_train.parse_args([*TINY, '--data_folder', str(tmp_path), '--loader_only'])
    rows = [bench_train.loader_one(args, config) for config in ('reference', 'device_data')]
    assert [r['config'] for r in rows] == ['reference', 'device_data']
    assert all(r['images_per_s'] > 0 for r in rows)
    assert 'loader' in bench_train.format_table(rows)
