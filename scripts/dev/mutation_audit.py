"""Mutation audit: do the tests catch plausible one-line bugs? (a developer tool, not part of CI)

    python scripts/dev/mutation_audit.py                       # every mutant of scripts/dev/mutants.py
    python scripts/dev/mutation_audit.py --list                # what would run
    python scripts/dev/mutation_audit.py --only 'crd_*' kd_temperature_not_squared --jobs 2 --json audit.json

Each mutant (scripts/dev/mutants.py) replaces one exact snippet of one file and names the tests that should
notice. For every mutant the audit writes the mutated file into a private copy of the repository (the
tracked and untracked-but-not-ignored files of the working tree, or ``--rev REV``'s tree), runs
``pytest -x`` on the mutant's tests there, with PYTHONPATH pointing at the copy, and puts the file back. The
working tree is never written to. Statuses:

- killed:   a test failed (the bug is caught);
- survived: every test passed (the bug is not caught: strengthen a test, or document why it is equivalent);
- timeout:  the tests ran past the mutant's time limit (counted as caught, but listed: a slow or hanging run);
- stale:    the original snippet is no longer in the file (the code moved: update the mutant), or occurs more
            than once (make it unique); the mutant is not run;
- error:    pytest could not run the selection (a collection error, an unknown test id, nothing selected).

The score is (killed + timeout) / (mutants that ran). ``--baseline`` first runs every test the mutants name, once,
on the unmutated copy: a selection that already fails would make its mutants look caught.
Exit status: 0 when nothing survived and nothing is stale or in error, else 1.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_TIMEOUT_S = 300.0

if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from mutants import MUTANTS, Mutant  # noqa: E402  (scripts/dev is not a package: run as a script)


@dataclass
class Result:
    name: str
    file: str
    status: str                    # killed, survived, timeout, stale, error
    seconds: float = 0.0
    killed_by: list[str] = field(default_factory=list)
    detail: str = ''


# ---------------------------------------------------------------------------------------------- the copy

def repository_files(root: Path) -> list[str]:
    """Tracked files that exist, plus untracked files git does not ignore (paths relative to ``root``)."""
    out = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=root,
                         capture_output=True, check=True)
    names = sorted({n for n in out.stdout.decode().split('\0') if n})
    return [n for n in names if (root / n).is_file() or (root / n).is_symlink()]


def make_copy(root: Path, dest: Path, rev: str | None = None) -> None:
    """The repository's files under ``dest``: the working tree's (tracked + untracked, not ignored), or the tree
    of commit ``rev`` (git archive)."""
    dest.mkdir(parents=True, exist_ok=True)
    if rev is not None:
        archive = subprocess.run(['git', 'archive', '--format=tar', rev], cwd=root, capture_output=True, check=True)
        subprocess.run(['tar', '-x', '-C', str(dest)], input=archive.stdout, check=True)
        return
    for name in repository_files(root):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target, follow_symlinks=False)


def pytest_env(copy: Path) -> dict[str, str]:
    """The environment of a pytest run in ``copy``: the copy first on the import path (also in the tests'
    subprocesses), no bytecode written (a mutated and a restored file may share size and mtime)."""
    env = dict(os.environ)
    env['PYTHONPATH'] = str(copy)
    env['PYTHONDONTWRITEBYTECODE'] = '1'
    return env


PACKAGES = ('models', 'helper', 'dataset', 'distiller_zoo', 'crd', 'scripts')


def check_imports_from(copy: Path, packages: Sequence[str] = PACKAGES) -> None:
    """Refuse to run when the project's packages would be imported from somewhere else than ``copy`` (an
    editable install that wins over PYTHONPATH would make every mutant survive)."""
    code = f'import importlib\nfor name in {list(packages)!r}:\n    print(importlib.import_module(name).__file__)'
    out = subprocess.run([sys.executable, '-c', code], cwd=copy, env=pytest_env(copy), capture_output=True,
                         text=True, timeout=300)
    paths = out.stdout.split()
    if out.returncode != 0 or len(paths) != len(packages) or not all(
            Path(p).resolve().is_relative_to(copy.resolve()) for p in paths):
        raise SystemExit(f'mutation_audit: the copy in {copy} is not what Python imports ({out.stdout.strip()} '
                         f'{out.stderr.strip()[-300:]})')


# ---------------------------------------------------------------------------------------------- one mutant

def find_stale(mutant: Mutant, source: str) -> str | None:
    """Why ``mutant`` cannot be applied to ``source`` (its file's text), or None."""
    count = source.count(mutant.original)
    if count == 0:
        return 'original snippet not found (the code moved or changed: update the mutant)'
    if count > 1:
        return f'original snippet occurs {count} times (make it unique)'
    if mutant.original == mutant.replacement:
        return 'replacement equals the original'
    return None


def pytest_command(mutant: Mutant) -> list[str]:
    cmd = [sys.executable, '-m', 'pytest', '-x', '-q', '-rfE', '-p', 'no:cacheprovider', *mutant.tests]
    if mutant.k:
        cmd += ['-k', mutant.k]
    return cmd


def run_pytest(cmd: list[str], copy: Path, timeout_s: float) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, output, seconds). The run is its own process group, ended as a whole on
    timeout or when the audit itself is interrupted."""
    tic = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=copy, env=pytest_env(copy), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        code = None
    except BaseException:                     # Ctrl-C: leave no pytest running in a copy about to be removed
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return code, output, time.monotonic() - tic


FAILED_LINE = re.compile(r'^(?:FAILED|ERROR) (\S+)', re.M)


def classify(code: int | None, output: str) -> tuple[str, list[str], str]:
    """pytest's exit code -> (status, failing test ids, detail)."""
    if code is None:
        return 'timeout', [], 'ran past its time limit'
    if code == 0:
        return 'survived', [], ''
    if code == 1:
        return 'killed', FAILED_LINE.findall(output), ''
    reason = {2: 'interrupted (collection error?)', 3: 'internal error', 4: 'usage error (unknown test id?)',
              5: 'no test selected'}.get(code, f'exit code {code}')
    return 'error', FAILED_LINE.findall(output), f'{reason}: {output.strip().splitlines()[-1] if output.strip() else ""}'


