"""TDD and TDD+CRD: the offline class trees (hand-made embeddings), the reference's choices (teacher
feature, node prototype), the decision loss against its formula, gradients, the paper's pairs, the
cache, degenerate trees, and one epoch of each through train_student.cli."""
import csv
import hashlib
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import train_student
from dataset import get_dataloaders
from distiller_zoo import build_distiller
from distiller_zoo.tdd import (TDD, TDDCRD, block3_preact_maps, class_tree_partition, cut_tree, is_degenerate,
                               knn_purity, node_members, node_prototypes, stage_embeddings)
from helper.errors import UserError
from helper.util import load_checkpoint, save_checkpoint
from models import create_model
from scripts import compare_with_paper
from tests.fixtures_data import train_on_fixed_batch, write_cifar100
from tests.options import data_info, student_options

FAST = ['--num_workers', '0', '--batch_size', '32', '--device', 'cpu', '--print_freq', '1000']


def make_opt(distill='tdd', **kw):
    base = dict(gamma=0.1, alpha=0.9, beta=0.1, kd_T=4.0, tdd_threshold=0.2, tdd_knn=3,
                model_t='resnet14', model_s='resnet8', dataset='cifar100', path_t=None,
                feat_dim=16, nce_k=8, nce_t=0.07, nce_m=0.5, crd_weight=0.8, seed=0)
    base.update(kw)
    return student_options(distill, **base)


def make_info(num_classes=10, n_data=40, image_size=32):
    return data_info(num_classes=num_classes, n_data=n_data, image_size=image_size)


def build(name='tdd', student='resnet8', teacher='resnet14', num_classes=10, n_data=40, image_size=32, **kw):
    torch.manual_seed(0)
    s, t = create_model(student, num_classes), create_model(teacher, num_classes)
    return build_distiller(name, s, t, make_opt(name, model_s=student, model_t=teacher, **kw),
                           make_info(num_classes, n_data, image_size))


def modulo_partition(num_classes, num_groups):
    """Classes grouped by c % num_groups: group g = [g, g + M, g + 2M, ...]."""
    return [list(range(g, num_classes, num_groups)) for g in range(num_groups)]


# ------------------------------------------------------------------------- offline class trees
# Four classes in 2-D: class means (0,0), (0,2), (10,0), (10,2) -> Ward joins {0,1} and {2,3} first.
# Node prototypes (mean of class means): {0,1} -> (0,1), {2,3} -> (10,1). Outlying samples (in pairs
# that keep the class means) put other classes next to those prototypes:
#   4 nearest of (0,1):  (0.1,1) class 2, (0.2,1) class 3, (0,0.5) class 0, (0,1.5) class 1 -> purity 2/4
#   4 nearest of (10,1): (10.1,1) class 0, (10,0.5) class 2, (10,1.5) class 3, then (10,-0.5) class 2 or
#                        (10,2.5) class 3 (tied at 1.5)                                     -> purity 3/4
# The root always has purity 1. Class 0 has 6 samples and class 1 only 2, so the mean of the node's
# samples would be (0,0.5), whose 4 nearest are three class-0 samples and (0.1,1): purity 3/4, which
# would split {0,1} at threshold 0.6. The expected partitions therefore also pin the prototype choice.
TOY = {0: [(0, 0.5), (0, -0.5), (10.1, 1), (-10.1, -1), (0.05, 0), (-0.05, 0)],
       1: [(0, 2.5), (0, 1.5)],
       2: [(0.1, 1), (19.9, -1), (10, 0.5), (10, -0.5)],
       3: [(0.2, 1), (19.8, 3), (10, 1.5), (10, 2.5)]}


def toy_embeddings():
    emb = torch.tensor([p for c in TOY for p in TOY[c]], dtype=torch.float32)
    labels = torch.tensor([c for c in TOY for _ in TOY[c]])
    return emb, labels


@pytest.mark.parametrize('threshold, expected', [
    (0.0, [[0], [1], [2], [3]]),
    (0.4, [[0], [1], [2], [3]]),
    (0.5, [[0], [1], [2], [3]]),          # purity >= threshold splits
    (0.6, [[0, 1], [2], [3]]),
    (0.8, [[0, 1], [2, 3]]),
    (1.0, [[0, 1], [2, 3]]),              # the root (purity 1) is still split
])
def test_tree_cut_on_hand_made_class_embeddings(threshold, expected):
    emb, labels = toy_embeddings()
    partition, info = class_tree_partition(emb, labels, 4, threshold, k=4)
    assert partition == expected
    assert info['linkage'].tolist() == [[0, 1], [2, 3], [4, 5]]
    assert info['purity'].tolist() == pytest.approx([0.5, 0.75, 1.0])


def test_cut_tree_descends_only_through_pure_nodes():
    # 5 classes: node 5 = {0,1}, 6 = {2,3}, 7 = {0,1,4}, 8 = root {0..4}
    children = [(0, 1), (2, 3), (5, 4), (7, 6)]
    members = node_members(children, 5)
    assert members[5:] == [[0, 1], [2, 3], [0, 1, 4], [0, 1, 2, 3, 4]]
    purity = torch.tensor([0.9, 0.1, 0.3, 1.0])
    # root split; {2,3} impure -> one group; {0,1,4} pure -> split; {0,1} pure -> split into leaves
    assert cut_tree(children, members, purity, 0.2) == [[0], [1], [2, 3], [4]]
    # {0,1,4} impure -> one group, whatever its pure child {0,1} says
    assert cut_tree(children, members, purity, 0.5) == [[0, 1, 4], [2, 3]]


