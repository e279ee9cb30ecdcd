"""Every published setting the table scripts use, in one place, with where each value comes from.

Methods are keyed by the label the paper's tables use (``published_results.csv``, ``published_elsewhere.csv``);
each maps to a ``--distill`` name, the flags of its published configuration (``flags``: weights, temperatures and
the method's other hyper-parameters) and, apart, its published training recipe where it is not RepDistiller's
(``recipe``: optimiser, augmentation, loader, lr, epochs). Pair-specific values are in their own dicts
(``pair_flags`` for the method, ``pair_recipe`` for the recipe). ``PROTOCOLS`` (at the end) is the one table of
what each ``--protocol`` of the sweeps sets: ``published`` runs every method with its own recipe, ``repdistiller``
and ``letkd`` run every method with one recipe and the same method flags. ``scripts/commands.py`` turns these
into command lines.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Method:
    distill: str
    flags: tuple[str, ...] = ()
    source: str = ''
    # pairs the method cannot run on (FSP/KDSVD need equal channel counts per stage)
    needs_equal_channels: bool = False
    extra: dict = field(default_factory=dict)
    # the method's published recipe where it differs from RepDistiller's (only the 'published' protocol uses it)
    recipe: tuple[str, ...] = ()
    # the optimiser is part of the method (DOT): a protocol's optimiser flags (Nesterov) are not applied to it
    own_optimizer: bool = False

    @property
    def published_flags(self) -> tuple[str, ...]:
        """The method's flags and its published recipe: what the 'published' protocol passes (but per-pair values)."""
        return (*self.flags, *self.recipe)


# The letKD/QUEST authors' loader and optimiser: Nesterov, reflect padding and drop_last (781 iterations per CIFAR-100
# epoch); their published recipe, which the 'published' protocol keeps for QUEST, letKD-1 and letKD-2.
AUTHORS_LETKD_RECIPE = ('--nesterov', '--pad_mode', 'reflect', '--drop_last')

