"""The options contract (docs/extending.md, "The options contract"): flags declared by each method in its own file,
resolved once before any data is read, read-only afterwards; and the import graph has no loop."""
from __future__ import annotations

import ast
import json
import re
import types
from pathlib import Path

import pytest
import torch

import train_student
from distiller_zoo import DISTILLERS, build_distiller, registry
from helper.errors import UserError
from helper.options import ResolvedOptions
from models import create_model
from tests.options import data_info, student_options

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ('crd', 'dataset', 'distiller_zoo', 'helper', 'models', 'scripts')


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def project_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere in the file (also inside functions)."""
    name = module_name(path)
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(anchor + ([base] if base else []))
            targets = [base] + [f'{base}.{alias.name}' for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition('.')[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob('*.py')]
    files += [ROOT / 'train_student.py', ROOT / 'train_teacher.py']
    modules = {module_name(p) for p in files}
    return {module_name(p): project_imports(p, modules) for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_import_graph_has_no_loop():
    graph = import_graph()
    assert 'helper.letkd_offline' in graph['distiller_zoo.letkd']          # the method uses the offline module
    assert 'distiller_zoo.letkd' not in graph['helper.letkd_offline']      # ... never the reverse
    assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))


def test_the_cycle_finder_sees_a_loop():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_method_flags_are_declared_in_the_method_files_not_in_the_cli():
    groups = registry.method_option_groups()
    assert groups and len(groups) == len(set(groups))
    homes = {group.__module__ for group in groups}
    assert 'train_student' not in homes
    assert {'distiller_zoo.DKD', 'distiller_zoo.letkd', 'helper.letkd_offline', 'crd.criterion'} <= homes
    parser = train_student.get_args_parser()
    titles = {g.title: {a.dest for a in g._group_actions} for g in parser._action_groups}
    assert titles['DKD'] == {'dkd_alpha', 'dkd_beta', 'dkd_T', 'dkd_warmup'}
    assert titles['letKD / QUEST quantizers'] == {'k_penult', 'k_inter', 'lda_dim', 'quantizer_seed', 'max_positions'}


def test_the_offline_cli_reuses_the_quantizer_declarations():
    from helper import letkd_offline
    offline = letkd_offline.get_args_parser()
    student = train_student.get_args_parser()
    for flag in ('k_penult', 'k_inter', 'lda_dim', 'quantizer_seed', 'max_positions'):
        assert offline.get_default(flag) == student.get_default(flag)
    assert offline.parse_args(['--path_t', 'x', '--model_s', 'resnet8', '--seed', '3']).quantizer_seed == 3


def test_resolved_options_are_read_only_and_complete():
    opt = student_options('letkd2', model_s='MobileNetV2', model_t='ResNet50', dataset='tinyimagenet')
    assert isinstance(opt, ResolvedOptions)
    assert (opt.gamma, opt.alpha, opt.beta) == (1.0, 0.0, 1.0)
    assert (opt.alpha_penult, opt.alpha_inter) == (0.5, 1.0)       # the paper's per-pair values
    assert opt.learning_rate == 0.01 and opt.lr_decay_epochs == [150, 180, 210] and opt.seed == 1
    with pytest.raises(AttributeError, match='read-only'):
        opt.alpha_penult = 2.0
    explicit = student_options('letkd1', alpha_penult=0.3)
    assert explicit.alpha_penult == 0.3 and explicit.alpha_inter is None


@pytest.mark.parametrize('name', sorted(DISTILLERS))
def test_every_method_builds_from_read_only_options(name):
    """No constructor writes into the options: they are frozen, so a write would raise."""
    torch.manual_seed(0)
    opt = student_options(name, model_s='resnet8', model_t='resnet14', k_penult=8, k_inter=2, nce_k=4,
                          feat_dim=8)
    teacher = create_model('resnet14', 10) if DISTILLERS[name].needs_teacher else None
    distiller = build_distiller(name, create_model('resnet8', 10), teacher, opt, data_info(num_classes=10))
    assert distiller.opt is opt and distiller.num_classes == 10


@pytest.mark.parametrize('distill, flags, message', [
    ('dkd', {'beta': 8.0}, 'dkd does not use -b'),
    ('dkd', {'dkd_warmup': -1}, '--dkd_warmup'),
    ('letkd2', {'k_inter': 0}, '--k_inter'),
    ('quest', {'quest_tau': 0.0}, '--quest_tau'),
    ('tdd', {'tdd_threshold': 1.5}, '--tdd_threshold'),
    ('tdd', {'tdd_knn': 0}, '--tdd_knn'),
    ('fitnet_kdlayer', {'kd_layer_weight': -1.0}, '--kd_layer_weight'),
    ('crd', {'nce_m': 1.0}, '--nce_m'),
    ('simkd', {'simkd_factor': 0}, '--simkd_factor'),
    ('factor', {'init_epochs': -1}, '--init_epochs'),
])
def test_flag_checks_run_in_the_resolver(distill, flags, message):
    with pytest.raises(UserError, match=re.escape(message)):
        student_options(distill, **flags)


def test_bad_flags_are_refused_before_any_data_is_read(tmp_path, capsys, monkeypatch):
    import helper.run
    import train_student as cli

    def no_data(*args, **kwargs):
        raise AssertionError('data was read')

    monkeypatch.setattr(helper.run, 'get_dataloaders', no_data)   # what the CLIs' load_data reads with
    teacher = tmp_path / 'resnet8_vanilla' / 'ckpt_epoch_240.pth'
    teacher.parent.mkdir()
    teacher.write_bytes(b'')
    for flags in (['--distill', 'letkd2', '--k_inter', '0'], ['--distill', 'dkd', '-b', '1'],
                  ['--distill', 'tdd', '--tdd_threshold', '2']):
        assert cli.cli([*flags, '--path_t', str(teacher), '--save_dir', str(tmp_path / 'save')]) == 2
        assert capsys.readouterr().err.startswith('error: ')
    assert not (tmp_path / 'save').exists()


def test_the_docs_worked_example_adds_a_method(monkeypatch):
    """docs/extending.md's worked example, run as written."""
    text = (ROOT / 'docs' / 'extending.md').read_text()
    code = re.search(r"```python\n# distiller_zoo/logit_mse.py\n(.*?)```", text, re.S).group(1)
    module = types.ModuleType('logit_mse')
    exec(compile(code, 'logit_mse.py', 'exec'), module.__dict__)
    monkeypatch.setitem(registry.DISTILLERS, 'logit_mse', module.LogitMSE)
    parser = train_student.get_args_parser()
    assert parser.get_default('mse_scale') == 1.0
    opt = train_student.resolve_options(parser.parse_args(['--distill', 'logit_mse', '--mse_scale', '2',
                                                           '--model_t', 'resnet8']))
    assert json.loads(json.dumps(vars(opt)))['beta'] == 1.0 and opt.mse_scale == 2.0
    with pytest.raises(UserError, match='--mse_scale must be positive'):
        train_student.resolve_options(parser.parse_args(['--distill', 'logit_mse', '--mse_scale', '0']))
    torch.manual_seed(0)
    distiller = build_distiller('logit_mse', create_model('resnet8', 10), create_model('resnet8', 10), opt,
                                data_info(num_classes=10))
    image, target = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    logits, losses = distiller.forward_train(image, target)
    with torch.no_grad():
        expected = ((logits / 2 - distiller.teacher(image) / 2) ** 2).mean()
    assert set(losses) == {'ce', 'logit_mse'}
    assert losses['logit_mse'].item() == pytest.approx(expected.item(), rel=1e-5)