def test_knn_purity_computed_by_hand():
    # 1-D embeddings at 0, 1, 3, 4, 10, 11 with labels 0, 1, 2, 0, 1, 1
    emb = torch.tensor([[0.0], [1.0], [3.0], [4.0], [10.0], [11.0]])
    labels = torch.tensor([0, 1, 2, 0, 1, 1])
    prototypes = torch.tensor([[0.5], [0.5], [10.4], [2.0]])
    members = [[0], [0, 1], [1], [2]]
    purity = knn_purity(prototypes, emb, labels, members, k=3, num_classes=3)
    # 0.5:  nearest 0 (l0), 1 (l1), 3 (l2)            -> {0}: 1/3, {0,1}: 2/3
    # 10.4: nearest 10 (l1), 11 (l1), 4 (l0)          -> {1}: 2/3
    # 2.0:  1 and 3 tie at distance 1 (both taken), then 0 and 4 tie at 2 -> the lower index (x=0, l0) wins
    assert purity.tolist() == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1 / 3])
    # k = 1 at 2.0: the tie between x=1 (index 1, l1) and x=3 (index 2, l2) goes to index 1
    assert knn_purity(prototypes[3:], emb, labels, [[1]], k=1, num_classes=3).tolist() == [1.0]


# A hand-made tree where the two prototypes differ: 1-D class means 0, 1, 3, 100. Ward joins {0,1}
# (node 4), then {0,1} with class 2 (node 5: children 2 and 4), then class 3 (root 6).
#   node 4 {0,1}:   mean (0+1)/2 = 0.5           midpoint (0+1)/2 = 0.5
#   node 5 {0,1,2}: mean (0+1+3)/3 = 4/3         midpoint (0.5+3)/2 = 1.75
#   root {0..3}:    mean 104/4 = 26              midpoint (1.75+100)/2 = 50.875
# Samples: class 3 has 1.8 (and 198.2, keeping its mean at 100). With k = 1 the nearest sample of 4/3
# is x=1 (class 1, in node 5): purity 1; the nearest of 1.75 is x=1.8 (class 3): purity 0.
MIDPOINT_TOY = {0: [0.0], 1: [1.0], 2: [3.0], 3: [1.8, 198.2]}


def test_node_prototypes_mean_versus_midpoint_by_hand():
    children = [(0, 1), (2, 4), (3, 5)]
    means = torch.tensor([[0.0], [1.0], [3.0], [100.0]], dtype=torch.float64)
    assert node_prototypes(children, means, 'mean').flatten().tolist() == pytest.approx([0.5, 4 / 3, 26.0])
    assert node_prototypes(children, means, 'midpoint').flatten().tolist() == pytest.approx([0.5, 1.75, 50.875])
    with pytest.raises(UserError, match='tdd_prototype'):
        node_prototypes(children, means, 'median')


def test_the_prototype_choice_changes_the_purity_and_the_cut():
    emb = torch.tensor([[x] for c in MIDPOINT_TOY for x in MIDPOINT_TOY[c]])
    labels = torch.tensor([c for c in MIDPOINT_TOY for _ in MIDPOINT_TOY[c]])
    mean_cut, mean_info = class_tree_partition(emb, labels, 4, 0.5, k=1, prototype='mean')
    mid_cut, mid_info = class_tree_partition(emb, labels, 4, 0.5, k=1, prototype='midpoint')
    assert mean_info['linkage'].tolist() == mid_info['linkage'].tolist() == [[0, 1], [2, 4], [3, 5]]
    # node 4's prototype 0.5 is equidistant from x=0 and x=1 (both inside it); the root is always pure
    assert mean_info['purity'].tolist() == [1.0, 1.0, 1.0]
    assert mid_info['purity'].tolist() == [1.0, 0.0, 1.0]
    assert mean_cut == [[0], [1], [2], [3]]
    assert mid_cut == [[0, 1, 2], [3]]
    # the default is the mean of the class means
    assert class_tree_partition(emb, labels, 4, 0.5, k=1)[0] == mean_cut


def randomize_batchnorm(model):
    """Non-trivial BN statistics and affine parameters, so that every BN of the hand computation matters."""
    generator = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator) * 0.3)
    return model.eval()


def bn(x, m):
    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