# RepDistiller's scripts/run_cifar_distill.sh weights unless noted.
METHODS: dict[str, Method] = {
    'KD': Method('kd', ('-r', '0.1', '-a', '0.9', '-b', '0'), 'RepDistiller run_cifar_distill.sh'),
    'FitNet': Method('hint', ('-r', '1', '-a', '0', '-b', '100'), 'RepDistiller'),
    'AT': Method('attention', ('-r', '1', '-a', '0', '-b', '1000'), 'RepDistiller'),
    'SP': Method('similarity', ('-r', '1', '-a', '0', '-b', '3000'), 'RepDistiller'),
    'CC': Method('correlation', ('-r', '1', '-a', '0', '-b', '0.02'), 'RepDistiller'),
    'VID': Method('vid', ('-r', '1', '-a', '0', '-b', '1'), 'RepDistiller'),
    'RKD': Method('rkd', ('-r', '1', '-a', '0', '-b', '1'), 'RepDistiller'),
    'PKT': Method('pkt', ('-r', '1', '-a', '0', '-b', '30000'), 'RepDistiller'),
    'AB': Method('abound', ('-r', '1', '-a', '0', '-b', '1'), 'RepDistiller (distils in its 30-epoch init stage)'),
    'FT': Method('factor', ('-r', '1', '-a', '0', '-b', '200'), 'RepDistiller'),
    'FSP': Method('fsp', ('-r', '1', '-a', '0', '-b', '50'), 'RepDistiller (distils in its init stage)',
                  needs_equal_channels=True),
    'NST': Method('nst', ('-r', '1', '-a', '0', '-b', '50'), 'RepDistiller'),
    'KDSVD': Method('kdsvd', ('-r', '1', '-a', '0', '-b', '1'), 'mdistiller (RepDistiller has no script line)',
                    needs_equal_channels=True),
    'CRD': Method('crd', ('-r', '1', '-a', '0', '-b', '0.8'), 'RepDistiller'),
    'CRD+KD': Method('crd', ('-r', '1', '-a', '1', '-b', '0.8'), 'RepDistiller'),
    'DKD': Method('dkd', ('-r', '1', '-a', '0', '--dkd_alpha', '1', '--dkd_T', '4', '--dkd_warmup', '20'),
                  'mdistiller configs/cifar100/dkd: CE 1, alpha 1, T 4, WARMUP 20 (beta per pair below)'),
    'SimKD': Method('simkd', ('-r', '0', '-a', '0', '-b', '1', '--simkd_factor', '2'), 'SimKD scripts (-c 0 -d 0 -b 1, f=2)'),
    'TDD': Method('tdd', ('-r', '0.1', '-a', '0.9', '-b', '0.1'), 'TDD (KamalEngine, the lab\'s reference code)'),
    # No code exists; the published TDD+CRD numbers sit within 0.3 of CRD+KD: CRD+KD's weights plus 0.1 TDD.
    # --crd_weight is not part of the run-folder name, so it is passed explicitly.
    'TDD+CRD': Method('tdd_crd', ('-r', '1', '-a', '1', '-b', '0.1', '--crd_weight', '0.8'),
                      'our reconstruction: RepDistiller CRD+KD (-r 1 -a 1, CRD 0.8) + TDD at 0.1'),
    'QUEST': Method('quest', ('-r', '1', '-a', '0', '-b', '1', '--quest_tau', '5'),
                    'QuEST CIFAR-100 configs (recipe: Nesterov, reflect padding, drop_last)', recipe=AUTHORS_LETKD_RECIPE),
    'letKD-1': Method('letkd1', ('-r', '1', '-a', '0', '-b', '1'),
                      'letKD configs (alphas per pair are the Distiller defaults; recipe: Nesterov, reflect padding, '
                      'drop_last)', recipe=AUTHORS_LETKD_RECIPE),
    'letKD-2': Method('letkd2', ('-r', '1', '-a', '0', '-b', '1'), 'letKD configs (recipe: Nesterov, reflect padding, '
                      'drop_last)', recipe=AUTHORS_LETKD_RECIPE),
    # ---- issue 20: the methods after the letKD paper (docs/methods.md); each value read in the official configs
    'ReviewKD': Method('reviewkd', ('-r', '1', '-a', '0', '--reviewkd_warmup', '20'),
                       'dvlab-research/ReviewKD CIFAR-100/script/reviewKD.sh @6607308 (--kd-loss-weight per pair, below; '
                       'warm-up 20 = train.py --kd-warm-up) and mdistiller configs/cifar100/reviewkd.yaml @e8c5bb3 '
                       '(REVIEWKD_WEIGHT 5.0 for res32x4->res8x4, agrees; cfg.py CE_WEIGHT 1, WARMUP_EPOCHS 20, default '
                       'weight 1.0 for the pairs without a script line). Disagreement: the official script trains with '
                       'batch 128, lr 0.1, Nesterov (ReviewKD issue #8 prints its Namespace); mdistiller, whose recipe '
                       'the published protocol uses, with RepDistiller\'s'),
    'OFD': Method('ofd', ('-r', '1', '-a', '0', '-b', '0.001'),
                  'mdistiller engine/cfg.py @a08d46f OFD.LOSS CE_WEIGHT 1.0, FEAT_WEIGHT 0.001; configs/cifar100/ofd.yaml '
                  '(res32x4->res8x4 only; RepDistiller\'s recipe). The clovaai code trains 200 epochs, batch 128, lr 0.1, '
                  'Nesterov on its own pairs, none of the 13'),
    'DIST': Method('dist', ('-r', '1', '-a', '0', '-b', '2', '--dist_beta', '1', '--dist_gamma', '1', '--dist_T', '4'),
                   'hunto/image_classification_sota configs/strategies/distill/dist_cifar.yaml @6f7a70a: ori_loss_weight 1, '
                   'kd_loss_weight 2, kd dist_t4 (lib/models/losses/kd_loss.py: DIST(beta=1, gamma=1, tau=4)); its recipe '
                   'is RepDistiller\'s (batch 64, lr 0.05 / 0.01 per the DIST_KD README, x0.1 every 30 epochs after a '
                   '120-epoch constant warm-up = 150/180/210, sgd_no_nesterov, wd 5e-4, 240 epochs)'),
    'CTKD': Method('ctkd', ('-r', '0.1', '-a', '0.9', '-b', '0', '--ctkd_t_start', '1', '--ctkd_t_end', '20',
                            '--ctkd_lambda_min', '0', '--ctkd_lambda_max', '1', '--ctkd_lambda_epochs', '10'),
                   'zhengli97/CTKD scripts/run_cifar_distill.sh @7d52522 (-r 0.1 -a 0.9 -b 0 --kd_T 4 --batch_size 64 '
                   '--learning_rate 0.05 --cosine_decay 1 --decay_max 0 --decay_min -1 --decay_loops 10) and '
                   'train_student.py (--t_start 1 --t_end 20; lr 0.01 for MobileNetV2/ShuffleV1/V2; SGD without Nesterov)'),
    'MLKD': Method('mlkd', ('-r', '0.1', '-a', '0', '-b', '0.9', '--mlkd_T', '4'),
                   'Jin-Ying/Multi-Level-Logit-Distillation configs/cifar100/ours/*.yaml @5ee473f (cfg.py KD: CE 0.1, KD 0.9, '
                   'T 4; the strong augmentation is the method). Recipe per pair below: batch 64, lr 0.025 (0.01 for '
                   'MobileNetV2/ShuffleNet students), x0.1 at 150/180/210 whatever the epochs, 240/480/960 epochs; the '
                   'Sep 2024 commit 5ee473f cut the same-family pairs from 480 to 240 epochs'),
    'KD+LS': Method('kd', ('-r', '0.1', '-b', '0', '--logit_stand'),
                    'sunshangquan/logit-standardization-KD @f6e5aa5: logs/KD/kd,<T>,<S>,<base_temp>,<kd_weight>.txt '
                    '(per pair below; tools/train.py defaults 2, 9 where no log); cfg.py KD CE_WEIGHT 0.1; -a is '
                    '--kd_weight'),
    'DKD+LS': Method('dkd', ('-r', '1', '-a', '0', '--dkd_alpha', '1', '--dkd_warmup', '20', '--logit_stand'),
                     'logit-standardization-KD @f6e5aa5: logs/DKD/dkd,<T>,<S>,<base_temp>,<kd_weight>[,<beta>].txt (per '
                     'pair below; beta is before the x kd_weight; without a third value the config\'s BETA, 8 by '
                     'default); cfg.py DKD CE 1, ALPHA 1, WARMUP 20'),
    'MLKD+LS': Method('mlkd', ('-r', '0.1', '-a', '0', '--logit_stand'),
                      'logit-standardization-KD @f6e5aa5: logs/MLKD/mlkd,<T>,<S>,<base_temp>,<kd_weight>.txt (per pair '
                      'below); recipe from its configs/cifar100/mlkd/*.yaml: 480 epochs (960 for ShuffleV1/V2), lr 0.025 '
                      '(0.01 for vgg13->vgg8 and the MobileNetV2/ShuffleNet students), x0.1 at 150/180/210 (its logs '
                      'agree). Disagreement: MLKD\'s own configs now train the same-family pairs 240 epochs; the LS '
                      'README\'s MLKD row was trained as these (480)'),
    'CTKD+LS': Method('ctkd', ('-r', '0.1', '-b', '0', '--logit_stand', '--ctkd_t_start', '2', '--ctkd_t_end', '20',
                               '--ctkd_lambda_min', '0', '--ctkd_lambda_max', '1', '--ctkd_lambda_epochs', '10'),
                      'logit-standardization-KD @f6e5aa5: CTKD/scripts/run_cifar_distill.sh (-r 0.1 -a 9 --kd_T 2) and '
                      'logs/CTKD/ctkd,<T>,<S>,2,9.txt (kd_weight 9 on every pair; their temperature never falls below 2: '
                      't_start 2; t_end is not recorded, we keep 20). Disagreement with docs/methods.md '
                      '"Logit standardization" (corrected there): '
                      'the resnet32x4 -> ShuffleV2 / wrn_16_2 / wrn_40_2 logs hold two 240-epoch runs one after the other '
                      '(epochs 1-240 twice), not 480 epochs: 240 everywhere'),
    'KD+DOT': Method('kd', ('-r', '0.1', '-a', '0.9', '-b', '0', '--trainer', 'dot', '--dot_delta', '0.075'),
                     'mdistiller configs/cifar100/dot/{res32x4_res8x4,res32x4_shuv2,vgg13_vgg8}.yaml @a08d46f: KD (cfg.py '
                     'CE 0.1, KD 0.9, T 4), TRAINER dot, DOT.DELTA 0.075, RepDistiller\'s recipe; the same delta on '
                     'the other pairs', own_optimizer=True),
}

