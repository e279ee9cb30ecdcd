"""scripts/gpu_check.sh, the GPU evidence in one time-boxed call, at toy sizes on the CPU: every section runs and
writes its rows as JSON, a bare machine (python3 only, the project not installed) finds its interpreter, and a
call cut short by its budget still leaves what it measured."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'scripts' / 'gpu_check.sh'


def gpu_check(tmp_path: Path, *flags: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / 'out'
    result = subprocess.run(['bash', str(SCRIPT), '--device', 'cpu', '--tiny', '--out', str(out),
                             '--work', str(tmp_path / 'work'), *flags], capture_output=True, text=True,
                            env=env or {'PYTHON': sys.executable, 'PATH': '/usr/bin:/bin', 'HOME': str(tmp_path)},
                            cwd=tmp_path, timeout=600)
    rows = json.loads((out / 'gpu_check.json').read_text()) if (out / 'gpu_check.json').is_file() else []
    return result, rows


def test_every_section_runs_at_toy_sizes_and_its_rows_are_json(tmp_path):
    result, rows = gpu_check(tmp_path, '--speed_methods', 'kd', '--methods', 'kd', 'crd', '--budget_s', '2000')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    by = {(r['section'], r.get('check')): r for r in rows}
    assert [r['section'] for r in rows][0] == 'env' and by[('env', 'machine')]['torch']
    assert {('speed', 'kd reference'), ('speed', 'kd fast-default')} <= set(by)
    speed = by[('speed', 'kd fast-default')]
    assert speed['steps'] == 5 and speed['epoch_s'] > 0 and speed['warmup_s'] > 0 and speed['compile'] == 'default'
    assert by[('speed-240', 'kd fast-default')]['status'] == 'n/a'        # goals are H100 goals; this is a CPU
    assert by[('concurrency', '2 runs')]['aggregate_images_per_s'] > 0
    for method in ('kd', 'crd'):
        assert by[('methods', method)]['graph_breaks'] == 0 and by[('methods', method)]['frames'] == 1
    resume = by[('resume', 'kill mid-epoch 2 + resume')]
    assert resume['status'] == 'PASS' and resume['epochs_logged'] == [1, 2, 3] and resume['killed_at_iteration'] >= 2
    assert by[('offline', 'K=16 + sub-classes')]['status'] == 'ok'
    assert by[('numerics', 'kd')]['status'] == 'ok' and by[('numerics', 'letkd2')]['status'] == 'ok'
    assert '| resume | kill mid-epoch 2 + resume | PASS |' in result.stdout          # the final table
    assert (tmp_path / 'out' / 'gpu_check.md').is_file()


def test_a_bare_machine_with_python3_only_finds_it(tmp_path):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    wrapper = bin_dir / 'python3'                              # no `python`, no $PYTHON: only python3 on PATH
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    env = {'PATH': f'{bin_dir}:/usr/bin:/bin', 'HOME': str(tmp_path)}
    result, rows = gpu_check(tmp_path, '--sections', 'env', env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert rows and rows[0]['section'] == 'env'
    empty = tmp_path / 'empty'
    empty.mkdir()
    result = subprocess.run(['bash', str(SCRIPT), '--device', 'cpu'], capture_output=True, text=True,
                            env={'PATH': f'{empty}:/bin' if os.path.exists('/bin/bash') else str(empty)})
    assert result.returncode == 2 and 'no python3 or python that imports torch' in result.stderr


def test_a_call_cut_short_by_its_budget_keeps_what_it_measured(tmp_path):
    result, rows = gpu_check(tmp_path, '--sections', 'env', 'speed', 'methods', '--budget_s', '3')
    assert rows[0]['section'] == 'env' and rows[0]['status'] == 'ok'
    assert {r['status'] for r in rows[1:]} <= {'skip', 'timeout'} and len(rows) >= 3