@torch.no_grad()
def test_reference_teacher_feature_is_the_pre_relu_residual_sum_of_block_3_by_hand():
    torch.manual_seed(0)
    teacher = randomize_batchnorm(create_model('resnet32', 10))      # 5 blocks per stage: block 3 is inside
    keys = set(teacher.state_dict())
    image = torch.randn(2, 3, 32, 32)
    maps = block3_preact_maps(teacher, image)
    assert [tuple(m.shape) for m in maps] == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]

    # by hand for stage 2: run the stem, stage 1 and blocks 1-2 of stage 2, then block 3's two convs
    x = F.relu(bn(F.conv2d(image, teacher.conv1.weight, padding=1), teacher.bn1))
    x = teacher.layer2[:2](teacher.layer1(x))
    block = teacher.layer2[2]
    assert block.downsample is None                                   # the shortcut of block 3 is the identity
    h = F.relu(bn(F.conv2d(x, block.conv1.weight, padding=1), block.bn1))
    expected = bn(F.conv2d(h, block.conv2.weight, padding=1), block.bn2) + x
    assert torch.allclose(maps[1], expected, atol=1e-5)
    assert (maps[1] < 0).any()                                        # before the ReLU
    assert not torch.allclose(maps[1], F.relu(expected))
    feats, _ = teacher(image, is_feat=True, preact=True)               # and not the stage's last block
    assert not torch.allclose(maps[1], feats[2])
    # the hooks are gone and the model is unchanged
    assert set(teacher.state_dict()) == keys
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in teacher.modules())


@torch.no_grad()
def test_reference_teacher_feature_feeds_the_embeddings_and_the_heads():
    torch.manual_seed(0)
    teacher = randomize_batchnorm(create_model('resnet20', 10))
    image, target = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5])
    loader = [(image, target, torch.arange(6))]
    embeddings, labels = stage_embeddings(teacher, loader, 6, torch.device('cpu'), 'block3_preact')
    for emb, f in zip(embeddings, block3_preact_maps(teacher, image)):
        assert torch.allclose(emb, f.mean(dim=(2, 3)), atol=1e-6)
    # resnet20: block 3 is the last block of each stage, i.e. RepDistiller's preact stage features
    feats, _ = teacher(image, is_feat=True, preact=True)
    assert all(torch.allclose(e, f.mean(dim=(2, 3)), atol=1e-5) for e, f in zip(embeddings, feats[1:-1]))
    distiller = build(teacher='resnet56', tdd_teacher_feat='block3_preact')
    distiller.set_partitions([modulo_partition(10, m) for m in (2, 5, 10)])
    assert [h.linear.in_features for h in distiller.heads] == [16, 32, 64]


@pytest.mark.parametrize('teacher', ['resnet14', 'wrn_40_2'])
def test_reference_teacher_feature_needs_a_cifar_resnet_with_three_blocks(teacher):
    with pytest.raises(UserError, match='block3_preact'):      # the resolver refuses it
        make_opt(model_t=teacher, tdd_teacher_feat='block3_preact')
    opt = make_opt(model_t='resnet32x4', tdd_teacher_feat='block3_preact')
    with pytest.raises(UserError, match='block3_preact'):      # and so does the constructor, on the real teacher
        TDD(create_model('resnet8', 10), create_model(teacher, 10), opt, make_info())
    with pytest.raises(SystemExit):                            # argparse's choices
        train_student.get_args_parser().parse_args(['--tdd_prototype', 'median'])


def test_head_counters_live_on_the_students_device_as_buffers_changed_in_place():
    """On CUDA, CPU counters would keep a compiled step out of CUDA graphs; ints would recompile it every step;
    new tensors each step would change the graph's inputs. The meta device stands in for a GPU."""
    distiller = build().to('meta')
    distiller.set_partitions([modulo_partition(10, m) for m in (2, 5, 10)])
    meters = distiller.head_meters
    assert meters.names == ['tdd_head_acc_1', 'tdd_head_acc_2', 'tdd_head_acc_3']
    assert {b.device.type for b in meters.buffers()} == {'meta'}
    distiller = build()
    distiller.set_partitions([modulo_partition(10, m) for m in (2, 5, 10)])
    addresses = [b.data_ptr() for b in distiller.head_meters.buffers()]
    feat_s, _ = distiller.student(torch.randn(4, 3, 32, 32), is_feat=True)
    distiller.method_loss(feat_s, [], None, None, torch.tensor([0, 3, 9, 4]))
    assert [b.data_ptr() for b in distiller.head_meters.buffers()] == addresses
    assert distiller.head_meters.counts.tolist() == [4.0, 4.0, 4.0]
    assert set(distiller.epoch_metrics()) == {f'tdd_{k}_{i}' for k in ('groups', 'head_acc') for i in (1, 2, 3)}
    assert distiller.head_meters.counts.tolist() == [0.0, 0.0, 0.0]     # read and reset


# ------------------------------------------------------------------------- the decision loss
def test_decision_loss_equals_the_weighted_ce_formula():
    distiller = build()
    partitions = [[[0, 1, 2], [3, 4], [5, 6, 7, 8, 9]], [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]],
                  [[c] for c in range(10)]]
    distiller.set_partitions(partitions)
    assert distiller.partitions() == partitions
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 9, 4])
    distiller.train()
    feat_s, _ = distiller.student(x, is_feat=True)
    loss = distiller.method_loss(feat_s, [], None, None, y)

    expected = 0.0
    for head, groups, feature in zip(distiller.heads, partitions, feat_s[1:-1]):
        logits = (feature.mean(dim=(2, 3)) @ head.linear.weight.T + head.linear.bias).tolist()
        num = den = 0.0
        for row, label in zip(logits, y.tolist()):
            g = next(i for i, members in enumerate(groups) if label in members)
            ce = math.log(sum(math.exp(v) for v in row)) - row[g]
            num += ce / len(groups[g])
            den += 1 / len(groups[g])
        expected += num / den
    assert loss.item() == pytest.approx(expected, rel=1e-5)

    _, losses = distiller.forward_train(x, y)
    assert set(losses) == {'ce', 'kd', 'tdd'}
    assert losses['tdd'].item() == pytest.approx(0.1 * expected, rel=1e-5)