# The methods of the letKD paper's Table 1 (CIFAR-100), in its row order; RepDistiller's other
# criteria follow so the sweep covers every baseline.
TABLE1_METHODS = ['KD', 'FitNet', 'AT', 'AB', 'FSP', 'SP', 'VID', 'CRD', 'CRD+KD', 'DKD', 'SimKD', 'TDD',
                  'TDD+CRD', 'QUEST', 'letKD-1', 'letKD-2']
EXTRA_METHODS = ['CC', 'RKD', 'PKT', 'FT', 'NST', 'KDSVD']
# The methods after the letKD paper (issue 20), with the +LS and +DOT variants: the extended sweep adds them.
NEW_METHODS = ['ReviewKD', 'OFD', 'DIST', 'CTKD', 'MLKD', 'KD+LS', 'DKD+LS', 'MLKD+LS', 'CTKD+LS', 'KD+DOT']
EXTENDED_METHODS = TABLE1_METHODS + EXTRA_METHODS + NEW_METHODS
# Table 3 (Tiny-ImageNet) in its row order; CRD, CRD+KD, DKD and SimKD have no row there and run as extras
# (their cells show ours only). FSP runs on the equal-channel pairs, the two where the paper has a number.
TABLE3_METHODS = ['KD', 'FitNet', 'AT', 'FSP', 'SP', 'VID', 'CRD', 'CRD+KD', 'DKD', 'SimKD', 'TDD', 'TDD+CRD',
                  'QUEST', 'letKD-1', 'letKD-2']

# (teacher, student) columns of the paper's Table 1 (CIFAR-100) and Table 3 (Tiny-ImageNet)
TABLE1_PAIRS = [('wrn_40_2', 'wrn_16_2'), ('wrn_40_2', 'wrn_40_1'), ('resnet56', 'resnet20'),
                ('resnet110', 'resnet20'), ('resnet110', 'resnet32'), ('resnet32x4', 'resnet8x4'),
                ('wrn_40_2', 'ShuffleV1'), ('resnet32x4', 'ShuffleV1'), ('resnet32x4', 'ShuffleV2'),
                ('ResNet50', 'MobileNetV2')]