def run_mutant(mutant: Mutant, copy: Path, default_timeout_s: float) -> Result:
    """Apply ``mutant`` in ``copy``, run its tests, restore the file (always)."""
    path = copy / mutant.file
    if not path.is_file():
        return Result(mutant.name, mutant.file, 'stale', detail=f'{mutant.file} does not exist')
    source = path.read_text()
    stale = find_stale(mutant, source)
    if stale:
        return Result(mutant.name, mutant.file, 'stale', detail=stale)
    try:
        path.write_text(source.replace(mutant.original, mutant.replacement, 1))
        code, output, seconds = run_pytest(pytest_command(mutant), copy, mutant.timeout_s or default_timeout_s)
    finally:
        path.write_text(source)
    output = output[-4000:]
    status, failing, detail = classify(code, output)
    if status == 'error':
        detail = f'{detail}\n{output[-1500:]}'
    return Result(mutant.name, mutant.file, status, round(seconds, 1), failing, detail)


# ---------------------------------------------------------------------------------------------- the audit

def select(mutants: Sequence[Mutant], patterns: Sequence[str] | None) -> list[Mutant]:
    """The mutants whose names match one of ``patterns`` (fnmatch; all when None); an unmatched pattern is an error."""
    if not patterns:
        return list(mutants)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(m.name, pattern) for m in mutants):
            raise SystemExit(f'mutation_audit: no mutant named {pattern!r} (see --list)')
    return [m for m in mutants if any(fnmatch.fnmatchcase(m.name, p) for p in patterns)]


def check_list(mutants: Iterable[Mutant]) -> None:
    seen: set[str] = set()
    for m in mutants:
        if m.name in seen:
            raise SystemExit(f'mutation_audit: two mutants are named {m.name!r}')
        seen.add(m.name)
        if not m.tests or not m.why.strip():
            raise SystemExit(f'mutation_audit: mutant {m.name!r} needs tests and a why')


def run_all(mutants: Sequence[Mutant], *, jobs: int, timeout_s: float, rev: str | None, baseline: bool,
            root: Path = ROOT, packages: Sequence[str] = PACKAGES, log=print) -> list[Result]:
    """Run ``mutants`` on ``jobs`` private copies of the repository (made under a temporary folder, removed at the
    end); results in the order of ``mutants``."""
    jobs = max(1, min(jobs, len(mutants) or 1))
    with tempfile.TemporaryDirectory(prefix='mutation_audit_') as tmp:
        copies: queue.Queue[Path] = queue.Queue()
        for i in range(jobs):
            copy = Path(tmp) / f'copy{i}'
            make_copy(root, copy, rev)
            copies.put(copy)
        check_imports_from(Path(tmp) / 'copy0', packages)
        if baseline:
            failing = run_baseline(mutants, Path(tmp) / 'copy0', timeout_s, log)
            if failing:
                raise SystemExit('mutation_audit: these selections fail without any mutant; fix them first:\n  '
                                 + '\n  '.join(failing))
        results: dict[str, Result] = {}

        def work(mutant: Mutant) -> Result:
            copy = copies.get()
            try:
                result = run_mutant(mutant, copy, timeout_s)
            finally:
                copies.put(copy)
            by = f' by {result.killed_by[0]}' if result.killed_by else ''
            log(f'[{result.status:>8}] {mutant.name} ({result.seconds:.1f}s){by}'
                + (f': {result.detail.splitlines()[0]}' if result.detail and result.status != 'killed' else ''),
                flush=True)
            return result

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for result in pool.map(work, mutants):
                results[result.name] = result
    return [results[m.name] for m in mutants]


def covers(arg: str, test_id: str) -> bool:
    """Whether the pytest argument ``arg`` (a file or a node id) selects ``test_id`` (or, for a collection error
    reported on a file, lies in it)."""
    return (test_id == arg or test_id.startswith((arg + '::', arg + '['))
            or arg.startswith(test_id + '::'))