def test_heads_get_gradients_the_teacher_does_not_and_are_not_deployed():
    distiller = build()
    distiller.set_partitions([modulo_partition(10, m) for m in (2, 5, 10)])
    torch.manual_seed(5)
    batches = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])),
               (torch.randn(6, 3, 32, 32), torch.tensor([9, 8, 7, 6, 5, 4]))]
    for x, y in batches:
        _, losses = distiller.forward_train(x, y)
        sum(losses.values()).backward()
    assert all(p.grad is not None for p in distiller.heads.parameters())
    assert all(p.grad is not None for p in distiller.student.parameters())
    assert all(p.grad is None for p in distiller.teacher.parameters())
    trainable = {id(p) for p in distiller.trainable_parameters()}
    assert trainable == {id(p) for p in distiller.student.parameters()} | {id(p) for p in distiller.heads.parameters()}
    assert distiller.deployable() is distiller.student
    metrics = distiller.epoch_metrics()
    assert [metrics[f'tdd_groups_{i}'] for i in (1, 2, 3)] == [2.0, 5.0, 10.0]
    # the heads' coarse accuracy over both batches, recomputed from their logits (no optimiser step was taken,
    # and train-mode BN normalises with the batch's own statistics, so the features are the same) and the
    # coarse label of each class under the modulo partitions: class c is in group c % M
    correct = [0, 0, 0]
    with torch.no_grad():
        for x, y in batches:
            feat_s, _ = distiller.student(x, is_feat=True)
            for i, (head, groups) in enumerate(zip(distiller.heads, (2, 5, 10))):
                logits = feat_s[i + 1].mean(dim=(2, 3)) @ head.linear.weight.T + head.linear.bias
                correct[i] += sum(int(row.argmax()) == label % groups for row, label in zip(logits, y.tolist()))
    assert [metrics[f'tdd_head_acc_{i}'] for i in (1, 2, 3)] == pytest.approx([100.0 * c / 10 for c in correct])
    assert 'tdd_head_acc_1' not in distiller.epoch_metrics()      # accumulators were reset


def test_loss_decreases_on_a_fixed_batch():
    distiller = build()
    distiller.set_partitions([modulo_partition(10, m) for m in (2, 5, 10)])
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    history = train_on_fixed_batch(distiller, x, y)
    total, decision = [s['total'] for s in history], [s['tdd'] for s in history]
    assert total[-1] < 0.7 * total[0]
    assert decision[-1] < 0.8 * decision[0]


def test_training_before_prepare_is_refused():
    with pytest.raises(RuntimeError, match='prepare'):
        build().forward_train(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))


@pytest.mark.parametrize('kw, match', [({'tdd_threshold': 1.5}, 'tdd_threshold'), ({'tdd_knn': 0}, 'tdd_knn'),
                                       ({'tdd_knn': 41}, 'tdd_knn')])
def test_bad_flags_are_user_errors(kw, match):
    with pytest.raises(UserError, match=match):
        build(**kw)


PAIRS = [('wrn_40_2', 'wrn_16_2', [32, 64, 128]), ('wrn_40_2', 'wrn_40_1', [16, 32, 64]),
         ('resnet56', 'resnet20', [16, 32, 64]), ('wrn_40_2', 'ShuffleV1', [240, 480, 960]),
         ('ResNet50', 'MobileNetV2', [12, 16, 48, 160])]


@pytest.mark.parametrize('teacher, student, channels', PAIRS)
def test_paper_pairs_get_one_head_per_stage(teacher, student, channels):
    distiller = build(student=student, teacher=teacher, num_classes=100, n_data=1000)
    distiller.set_partitions([modulo_partition(100, m) for m in (4, 20, 50, 100)])
    assert [h.linear.in_features for h in distiller.heads] == channels
    assert [h.linear.out_features for h in distiller.heads] == [4, 20, 50, 100][:len(channels)]
    logits, losses = distiller.forward_train(torch.randn(2, 3, 32, 32), torch.tensor([7, 42]))
    assert logits.shape == (2, 100)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in distiller.heads.parameters())


def test_zip_truncation_and_64x64_inputs_with_200_classes():
    # ResNet50 has 4 stages, resnet20 3: teacher stages 1-3 teach student stages 1-3
    distiller = build(student='resnet20', teacher='ResNet50', num_classes=200, n_data=1000, image_size=64)
    assert distiller.teacher_stages == [1, 2, 3, 4]
    distiller.set_partitions([modulo_partition(200, m) for m in (3, 30, 200, 200)])
    assert [(h.linear.in_features, h.linear.out_features) for h in distiller.heads] == [(16, 3), (32, 30), (64, 200)]
    logits, losses = distiller.forward_train(torch.randn(2, 3, 64, 64), torch.tensor([5, 199]))
    assert logits.shape == (2, 200)
    sum(losses.values()).backward()