# RepDistiller's 13 CIFAR-100 pairs: Table 1's 10 and the three the letKD paper leaves out
EXTENDED_PAIRS = TABLE1_PAIRS + [('vgg13', 'vgg8'), ('vgg13', 'MobileNetV2'), ('ResNet50', 'vgg8')]
TABLE3_PAIRS = [('wrn_40_2', 'wrn_16_2'), ('wrn_40_2', 'wrn_40_1'), ('resnet56', 'resnet20'),
                ('wrn_40_2', 'ShuffleV1'), ('ResNet50', 'MobileNetV2')]

# DKD beta per pair: mdistiller's configs/cifar100/dkd/*.yaml. resnet110->resnet20 has no config;
# we use the value of its sibling resnet110->resnet32 (2.0). wrn_40_2->ShuffleV1 is wrn40_2_shuv1 (8).
# ResNet50->vgg8 has no config either: mdistiller's default BETA, 8.0.
DKD_BETA = {
    ('resnet32x4', 'resnet8x4'): 8.0, ('resnet56', 'resnet20'): 2.0, ('resnet110', 'resnet32'): 2.0,
    ('resnet110', 'resnet20'): 2.0, ('wrn_40_2', 'wrn_16_2'): 6.0, ('wrn_40_2', 'wrn_40_1'): 6.0,
    ('vgg13', 'vgg8'): 6.0, ('vgg13', 'MobileNetV2'): 6.0, ('ResNet50', 'MobileNetV2'): 8.0,
    ('resnet32x4', 'ShuffleV1'): 8.0, ('resnet32x4', 'ShuffleV2'): 8.0, ('wrn_40_2', 'ShuffleV1'): 8.0,
    ('ResNet50', 'vgg8'): 8.0,
}
# ReviewKD -b per pair: the official CIFAR-100/script/reviewKD.sh --kd-loss-weight (mdistiller's reviewkd.yaml: 5.0
# for resnet32x4 -> resnet8x4, the same); no published value elsewhere: mdistiller's default REVIEWKD_WEIGHT, 1.0.
# distiller_zoo/reviewkd.py resolves the same defaults (tests/test_scripts.py checks they agree).
REVIEWKD_BETA = {
    ('wrn_40_2', 'wrn_16_2'): 5.0, ('wrn_40_2', 'wrn_40_1'): 5.0, ('wrn_40_2', 'ShuffleV1'): 5.0,
    ('resnet32x4', 'resnet8x4'): 5.0, ('resnet32x4', 'ShuffleV1'): 5.0, ('resnet32x4', 'ShuffleV2'): 8.0,
    ('resnet56', 'resnet20'): 0.6, ('resnet110', 'resnet32'): 1.0,
}
REVIEWKD_DEFAULT_BETA = 1.0
# Logit standardization, read from the LS repository's log names (docs/methods.md, "Logit standardization (--logit_stand)"):
# (base_temp, kd_weight); DKD+LS adds its beta. Pairs without a log get tools/train.py's defaults (2, 9) and, for
# DKD+LS, the pair's mdistiller beta (DKD_BETA).
LS_DEFAULT = (2.0, 9.0)
KD_LS = {
    ('resnet32x4', 'resnet8x4'): (2.0, 9.0), ('vgg13', 'vgg8'): (3.0, 9.0), ('wrn_40_2', 'wrn_40_1'): (2.0, 9.0),
    ('wrn_40_2', 'wrn_16_2'): (2.0, 9.0), ('resnet56', 'resnet20'): (2.0, 9.0), ('resnet110', 'resnet32'): (2.0, 9.0),
    ('resnet110', 'resnet20'): (4.0, 12.0), ('resnet32x4', 'ShuffleV2'): (2.0, 9.0),
    ('vgg13', 'MobileNetV2'): (3.0, 9.0), ('ResNet50', 'MobileNetV2'): (3.0, 1.0),
}
DKD_LS = {  # (base_temp, kd_weight, dkd_beta)
    ('resnet32x4', 'resnet8x4'): (2.0, 9.0, 8.0), ('vgg13', 'vgg8'): (2.0, 15.0, 2.0),
    ('wrn_40_2', 'wrn_40_1'): (2.0, 12.0, 2.0), ('wrn_40_2', 'wrn_16_2'): (2.0, 12.0, 2.0),
    ('resnet56', 'resnet20'): (3.0, 18.0, 2.0), ('resnet110', 'resnet32'): (2.0, 15.0, 2.0),
    ('resnet110', 'resnet20'): (2.0, 15.0, 2.0), ('resnet32x4', 'ShuffleV2'): (2.0, 9.0, 8.0),
    ('vgg13', 'MobileNetV2'): (3.0, 9.0, 2.0), ('ResNet50', 'MobileNetV2'): (2.0, 15.0, 2.0),
}
# resnet56 -> resnet20 has no MLKD+LS log: the README's command (2, 9)
MLKD_LS = {
    ('resnet32x4', 'resnet8x4'): (2.0, 9.0), ('vgg13', 'vgg8'): (2.0, 6.0), ('wrn_40_2', 'wrn_40_1'): (2.0, 9.0),
    ('wrn_40_2', 'wrn_16_2'): (2.0, 9.0), ('resnet56', 'resnet20'): (2.0, 9.0), ('resnet110', 'resnet32'): (2.0, 9.0),
    ('resnet110', 'resnet20'): (2.0, 9.0), ('resnet32x4', 'ShuffleV2'): (2.0, 6.0),
    ('vgg13', 'MobileNetV2'): (2.0, 6.0), ('ResNet50', 'MobileNetV2'): (2.0, 9.0),
}
CTKD_LS_WEIGHT = 9.0   # every logs/CTKD/ctkd,<T>,<S>,2,9.txt