def run_baseline(mutants: Sequence[Mutant], copy: Path, timeout_s: float, log=print) -> list[str]:
    """Run every test the mutants name once, without a mutant (one pytest run over the union of the selections;
    a selection with ``-k`` runs on its own); the selections that do not pass."""
    selections = {(m.tests, m.k): m for m in mutants}
    plain = [tests for tests, k in selections if k is None]
    files = {arg for tests in plain for arg in tests if '::' not in arg}
    union = sorted({arg for tests in plain for arg in tests if arg in files or arg.split('::')[0] not in files})
    failing = []
    if union:
        cmd = [sys.executable, '-m', 'pytest', '-q', '-rfE', '-p', 'no:cacheprovider', *union]
        code, output, seconds = run_pytest(cmd, copy, timeout_s * len(selections))
        failed = FAILED_LINE.findall(output)
        log(f'[baseline] {len(union)} test arguments of {len(plain)} selections: '
            f'{"ok" if code == 0 else "FAILS" if code is not None else "TIMEOUT"} ({seconds:.1f}s)', flush=True)
        if code != 0:
            for tests in plain:
                bad = [f for f in failed if any(covers(arg, f) for arg in tests)]
                if bad or not failed:
                    tail = output.strip().splitlines()[-1] if output.strip() else code
                    failing.append(f"{' '.join(tests)}: {', '.join(bad) if bad else tail}")
    for (tests, k), mutant in selections.items():
        if k is None:
            continue
        code, output, seconds = run_pytest(pytest_command(mutant), copy, mutant.timeout_s or timeout_s)
        label = f"{' '.join(tests)} -k {k!r}"
        log(f'[baseline] {"ok" if code == 0 else "FAILS"} ({seconds:.1f}s) {label}', flush=True)
        if code != 0:
            failing.append(f'{label}: {output.strip().splitlines()[-1] if output.strip() else code}')
    return failing


def summary(results: Sequence[Result], mutants: Sequence[Mutant], seconds: float) -> str:
    by_status: dict[str, list[Result]] = {}
    for r in results:
        by_status.setdefault(r.status, []).append(r)
    ran = [r for r in results if r.status in ('killed', 'survived', 'timeout')]
    caught = [r for r in ran if r.status in ('killed', 'timeout')]
    why = {m.name: m.why for m in mutants}
    lines = [f'\nscore: {len(caught)}/{len(ran)} caught'
             + (f' ({100.0 * len(caught) / len(ran):.1f}%)' if ran else '')
             + f'; {len(results)} mutants: ' + ', '.join(f'{len(v)} {k}' for k, v in sorted(by_status.items()))
             + f'; {seconds / 60:.1f} min']
    for status in ('survived', 'timeout', 'stale', 'error'):
        for r in by_status.get(status, []):
            lines.append(f'  {status}: {r.name} ({r.file}): {why[r.name]}'
                         + (f'\n      {r.detail.splitlines()[0]}' if r.detail else ''))
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--only', nargs='+', metavar='NAME', help='mutant names or fnmatch patterns')
    parser.add_argument('--list', action='store_true', help='list the mutants (and whether they apply), run nothing')
    parser.add_argument('--jobs', type=int, default=1, help='mutants run at once, each in its own copy (default 1)')
    parser.add_argument('--json', metavar='FILE', help='write the results as JSON')
    parser.add_argument('--timeout', type=float, default=DEFAULT_TIMEOUT_S,
                        help=f'seconds per mutant unless the mutant sets its own (default {DEFAULT_TIMEOUT_S:g})')
    parser.add_argument('--rev', default=None, help='audit this commit\'s tree instead of the working tree')
    parser.add_argument('--baseline', action='store_true',
                        help='first check that every selection passes without a mutant')
    args = parser.parse_args(argv)

    check_list(MUTANTS)
    mutants = select(MUTANTS, args.only)
    if args.list:
        for m in mutants:
            path = ROOT / m.file
            stale = find_stale(m, path.read_text()) if path.is_file() else f'{m.file} does not exist'
            print(f'{m.name}  [{m.file}]{"  STALE: " + stale if stale else ""}\n    why: {m.why}\n'
                  f'    tests: {" ".join(m.tests)}{" -k " + repr(m.k) if m.k else ""}')
        print(f'{len(mutants)} mutants')
        return 0
    tic = time.monotonic()
    print(f'{len(mutants)} mutants, {args.jobs} at a time, copies of {args.rev or "the working tree"}', flush=True)
    results = run_all(mutants, jobs=args.jobs, timeout_s=args.timeout, rev=args.rev, baseline=args.baseline)
    seconds = time.monotonic() - tic
    print(summary(results, mutants, seconds))
    if args.json:
        Path(args.json).write_text(json.dumps({'seconds': round(seconds, 1), 'jobs': args.jobs, 'rev': args.rev,
                                               'results': [asdict(r) for r in results]}, indent=2) + '\n')
    return 0 if all(r.status in ('killed', 'timeout') for r in results) else 1


if __name__ == '__main__':
    sys.exit(main())