def test_tdd_crd_adds_the_crd_term_at_its_own_weight():
    assert TDDCRD.data_mode == 'crd' and TDD.data_mode == 'plain'
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    index = torch.tensor([0, 1, 2, 3])
    contrast_idx = torch.cat([index[:, None], torch.randint(0, 40, (4, 8))], 1)
    crd_losses = []
    for weight in (0.8, 0.4):
        distiller = build('tdd_crd', crd_weight=weight)      # same seed: same student, embeddings and memory
        distiller.set_partitions([modulo_partition(10, m) for m in (2, 5, 10)])
        _, losses = distiller.forward_train(x, y, index=index, contrast_idx=contrast_idx)
        crd_losses.append(losses['crd'].item())
    assert set(losses) == {'ce', 'kd', 'tdd', 'crd'}
    assert crd_losses[1] == pytest.approx(crd_losses[0] / 2, rel=1e-5) and crd_losses[0] > 0
    sum(losses.values()).backward()
    crd = distiller.criterion_crd
    assert all(p.grad is not None for p in [*crd.embed_s.parameters(), *crd.embed_t.parameters()])
    assert all(p.grad is not None for p in distiller.heads.parameters())
    assert all(p.grad is None for p in distiller.teacher.parameters())


# ------------------------------------------------------------------------- prepare and cache
@pytest.fixture(scope='module')
def small_data(tmp_path_factory):
    """10 classes x 4 train images (no download), and a random resnet14 teacher checkpoint."""
    root = tmp_path_factory.mktemp('tdd_small')
    write_cifar100(root, n_train_per_class=4, n_test_per_class=1, num_classes=10)
    torch.manual_seed(1)
    folder = root / 'resnet14_vanilla'
    folder.mkdir()
    save_checkpoint({'model': create_model('resnet14', 10).state_dict()}, folder / 'ckpt_epoch_240.pth')
    return root, folder / 'ckpt_epoch_240.pth'


def prepared(small_data, cache_dir, **kw):
    root, ckpt = small_data
    data = get_dataloaders('cifar100', str(root), batch_size=8, num_workers=0, mode='plain', download=False)
    teacher = create_model('resnet14', 10)
    teacher.load_state_dict(load_checkpoint(ckpt)['model'])
    distiller = TDD(create_model('resnet8', 10), teacher, make_opt('tdd', path_t=str(ckpt), **kw), make_info())
    distiller.prepare(data, device=torch.device('cpu'), cache_dir=str(cache_dir))
    return distiller, data


def test_prepare_builds_the_trees_from_clean_teacher_features_and_caches_them(small_data, tmp_path, capsys):
    distiller, data = prepared(small_data, tmp_path)
    assert 'TDD: groups per teacher stage' in capsys.readouterr().out
    (path,) = (tmp_path / 'tdd').iterdir()
    cached = load_checkpoint(path)
    meta = cached['meta']
    assert {k: meta[k] for k in ('teacher_arch', 'dataset', 'num_classes', 'n_images', 'stages', 'threshold',
                                 'knn', 'format_version')} == \
        {'teacher_arch': 'resnet14', 'dataset': 'cifar100', 'num_classes': 10, 'n_images': 40, 'stages': [1, 2, 3],
         'threshold': 0.2, 'knn': 3, 'format_version': 1}
    assert (meta['teacher_feat'], meta['prototype']) == ('stage', 'mean')
    assert meta['teacher_sha256'] == hashlib.sha256(small_data[1].read_bytes()).hexdigest()
    assert meta['groups_per_stage'] == [len(p) for p in cached['partitions']]
    assert distiller.partitions() == cached['partitions']
    # embeddings: GAP of the stage outputs of the un-augmented training images, placed by index
    embeddings, labels = stage_embeddings(distiller.teacher, data.train_eval_loader, 40, torch.device('cpu'))
    image, target, index = next(iter(data.train_eval_loader))
    with torch.no_grad():
        feats, _ = distiller.teacher(image, is_feat=True)
    for emb, f in zip(embeddings, feats[1:-1]):
        assert torch.allclose(emb[index], f.mean(dim=(2, 3)), atol=1e-5)
    assert torch.equal(labels[index], target)
    # one partition of the 10 classes per stage; which partition is checked by hand in
    # test_prepare_cuts_hand_made_embeddings_into_the_groups_worked_out_on_paper
    assert len(cached['partitions']) == 3
    assert all(sorted(c for g in p for c in g) == list(range(10)) for p in cached['partitions'])