# MLKD's recipe per pair (epochs, lr): its configs/cifar100/ours/*.yaml @5ee473f. No config for resnet110 -> resnet20
# (we use resnet110 -> resnet32's) nor ResNet50 -> vgg8 (vgg13 -> vgg8's: a vgg8 student). The lr decays at
# 150/180/210 whatever the epochs (its configs' LR_DECAY_STAGES; the 960-epoch runs spend 750 epochs at 1e-5).
MLKD_RECIPE = {
    ('resnet32x4', 'resnet8x4'): (240, 0.025), ('resnet56', 'resnet20'): (240, 0.025),
    ('resnet110', 'resnet32'): (240, 0.025), ('resnet110', 'resnet20'): (240, 0.025), ('vgg13', 'vgg8'): (240, 0.025),
    ('wrn_40_2', 'wrn_16_2'): (240, 0.025), ('wrn_40_2', 'wrn_40_1'): (240, 0.025), ('ResNet50', 'vgg8'): (240, 0.025),
    ('vgg13', 'MobileNetV2'): (480, 0.01), ('ResNet50', 'MobileNetV2'): (480, 0.01), ('wrn_40_2', 'ShuffleV1'): (480, 0.01),
    ('resnet32x4', 'ShuffleV1'): (960, 0.01), ('resnet32x4', 'ShuffleV2'): (960, 0.01),
}
# MLKD+LS's recipe per pair: the LS repository's configs/cifar100/mlkd/*.yaml @f6e5aa5 (its logs: the same epochs and
# lr). No config for ResNet50 -> vgg8: its resnet32x4_vgg8.yaml (480, 0.025).
MLKD_LS_RECIPE = {
    ('resnet32x4', 'resnet8x4'): (480, 0.025), ('resnet56', 'resnet20'): (480, 0.025),
    ('resnet110', 'resnet32'): (480, 0.025), ('resnet110', 'resnet20'): (480, 0.025), ('vgg13', 'vgg8'): (480, 0.01),
    ('wrn_40_2', 'wrn_16_2'): (480, 0.025), ('wrn_40_2', 'wrn_40_1'): (480, 0.025), ('ResNet50', 'vgg8'): (480, 0.025),
    ('vgg13', 'MobileNetV2'): (480, 0.01), ('ResNet50', 'MobileNetV2'): (480, 0.01), ('wrn_40_2', 'ShuffleV1'): (480, 0.01),
    ('resnet32x4', 'ShuffleV1'): (960, 0.01), ('resnet32x4', 'ShuffleV2'): (960, 0.01),
}

# Teachers of the sweeps and the students trained from scratch for the "student" rows.
CIFAR_TEACHERS = ['wrn_40_2', 'resnet56', 'resnet110', 'resnet32x4', 'vgg13', 'ResNet50']
CIFAR_STUDENTS = ['wrn_16_2', 'wrn_40_1', 'resnet20', 'resnet32', 'resnet8x4', 'vgg8', 'ShuffleV1', 'ShuffleV2',
                  'MobileNetV2']

TRIALS_CIFAR = 5          # the letKD paper averages 5 trials on CIFAR-100
TRIALS_TINYIMAGENET = 3   # and 3 on Tiny-ImageNet

# the label of a run: (distill, alpha > 0) -> base label, then '+LS' (--logit_stand) and '+DOT' (--trainer dot)
VARIANT_LABELS = ('CRD+KD', 'KD+LS', 'DKD+LS', 'MLKD+LS', 'CTKD+LS', 'KD+DOT')
LABEL_OF_DISTILL = {m.distill: label for label, m in METHODS.items() if label not in VARIANT_LABELS}
LABEL_OF_DISTILL['ce'] = 'student'


def method_label(distill: str, alpha: float, logit_stand: bool = False, trainer: str = 'sgd') -> str:
    """The tables' label of a run: 'crd' with logit KD is 'CRD+KD'; 'ce' runs are the 'student' rows; logit
    standardization appends '+LS' and DOT '+DOT' (published_elsewhere.csv's 'KD+LS', 'KD+DOT')."""
    label = 'CRD+KD' if distill == 'crd' and alpha > 0 else LABEL_OF_DISTILL.get(distill, distill)
    if logit_stand:
        label += '+LS'
    if trainer and trainer != 'sgd':
        label += f'+{trainer.upper()}'
    return label


