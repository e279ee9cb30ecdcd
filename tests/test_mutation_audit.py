"""scripts/dev/mutation_audit.py's promises, on a throw-away repository (not on this project's mutants, which run
only when a developer runs the audit): a caught mutant is 'killed', an uncaught one 'survived', a snippet that
is gone or ambiguous 'stale', a hanging run 'timeout', a bad test id 'error'; the working tree is never
written to; the copies are removed; --rev audits a commit's tree instead of the working tree."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

AUDIT = Path(__file__).resolve().parents[1] / 'scripts' / 'dev' / 'mutation_audit.py'

CALC = '''import time


def add(a, b):
    return a + b


def double(x):
    return x * 2


def slow():
    return 1
'''

TEST_CALC = '''from pkg.calc import add, double, slow


def test_add():
    assert add(2, 3) == 5


def test_double():
    assert double(2) == 4


def test_slow():
    assert slow() == 1
'''


@pytest.fixture(scope='module')
def audit():
    spec = importlib.util.spec_from_file_location('mutation_audit_under_test', AUDIT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module               # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def git(root: Path, *args: str) -> None:
    subprocess.run(['git', '-c', 'user.name=t', '-c', 'user.email=t@t', *args], cwd=root, check=True,
                   capture_output=True)


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / 'repo'
    (root / 'pkg').mkdir(parents=True)
    (root / 'tests').mkdir()
    (root / 'pkg' / '__init__.py').write_text('')
    (root / 'pkg' / 'calc.py').write_text(CALC)
    (root / 'tests' / 'test_calc.py').write_text(TEST_CALC)
    (root / '.gitignore').write_text('ignored/\n')
    git(root, 'init', '-q')
    git(root, 'add', '.')
    git(root, 'commit', '-q', '-m', 'calc')
    (root / 'ignored').mkdir()
    (root / 'ignored' / 'big.bin').write_text('not copied')
    return root


def mutants(audit):
    M = audit.Mutant
    test = 'tests/test_calc.py'
    return [
        M('add_minus', 'pkg/calc.py', 'return a + b', 'return a - b', (f'{test}::test_add',), 'sign'),
        M('double_plus', 'pkg/calc.py', 'return x * 2', 'return x + 2', (f'{test}::test_double',), 'equal at 2'),
        M('gone', 'pkg/calc.py', 'return a * b', 'return a / b', (test,), 'the code moved'),
        M('twice', 'pkg/calc.py', 'return ', 'return -', (test,), 'ambiguous'),
        M('hangs', 'pkg/calc.py', '    return 1\n', '    time.sleep(60)\n    return 1\n', (f'{test}::test_slow',),
          'a hang', timeout_s=3),
        M('bad_id', 'pkg/calc.py', 'return a + b', 'return b + a', (f'{test}::test_nothing_here',), 'typo'),
    ]


def test_statuses_and_an_untouched_working_tree(audit, repo, tmp_path, monkeypatch):
    monkeypatch.setattr('tempfile.tempdir', str(tmp_path / 'tmp'))
    (tmp_path / 'tmp').mkdir()
    before = {p: p.read_bytes() for p in repo.rglob('*') if p.is_file() and '.git' not in p.parts}
    listed = mutants(audit)
    results = audit.run_all(listed, jobs=2, timeout_s=60, rev=None, baseline=False, root=repo,
                            packages=('pkg',), log=lambda *a, **k: None)
    status = {r.name: r.status for r in results}
    assert status == {'add_minus': 'killed', 'double_plus': 'survived', 'gone': 'stale', 'twice': 'stale',
                      'hangs': 'timeout', 'bad_id': 'error'}
    killed = next(r for r in results if r.name == 'add_minus')
    assert killed.killed_by == ['tests/test_calc.py::test_add']
    assert 'not found' in next(r for r in results if r.name == 'gone').detail
    assert 'occurs' in next(r for r in results if r.name == 'twice').detail
    after = {p: p.read_bytes() for p in repo.rglob('*') if p.is_file() and '.git' not in p.parts}
    assert after == before
    assert list((tmp_path / 'tmp').iterdir()) == []                      # the copies are gone
    text = audit.summary(results, listed, 1.0)
    assert 'score: 2/3 caught (66.7%)' in text and 'survived: double_plus' in text and 'stale: gone' in text


def test_the_copy_holds_the_working_tree_or_a_commit(audit, repo, tmp_path):
    (repo / 'pkg' / 'calc.py').write_text(CALC.replace('return a + b', 'return b + a'))    # uncommitted
    (repo / 'pkg' / 'new.py').write_text('x = 1\n')                                        # untracked
    audit.make_copy(repo, tmp_path / 'work')
    assert 'return b + a' in (tmp_path / 'work' / 'pkg' / 'calc.py').read_text()
    assert (tmp_path / 'work' / 'pkg' / 'new.py').is_file() and not (tmp_path / 'work' / 'ignored').exists()
    audit.make_copy(repo, tmp_path / 'head', rev='HEAD')
    assert 'return a + b' in (tmp_path / 'head' / 'pkg' / 'calc.py').read_text()
    assert not (tmp_path / 'head' / 'pkg' / 'new.py').exists()


def test_baseline_names_the_selections_that_fail_without_a_mutant(audit, repo):
    """One pytest run over the union of the selections; a selection is reported when one of its tests fails
    (a file argument covers its tests, a node id its parametrisations)."""
    (repo / 'tests' / 'test_broken.py').write_text('import pytest\n\n\n@pytest.mark.parametrize("x", [1, 2])\n'
                                                   'def test_broken(x):\n    assert x == 1\n')
    M = audit.Mutant
    listed = [M('a', 'pkg/calc.py', 'return a + b', 'return a - b', ('tests/test_calc.py::test_add',), 'ok'),
              M('b', 'pkg/calc.py', 'return a + b', 'return a - b', ('tests/test_calc.py',), 'ok'),
              M('c', 'pkg/calc.py', 'return a + b', 'return a - b',
                ('tests/test_calc.py::test_add', 'tests/test_broken.py::test_broken'), 'fails'),
              M('d', 'pkg/calc.py', 'return a + b', 'return a - b', ('tests/test_broken.py',), 'fails'),
              M('e', 'pkg/calc.py', 'return a + b', 'return a - b', ('tests/test_calc.py',), 'ok', k='double')]
    failing = audit.run_baseline(listed, repo, 60, log=lambda *a, **k: None)
    assert [line.split(':')[0] for line in failing] == ['tests/test_calc.py', 'tests/test_broken.py']
    assert all('tests/test_broken.py::test_broken[2]' in line for line in failing)
    assert not (repo / '.pytest_cache').exists()


def test_the_project_mutant_list_is_well_formed(audit):
    """Unique names, a why and tests for each; every file is one of this project's (whether each snippet still
    applies is the audit's 'stale' report, not a CI failure: other work moves code)."""
    names = [m.name for m in audit.MUTANTS]
    assert len(names) == len(set(names)) >= 40
    assert all(m.why.strip() and m.tests and m.original != m.replacement for m in audit.MUTANTS)


def test_list_and_unknown_names(audit, capsys):
    assert audit.main(['--list', '--only', 'crd_memory_momentum_swapped']) == 0
    out = capsys.readouterr().out
    assert 'crd_memory_momentum_swapped  [crd/memory.py]' in out and out.strip().endswith('1 mutants')
    with pytest.raises(SystemExit, match='no mutant named'):
        audit.main(['--list', '--only', 'no_such_mutant'])