# Three teacher stages of hand-made 2-D embeddings for 4 classes with 6, 2, 4 and 4 images (one label vector for
# all stages). The class means are (0,0), (0,2), (10,0), (10,2) at every stage, so Ward joins {0,1} and {2,3}
# (distance 2, 10 apart from each other) and then the root; the node prototypes (means of the class means) are
# A = (0,1) for {0,1} and B = (10,1) for {2,3}. kNN with k = 4, threshold 0.6 (purity >= 0.6 splits):
#   stage 1 (TOY above): A -> 2/4, B -> 3/4                               -> [[0, 1], [2], [3]]
#   stage 2: 4 nearest of A: (0,0.5) c0, (0,1.5) c1 (0.5), (0,-0.5) c0, (0,2.5) c1 (1.5)   -> 4/4: split
#            4 nearest of B: (10,1.1) c0, (9.9,1) c0 (0.1), (10,0.5) c2, (10,1.5) c3 (0.5) -> 2/4: one group
#            (class 0's far points (-10,-1.1), (-9.9,-1) keep its mean at (0,0))        -> [[0], [1], [2, 3]]
#   stage 3: A: (0.1,1) c2, (0.2,1) c3, (0,0.5) c0, (0,1.5) c1 -> 2/4;  B: (10.1,1) c0, (9.9,1) c0,
#            (10,0.5) c2, (10,1.5) c3 -> 2/4: neither node is split                     -> [[0, 1], [2, 3]]
HAND_STAGES = [
    [p for c in TOY for p in TOY[c]],
    [(0, 0.5), (0, -0.5), (10, 1.1), (-10, -1.1), (9.9, 1), (-9.9, -1),      # class 0
     (0, 1.5), (0, 2.5),                                                     # class 1
     (10, 0.5), (10, -0.5), (10, 0), (10, 0),                                # class 2
     (10, 1.5), (10, 2.5), (10, 2), (10, 2)],                                # class 3
    [(10.1, 1), (-10.1, -1), (9.9, 1), (-9.9, -1), (0, 0.5), (0, -0.5),
     (0, 1.5), (0, 2.5),
     (0.1, 1), (19.9, -1), (10, 0.5), (10, -0.5),
     (0.2, 1), (19.8, 3), (10, 1.5), (10, 2.5)],
]
HAND_LABELS = [0] * 6 + [1] * 2 + [2] * 4 + [3] * 4


def test_prepare_cuts_hand_made_embeddings_into_the_groups_worked_out_on_paper(small_data, tmp_path, monkeypatch):
    _, ckpt = small_data
    labels = torch.tensor(HAND_LABELS)
    for points in HAND_STAGES:                                   # the class means the comment above relies on
        emb = torch.tensor(points, dtype=torch.float64)
        means = torch.stack([emb[labels == c].mean(0) for c in range(4)])
        assert torch.allclose(means, torch.tensor([[0.0, 0], [0, 2], [10, 0], [10, 2]], dtype=torch.float64))
    teacher = create_model('resnet14', 4)
    loader = object()
    calls = []

    def hand_made(model, train_loader, n_data, device, feature='stage'):
        calls.append((model, train_loader, n_data, feature))
        return [torch.tensor(points, dtype=torch.float32) for points in HAND_STAGES], labels.clone()

    monkeypatch.setattr('distiller_zoo.tdd.stage_embeddings', hand_made)
    opt = make_opt('tdd', path_t=str(ckpt), tdd_threshold=0.6, tdd_knn=4)
    distiller = TDD(create_model('resnet8', 4), teacher, opt, make_info(num_classes=4, n_data=16))
    distiller.prepare(SimpleNamespace(train_eval_loader=loader), device=torch.device('cpu'), cache_dir=str(tmp_path))
    assert calls == [(teacher, loader, 16, 'stage')]
    expected = [[[0, 1], [2], [3]], [[0], [1], [2, 3]], [[0, 1], [2, 3]]]
    assert distiller.partitions() == expected
    assert [h.linear.out_features for h in distiller.heads] == [3, 3, 2]
    (path,) = (tmp_path / 'tdd').iterdir()
    cached = load_checkpoint(path)
    assert cached['partitions'] == expected and cached['meta']['groups_per_stage'] == [3, 3, 2]
    assert cached['linkage'][0].tolist() == [[0, 1], [2, 3], [4, 5]]
    assert cached['purity'][0].tolist() == pytest.approx([0.5, 0.75, 1.0])
    assert sorted(cached['purity'][1].tolist()) == pytest.approx([0.5, 1.0, 1.0])
    assert sorted(cached['purity'][2].tolist()) == pytest.approx([0.5, 0.5, 1.0])


def test_cache_is_reused_and_a_mismatching_file_is_refused(small_data, tmp_path, monkeypatch, capsys):
    first, _ = prepared(small_data, tmp_path)
    capsys.readouterr()

    def no_features(*args, **kwargs):
        raise AssertionError('the cache should have been used')
    monkeypatch.setattr('distiller_zoo.tdd.stage_embeddings', no_features)
    second, _ = prepared(small_data, tmp_path)
    assert 'loaded from' in capsys.readouterr().out
    assert second.partitions() == first.partitions()

    (path,) = (tmp_path / 'tdd').iterdir()
    cached = load_checkpoint(path)
    cached['meta']['stages'] = [1, 2]
    save_checkpoint(cached, path)
    with pytest.raises(UserError, match='stages'):
        prepared(small_data, tmp_path)
    cached['meta']['stages'] = [1, 2, 3]
    cached['partitions'][0] = [[0, 1]]
    save_checkpoint(cached, path)
    with pytest.raises(UserError, match='damaged'):
        prepared(small_data, tmp_path)