def _number(value: float) -> str:
    return f'{value:g}'


def pair_flags(label: str, teacher: str, student: str) -> list[str]:
    """The method's flags that depend on the (teacher, student) pair (the same under every protocol)."""
    pair = (teacher, student)
    if label == 'DKD':
        return ['--dkd_beta', str(DKD_BETA.get(pair, 8.0))]
    if label == 'ReviewKD':
        return ['-b', _number(REVIEWKD_BETA.get(pair, REVIEWKD_DEFAULT_BETA))]
    if label in ('KD+LS', 'MLKD+LS'):
        base_temp, kd_weight = (KD_LS if label == 'KD+LS' else MLKD_LS).get(pair, LS_DEFAULT)
        return ['--base_temp', _number(base_temp), '--kd_weight', _number(kd_weight)]
    if label == 'DKD+LS':
        base_temp, kd_weight, beta = DKD_LS.get(pair, (*LS_DEFAULT, DKD_BETA.get(pair, 8.0)))
        return ['--base_temp', _number(base_temp), '--kd_weight', _number(kd_weight), '--dkd_beta', _number(beta)]
    if label == 'CTKD+LS':
        return ['--kd_weight', _number(CTKD_LS_WEIGHT)]
    return []


def pair_recipe(label: str, teacher: str, student: str) -> list[str]:
    """The method's published recipe flags that depend on the pair (the 'published' protocol only): MLKD's and
    MLKD+LS's epochs and lr."""
    table = {'MLKD': MLKD_RECIPE, 'MLKD+LS': MLKD_LS_RECIPE}.get(label)
    if table is None or (teacher, student) not in table:
        return []
    epochs, lr = table[(teacher, student)]
    return ['--epochs', str(epochs), '--learning_rate', _number(lr)]


# ---------------------------------------------------------------------------------------------- ImageNet (Table 2)
# Sources: docs/reference/imagenet-table2.md (fact sheet). Students train from scratch; teachers are
# torchvision's IMAGENET1K_V1 weights (--path_t torchvision:ResNet34 / torchvision:ResNet50).
# Student (b) is MobileNetV1 (mdistiller's r50_mv1; 4,231,976 parameters), not MobileNetV2: the table's
# student/KD/AT/DKD numbers are OFD's / DKD's MobileNet(V1) rows and QuEST's "MNv2" file defines a MobileNetV1.
IMAGENET_PAIRS: dict[str, tuple[str, str]] = {'a': ('ResNet34', 'ResNet18'), 'b': ('ResNet50', 'MobileNetV1')}

# letKD / QUEST: 100 epochs, SGD Nesterov 0.9, lr 0.1 /10 at 30/60/90 (letKD supplementary); batch 256 and
# weight decay 1e-4 (QuEST Config_ImageNet + algorithm.py; QuEST uses 210 for its MNv2 file, we keep 256).
# --batch_size is global under torchrun (helper/distributed.py).
# IMAGENET_QUANTIZED_PROTOCOL: the flags of LETKD_IMAGENET (the protocols' table, at the end)
# Baselines: mdistiller configs/imagenet/*: batch 512 (global), lr 0.2, wd 1e-4, momentum 0.9 without
# Nesterov, x0.1 at 30/60/90, 100 epochs, no effective warm-up.
# IMAGENET_BASELINE_PROTOCOL: the flags of MDISTILLER_IMAGENET (at the end)
IMAGENET_METHODS: dict[str, Method] = {
    'KD': Method('kd', ('-r', '0.5', '-a', '0.5', '-b', '0', '--kd_T', '1'), 'mdistiller imagenet kd.yaml: T 1, CE 0.5, KD 0.5'),
    # mdistiller's AT on ImageNet has no KD term: CE 1, AT weight 1000, p 2
    'AT+KD': Method('attention', ('-r', '1', '-a', '0', '-b', '1000'), 'mdistiller imagenet at.yaml (CE 1, AT 1000)'),
    # WARMUP 1 with 1-based epochs: factor min(epoch / 1, 1) = 1 from the first epoch (no ramp); the CLI's default
    # (20, mdistiller's CIFAR value) would ramp DKD up over the first 20 of the 100 epochs
    'DKD': Method('dkd', ('-r', '1', '-a', '0', '--dkd_alpha', '1', '--dkd_T', '1', '--dkd_warmup', '1'),
                  'mdistiller configs/imagenet/r34_r18/dkd.yaml, r50_mv1/dkd.yaml: CE 1, alpha 1, T 1, WARMUP 1, '
                  'beta 0.5 (a) / 2.0 (b)'),
    'QUEST': Method('quest', ('-r', '1', '-a', '0', '-b', '1', '--quest_tau', '5', '--k_penult', '4096'),
                    'QuEST Config_ImageNet: CE + 1.0 KL, K 4096, beta 5'),
    'letKD-1': Method('letkd1', ('-r', '1', '-a', '0', '-b', '1', '--k_penult', '4096'),
                      'letKD supplementary: K_penult 4096, alpha 1 (beta for ImageNet not stated: CIFAR value 1)'),
    'letKD-2': Method('letkd2', ('-r', '1', '-a', '0', '-b', '1', '--k_penult', '4096', '--k_inter', '8'),
                      'letKD supplementary: K_penult 4096, K_inter 8, alpha (1, 1)'),
}
IMAGENET_DKD_BETA: dict[str, float] = {'a': 0.5, 'b': 2.0}   # mdistiller res34_res18.yaml / r50_mv1.yaml
# The students from scratch (the table's 'student' rows) train with the baselines' protocol.
# Loader workers per process (under torchrun each GPU's process has its own): torchvision's reference uses 16
# per GPU; 8 is what typical 8-GPU nodes with 64-96 cores sustain beside the main processes.
IMAGENET_LOADER: tuple[str, ...] = ('--num_workers', '8')
TRIALS_IMAGENET = 1        # the paper reports one run per ImageNet cell


