"""Every method flag and protocol flag defaults to the published value docs/training.md ("train_student.py") lists.

A wrong default survives every other test: they pass their settings explicitly (found by the mutation audit,
scripts/dev/mutation_audit.py: `--hint_layer` and `--quest_tau`). The values are written out here from docs/training.md,
which cites RepDistiller, mdistiller, SimKD, TDD, QuEST and letKD for them.
"""
from __future__ import annotations

import pytest

import train_student
from tests.options import student_options

PUBLISHED = {
    # RepDistiller's protocol and method flags
    'batch_size': 64, 'epochs': 240, 'lr_decay_epochs': '150,180,210', 'lr_decay_rate': 0.1, 'weight_decay': 5e-4,
    'momentum': 0.9, 'nesterov': False, 'pad_mode': 'zero',
    'kd_T': 4, 'init_epochs': 30, 'hint_layer': 2, 'feat_dim': 128, 'mode': 'exact', 'nce_k': 16384, 'nce_t': 0.07,
    'nce_m': 0.5,
    # mdistiller's DKD, SimKD's factor, TDD's threshold and neighbours, ReviewKD's warm-up
    'dkd_alpha': 1.0, 'dkd_beta': 8.0, 'dkd_T': 4.0, 'dkd_warmup': 20, 'simkd_factor': 2,
    'tdd_threshold': 0.2, 'tdd_knn': 20, 'reviewkd_warmup': 20,
    # letKD / QUEST
    'k_penult': 4096, 'k_inter': 8, 'lda_dim': 60, 'letkd_tau': 1.0, 'quest_tau': 5.0, 'quantizer_seed': 0,
    'max_positions': 3_200_000,
}


@pytest.mark.parametrize('flag', sorted(PUBLISHED))
def test_parser_defaults_are_the_published_values(flag):
    parsed = train_student.get_args_parser().parse_args(['--distill', 'kd'])
    assert getattr(parsed, flag) == PUBLISHED[flag]


def test_the_methods_read_their_defaults():
    """The resolved options of the methods that use the flags carry them unchanged (no method overrides them)."""
    assert student_options('hint').hint_layer == 2
    assert student_options('quest').quest_tau == 5.0
    assert student_options('letkd2').letkd_tau == 1.0
    assert (student_options('crd').nce_k, student_options('crd').nce_m) == (16384, 0.5)