def test_prototype_choice_has_its_own_cache_file_and_old_files_still_load(small_data, tmp_path, capsys):
    mean, _ = prepared(small_data, tmp_path)
    midpoint, _ = prepared(small_data, tmp_path, tdd_prototype='midpoint')
    assert 'prototypes midpoint' in capsys.readouterr().out
    files = sorted(p.name for p in (tmp_path / 'tdd').iterdir())
    assert len(files) == 2 and files[1].endswith('_knn3_midpoint.pth')
    assert load_checkpoint(tmp_path / 'tdd' / files[1])['meta']['prototype'] == 'midpoint'
    # a file written before the choices existed (no such keys) is the default's
    path = tmp_path / 'tdd' / files[0]
    cached = load_checkpoint(path)
    del cached['meta']['teacher_feat'], cached['meta']['prototype']
    save_checkpoint(cached, path)
    assert prepared(small_data, tmp_path)[0].partitions() == mean.partitions()
    assert 'loaded from' in capsys.readouterr().out


def test_degenerate_is_one_group_per_class_at_every_distilled_stage():
    singletons = modulo_partition(10, 10)
    assert is_degenerate([singletons, singletons], 10)
    assert not is_degenerate([singletons, modulo_partition(10, 5)], 10)
    assert not is_degenerate([], 10)
    distiller = build()
    distiller.set_partitions([singletons, modulo_partition(10, 5), singletons])
    assert distiller.summary_extras() == {'tdd_groups': [10, 5, 10], 'tdd_degenerate': False}
    distiller.set_partitions([singletons] * 3)
    assert distiller.summary_extras() == {'tdd_groups': [10, 10, 10], 'tdd_degenerate': True}


@pytest.fixture(scope='module')
def digits_teacher(tmp_path_factory):
    """A random 10-class resnet14 checkpoint for the bundled digits set."""
    folder = tmp_path_factory.mktemp('tdd_digits') / 'resnet14_vanilla'
    folder.mkdir()
    torch.manual_seed(0)
    save_checkpoint({'model': create_model('resnet14', 10).state_dict()}, folder / 'ckpt_epoch_240.pth')
    return folder / 'ckpt_epoch_240.pth'


@pytest.mark.parametrize('threshold, warned', [(0.0, True), (1.0, False)])
def test_degenerate_trees_on_digits_print_a_warning(digits_teacher, tmp_path, capsys, threshold, warned):
    # threshold 0 splits every node: one group per class at every stage (what the trained digits
    # teacher gives at 0.2); threshold 1 keeps every impure node whole
    data = get_dataloaders('digits', str(tmp_path), batch_size=256, num_workers=0, mode='plain', download=False)
    teacher = create_model('resnet14', 10)
    teacher.load_state_dict(load_checkpoint(digits_teacher)['model'])
    opt = make_opt(path_t=str(digits_teacher), dataset='digits', tdd_knn=20, tdd_threshold=threshold)
    distiller = TDD(create_model('resnet8', 10), teacher, opt, data.info)
    distiller.prepare(data, device=torch.device('cpu'), cache_dir=str(tmp_path))
    err = capsys.readouterr().err
    groups = distiller.groups_per_stage()
    assert distiller.degenerate() is warned
    if warned:
        assert groups == [10, 10, 10]
        assert len(err.strip().splitlines()) == 1 and err.startswith('warning: TDD trees are degenerate')
    else:
        assert any(g < 10 for g in groups) and 'degenerate' not in err


# ------------------------------------------------------------------------- end to end
@pytest.fixture(scope='module')
def cli_data(data_dir, vanilla_teacher):
    return data_dir, vanilla_teacher('resnet14')


def run_cli(cli_data, save_dir, *extra):
    root, ckpt = cli_data
    return train_student.cli(['--path_t', str(ckpt), '--model_s', 'resnet8', '--data_folder', str(root),
                              '--save_dir', str(save_dir), '--tdd_knn', '3', *FAST, *extra])


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]


def test_tdd_one_epoch_end_to_end_then_resume_reloads_the_cache(cli_data, tmp_path, capsys):
    assert run_cli(cli_data, tmp_path, '--distill', 'tdd', '--epochs', '1') == 0
    assert 'built in' in capsys.readouterr().out
    run_dir = tmp_path / 'student_model' / 'S:resnet8_T:resnet14_cifar100_tdd_r:0.1_a:0.9_b:0.1_1'
    (record,) = read_metrics(run_dir)
    assert {'loss_ce', 'loss_kd', 'loss_tdd', 'tdd_groups_1', 'tdd_groups_2', 'tdd_groups_3'} <= set(record)
    (cache,) = (tmp_path / 'cache' / 'tdd').iterdir()
    groups = load_checkpoint(cache)['meta']['groups_per_stage']
    assert groups == [record[f'tdd_groups_{i}'] for i in (1, 2, 3)]
    # summary.json records the groups per stage and whether the trees were degenerate
    summary = json.loads((run_dir / 'summary.json').read_text())
    assert summary['tdd_groups'] == groups
    assert summary['tdd_degenerate'] == (groups == [100, 100, 100])
    # the saved student is the plain resnet8 (no heads)
    state = load_checkpoint(run_dir / 'ckpt_epoch_1.pth')['model']
    assert set(state) == set(create_model('resnet8', 100).state_dict())

    assert run_cli(cli_data, tmp_path, '--distill', 'tdd', '--epochs', '2', '--resume') == 0
    assert 'loaded from' in capsys.readouterr().out
    assert [r['epoch'] for r in read_metrics(run_dir)] == [1, 2]