# letKD / QUEST under torchrun: their authors trained on one GPU, so each BatchNorm saw the whole batch of 256;
# on 8 GPUs a per-process BN would see 32. --sync_bn computes BN statistics over the global batch (students and
# KD layers; the teacher stays frozen in eval mode). The baselines' references ran DataParallel (per-replica BN).
IMAGENET_QUANTIZED_EXECUTION: tuple[str, ...] = ('--sync_bn',)


def imagenet_execution(distill: str) -> tuple[str, ...]:
    """How an ImageNet run executes on several GPUs without changing what the reference computed."""
    return IMAGENET_QUANTIZED_EXECUTION if distill in ('letkd1', 'letkd2', 'quest') else ()


def imagenet_protocol(distill: str) -> tuple[str, ...]:
    """The optimisation protocol of an ImageNet run: letKD/QUEST as their authors, everything else as mdistiller."""
    return IMAGENET_QUANTIZED_PROTOCOL if distill in ('letkd1', 'letkd2', 'quest') else IMAGENET_BASELINE_PROTOCOL


# ------------------------------------------------------------------------------------------------------- protocols
@dataclass(frozen=True)
class Recipe:
    """A training recipe as train_student.py flags: optimiser, schedule, batch, augmentation and loader.

    ``learning_rate`` '' means by the student: 0.05, or 0.01 for MobileNetV2/ShuffleV1/ShuffleV2 (RepDistiller's
    rule, ``models/facts.py`` low_lr). ``pad_mode`` and ``drop_last`` apply to CIFAR-style crops and loaders (every
    data set but ImageNet), ``tiny_aug`` to Tiny-ImageNet, ``sync_bn`` to ImageNet runs under torchrun.
    """
    epochs: str
    batch_size: str
    learning_rate: str
    lr_decay_epochs: str
    lr_decay_rate: str
    weight_decay: str
    momentum: str
    nesterov: bool
    pad_mode: str | None = None
    drop_last: bool = False
    tiny_aug: str | None = None
    sync_bn: bool = False

    def flags(self, dataset: str, student: str, own_optimizer: bool = False) -> list[str]:
        """The flags of this recipe for a run of ``student`` on ``dataset``; ``own_optimizer`` (DOT): without the
        optimiser's Nesterov switch, since the method's update is the optimiser."""
        lr = self.learning_rate
        if not lr:
            from helper.util import default_learning_rate     # models' facts (torch); the table itself stays light
            lr = str(default_learning_rate(student))
        out = ['--epochs', self.epochs, '--batch_size', self.batch_size, '--learning_rate', lr,
               '--lr_decay_epochs', self.lr_decay_epochs, '--lr_decay_rate', self.lr_decay_rate,
               '--weight_decay', self.weight_decay, '--momentum', self.momentum]
        if self.nesterov and not own_optimizer:
            out.append('--nesterov')
        if dataset != 'imagenet':
            out += ['--pad_mode', self.pad_mode or 'zero'] + (['--drop_last'] if self.drop_last else [])
            if dataset == 'tinyimagenet' and self.tiny_aug:
                out += ['--tiny_aug', self.tiny_aug]
        elif self.sync_bn:
            out.append('--sync_bn')
        return out


@dataclass(frozen=True)
class Protocol:
    """What a sweep's ``--protocol`` sets: a recipe for the small data sets (CIFAR-100, Tiny-ImageNet, digits) and one
    for ImageNet; None: each method's own published recipe. Method flags (weights, temperatures, per-pair values)
    are never part of a protocol."""
    name: str
    summary: str
    small: Recipe | None
    imagenet: Recipe | None
    source: str


# RepDistiller's recipe: train_student.py's defaults (SGD momentum 0.9 without Nesterov, lr 0.05 forced to 0.01 for
# MobileNetV2/ShuffleV1/ShuffleV2, x0.1 after 150/180/210 of 240 epochs, wd 5e-4, batch 64), dataset/cifar100.py
# (RandomCrop(32, padding=4): zero padding; the DataLoader keeps the last short batch). RepDistiller has no
# Tiny-ImageNet: its augmentation at 64 pixels, RandomCrop(64, padding 4) + flip.
REPDISTILLER_SMALL = Recipe('240', '64', '', '150,180,210', '0.1', '5e-4', '0.9', nesterov=False, pad_mode='zero',
                            drop_last=False, tiny_aug='crop')