def test_tdd_crd_one_epoch_end_to_end_with_crd_kd_default_weights(cli_data, tmp_path):
    assert run_cli(cli_data, tmp_path, '--distill', 'tdd_crd', '--epochs', '1', '--nce_k', '16') == 0
    run_dir = tmp_path / 'student_model' / 'S:resnet8_T:resnet14_cifar100_tdd_crd_r:1.0_a:1.0_b:0.1_1'
    (record,) = read_metrics(run_dir)
    assert {'loss_ce', 'loss_kd', 'loss_tdd', 'loss_crd', 'tdd_groups_3'} <= set(record)
    summary = json.loads((run_dir / 'summary.json').read_text())
    assert summary['distill'] == 'tdd_crd' and summary['params_deployed'] == 83_892   # plain resnet8
    # CRD+KD (RepDistiller's -r 1 -a 1, CRD 0.8) plus 0.1 x TDD, all recorded in args.json
    args = json.loads((run_dir / 'args.json').read_text())
    assert (args['gamma'], args['alpha'], args['beta'], args['crd_weight']) == (1.0, 1.0, 0.1, 0.8)
    assert (args['tdd_teacher_feat'], args['tdd_prototype']) == ('stage', 'mean')


def test_tdd_crd_on_tdds_own_base_is_reachable_with_flags(cli_data):
    root, ckpt = cli_data
    parser = train_student.get_args_parser()
    opt = train_student.resolve_options(parser.parse_args(['--path_t', str(ckpt), '--distill', 'tdd_crd']))
    assert (opt.gamma, opt.alpha, opt.beta, opt.crd_weight) == (1.0, 1.0, 0.1, 0.8)
    opt = parser.parse_args(['--path_t', str(ckpt), '--distill', 'tdd_crd', '-r', '0.1', '-a', '0.9', '-b', '0.1'])
    assert train_student.resolve_run_dir(opt).name.endswith('_tdd_crd_r:0.1_a:0.9_b:0.1_1')
    opt = train_student.resolve_options(parser.parse_args(['--path_t', str(ckpt), '--distill', 'tdd']))
    assert (opt.gamma, opt.alpha, opt.beta) == (0.1, 0.9, 0.1)                 # TDD itself is unchanged


def test_settings_pass_every_tdd_crd_weight_explicitly():
    from scripts.settings import METHODS
    flags = METHODS['TDD+CRD'].flags
    values = dict(zip(flags[::2], flags[1::2]))
    assert METHODS['TDD+CRD'].distill == 'tdd_crd'
    assert values == {'-r': '1', '-a': '1', '-b': '0.1', '--crd_weight': '0.8'}
    crd_kd = dict(zip(METHODS['CRD+KD'].flags[::2], METHODS['CRD+KD'].flags[1::2]))
    assert (values['-r'], values['-a'], values['--crd_weight']) == (crd_kd['-r'], crd_kd['-a'], crd_kd['-b'])


def test_compare_with_paper_marks_tdd_cells_with_degenerate_trees(tmp_path, capsys):
    save = tmp_path / 'save'
    common = dict(dataset='cifar100', model_t='resnet56', model_s='resnet20', best_acc=71.0)
    runs = [('tdd', 0.9, True, 70.0), ('tdd', 0.9, False, 71.0), ('tdd_crd', 1.0, False, 72.0), ('kd', 0.9, None, 70.5)]
    for i, (distill, alpha, degenerate, last) in enumerate(runs):
        folder = save / f'run{i}'
        folder.mkdir(parents=True)
        extra = {} if degenerate is None else {'tdd_degenerate': degenerate, 'tdd_groups': [100] * 3}
        (folder / 'summary.json').write_text(json.dumps(dict(common, distill=distill, alpha=alpha, last_acc=last,
                                                             **extra)))
    assert compare_with_paper.main([str(save), '--out', str(tmp_path / 'out')]) == 0
    out = capsys.readouterr().out
    assert '70.50 +- 0.71 (2) / 71.53 / -1.03 [degenerate trees 1/2]' in out       # TDD, published 71.53
    assert '**72.00 +- 0.00 (1) / 71.88 / +0.12**' in out                          # no mark on TDD+CRD
    assert out.count('[degenerate trees') == 2                                      # last- and best-epoch tables
    rows = {r['method']: r for r in csv.DictReader(open(tmp_path / 'out' / 'comparison.csv'))}
    assert (rows['TDD']['tdd_degenerate_runs'], rows['TDD+CRD']['tdd_degenerate_runs']) == ('1', '0')