# The letKD authors' recipe (docs/reference/letkd-official.md §4-5, every CIFAR-100 config): the same lr table
# (LUT_lr 0.05, 0.01 for SNv1/SNv2/MNv2 students, /10 at 150/180/210, 240 epochs), batch 64, wd 5e-4 on every tensor,
# SGD momentum 0.9 with Nesterov, RandomCrop(32, padding=4, padding_mode='reflect'), drop_last (781 iterations);
# Tiny-ImageNet: RandomRotation(20) + flip, no crop (their dataset code). No warm-up, no seeding.
LETKD_SMALL = Recipe('240', '64', '', '150,180,210', '0.1', '5e-4', '0.9', nesterov=True, pad_mode='reflect',
                     drop_last=True, tiny_aug='rotate')
# ImageNet: mdistiller configs/imagenet/* (its baselines): batch 512 (global), lr 0.2, wd 1e-4, momentum 0.9 without
# Nesterov, x0.1 at 30/60/90, 100 epochs, no effective warm-up; DataParallel, so per-replica BatchNorm.
MDISTILLER_IMAGENET = Recipe('100', '512', '0.2', '30,60,90', '0.1', '1e-4', '0.9', nesterov=False, sync_bn=False)
# letKD / QUEST: 100 epochs, SGD Nesterov 0.9, lr 0.1 /10 at 30/60/90 (letKD supplementary); batch 256 and weight
# decay 1e-4 (QuEST Config_ImageNet + algorithm.py; QuEST uses 210 for its MNv2 file, we keep 256); one GPU, so every
# BatchNorm saw the whole batch: --sync_bn under torchrun.
LETKD_IMAGENET = Recipe('100', '256', '0.1', '30,60,90', '0.1', '1e-4', '0.9', nesterov=True, sync_bn=True)

PROTOCOLS: dict[str, Protocol] = {
    'published': Protocol(
        'published', "each method with its own published recipe (the default; today's sweeps)", None, None,
        "Method.recipe and pair_recipe above: RepDistiller's recipe for most methods; QUEST, letKD-1, letKD-2: "
        "Nesterov, reflect padding, drop_last; MLKD, MLKD+LS: their lr and 240-960 epochs. ImageNet: letKD/QUEST the "
        "letKD recipe, every other method and the students from scratch mdistiller's"),
    'repdistiller': Protocol(
        'repdistiller', "every method with RepDistiller's recipe (ImageNet: mdistiller's baseline recipe)",
        REPDISTILLER_SMALL, MDISTILLER_IMAGENET,
        "RepDistiller train_student.py, helper/util.py adjust_learning_rate, dataset/cifar100.py @b84f547 "
        "(docs/reference/repdistiller-mdistiller-simkd.md §1.2, §9); ImageNet: mdistiller configs/imagenet/* @a08d46f"),
    'letkd': Protocol(
        'letkd', "every method with the letKD/QUEST authors' recipe",
        LETKD_SMALL, LETKD_IMAGENET,
        "letKD-framework @4fb2289 CIFAR100 configs and dataset code (docs/reference/letkd-official.md §4, §5); "
        "ImageNet: letKD supplementary §2.2, QuEST Config_ImageNet + algorithm.py"),
}
DEFAULT_PROTOCOL = 'published'
# the published protocol's two ImageNet recipes (imagenet_protocol); --sync_bn is imagenet_execution's
IMAGENET_QUANTIZED_PROTOCOL = tuple(f for f in LETKD_IMAGENET.flags('imagenet', '') if f != '--sync_bn')
IMAGENET_BASELINE_PROTOCOL = tuple(MDISTILLER_IMAGENET.flags('imagenet', ''))


def recipe_flags(protocol: str, label: str, teacher: str, student: str, dataset: str) -> list[str]:
    """The recipe part of a run's command line (CIFAR-100, Tiny-ImageNet, digits): under 'published' the method's
    own (``Method.recipe`` and ``pair_recipe``), under another protocol the protocol's, the same for every method
    (DOT keeps its own momentum update: no Nesterov)."""
    method = METHODS[label]
    recipe = PROTOCOLS[protocol].small
    if recipe is None:
        return [*method.recipe, *pair_recipe(label, teacher, student)]
    return recipe.flags(dataset, student, own_optimizer=method.own_optimizer)


def imagenet_recipe(protocol: str, distill: str, own_optimizer: bool = False) -> list[str]:
    """The recipe of an ImageNet run: the published protocol's per-method choice (imagenet_protocol +
    imagenet_execution), or the protocol's recipe for every method."""
    recipe = PROTOCOLS[protocol].imagenet
    if recipe is None:
        return [*imagenet_protocol(distill), *imagenet_execution(distill)]
    return recipe.flags('imagenet', '', own_optimizer=own_optimizer)
