"""ImageNet models in the zoo (names resolved by data set, facts records), torchvision teachers by name
(loaded strictly, identified for the caches without downloading) and the Table-2 CLI end to end on
generated ImageNet folders. Nothing downloads: the weights loader is replaced by a random torchvision model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

import helper.teachers as teachers
import train_student
from helper.errors import UserError
from helper.letkd_offline import kd_sites
from helper.util import load_teacher
from models import create_model, model_facts
from models.mobilenetv1 import MobileNetV1
from models.resnet import ResNet as CifarResNet
from models.resnet_imagenet import ImageNetResNet
from models.resnetv2 import ResNet as CifarResNetV2
from tests.fixtures_data import write_imagenet_folders

TV = {'ResNet18': torchvision.models.resnet18, 'ResNet34': torchvision.models.resnet34,
      'ResNet50': torchvision.models.resnet50}


def fake_torchvision_loader(num_classes: int):
    """A stand-in for the download: the state_dict of a seeded, randomly initialised torchvision model."""
    def load(name: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(123)
        return TV[name](weights=None, num_classes=num_classes).state_dict()
    return load


def test_names_resolve_by_dataset() -> None:
    assert isinstance(create_model('ResNet50', 10), CifarResNetV2)            # RepDistiller's meaning kept
    assert isinstance(create_model('ResNet50', 10, dataset='cifar100'), CifarResNetV2)
    assert isinstance(create_model('ResNet50', 10, dataset='imagenet'), ImageNetResNet)
    assert isinstance(create_model('ResNet18', 10, dataset='imagenet'), ImageNetResNet)
    assert isinstance(create_model('MobileNetV1', 10, dataset='imagenet'), MobileNetV1)
    assert isinstance(create_model('resnet20', 10, dataset='imagenet'), CifarResNet)  # CIFAR names stay usable
    with pytest.raises(UserError, match='unknown model'):
        create_model('ResNet101', 10, dataset='imagenet')


@pytest.mark.parametrize('name,pooled,inter,family', [
    ('ResNet18', 'layer4', 'layer4.0', 'imagenet_resnet'), ('ResNet34', 'layer4', 'layer4.0', 'imagenet_resnet'),
    ('ResNet50', 'layer4', 'layer4.0', 'imagenet_resnet'), ('MobileNetV1', 'model.13', 'model.12', 'imagenet_mobilenet')])
def test_imagenet_facts(name: str, pooled: str, inter: str, family: str) -> None:
    facts = model_facts(name, 'imagenet')
    assert (facts.classifier, facts.pooled_map.module, facts.last_stage_first_block.module) == ('fc', pooled, inter)
    assert facts.family == family and not facts.low_lr
    model = facts.build(num_classes=7).eval()
    # the pooled map is what the classifier reads: fc(mean(map)) == logits
    with torch.no_grad(), __import__('models').tap(model, {'map': facts.pooled_map}) as maps:
        logits = model(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(model.fc(maps['map'].mean((2, 3))), logits)
    assert kd_sites(name, dataset='imagenet')['penult'].module == pooled
    assert model_facts('ResNet50').family == 'resnetv2'


def test_torchvision_teacher_loads_strictly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(teachers, 'state_dict_loader', fake_torchvision_loader(5))
    model = load_teacher('torchvision:ResNet34', 'ResNet34', 5, dataset='imagenet')
    expected = fake_torchvision_loader(5)('ResNet34')
    assert set(model.state_dict()) == set(expected)
    for key, value in expected.items():
        assert torch.equal(model.state_dict()[key], value), key
    # the wrong number of classes is one readable error, not a traceback
    with pytest.raises(UserError, match='shape mismatches'):
        load_teacher('torchvision:ResNet34', 'ResNet34', 1000, dataset='imagenet')
    with pytest.raises(UserError, match='no torchvision weights'):
        load_teacher('torchvision:VGG16', 'ResNet34', 5, dataset='imagenet')


def test_torchvision_teacher_identity_needs_no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(name: str) -> dict:
        raise AssertionError('downloaded')
    monkeypatch.setattr(teachers, 'state_dict_loader', refuse)
    ids = {name: teachers.teacher_identity(f'torchvision:{name}') for name in teachers.TORCHVISION_WEIGHTS}
    assert len(set(ids.values())) == 3 and all(len(v) == 64 for v in ids.values())
    assert ids['ResNet34'] == teachers.teacher_identity('torchvision:ResNet34')
    # V1, not torchvision's DEFAULT (V2 for ResNet50: 80.86 top-1, not Table 2's 76.13)
    assert 'resnet50-0676ba61' in teachers.torchvision_weights('ResNet50').url


def test_real_loader_is_weights_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The download path asks torch hub for a hash-checked, weights_only load on the CPU."""
    seen: dict = {}

    def fake_hub(url: str, **kwargs) -> dict:
        seen.update(kwargs, url=url)
        return {}
    monkeypatch.setattr(torchvision.models._api, 'load_state_dict_from_url', fake_hub)
    teachers._download_state_dict('ResNet34')
    assert seen['weights_only'] is True and seen['check_hash'] is True and seen['map_location'] == 'cpu'
    assert seen['url'].endswith('resnet34-b627a593.pth')


def test_table2_letkd2_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train_student.py --dataset imagenet --model_s ResNet18 --path_t torchvision:ResNet34 --distill letkd2."""
    torch.set_num_threads(1)
    write_imagenet_folders(tmp_path / 'data', num_classes=3, n_per_class=3, size=40)
    monkeypatch.setattr(teachers, 'state_dict_loader', fake_torchvision_loader(3))
    save = tmp_path / 'save'
    argv = ['--dataset', 'imagenet', '--model_s', 'ResNet18', '--path_t', 'torchvision:ResNet34', '--distill', 'letkd2',
            '--data_folder', str(tmp_path / 'data'), '--save_dir', str(save), '--crop_size', '32', '--epochs', '1',
            '--batch_size', '3', '--num_workers', '0', '--k_penult', '4', '--k_inter', '2', '--device', 'cpu']
    assert train_student.cli(argv) == 0
    run = next((save / 'student_model').iterdir())
    assert run.name.startswith('S:ResNet18_T:ResNet34_imagenet_letkd2')
    summary = json.loads((run / 'summary.json').read_text())
    assert summary['model_t'] == 'ResNet34' and summary['epochs'] == 1
    args = json.loads((run / 'args.json').read_text())
    assert args['path_t'] == 'torchvision:ResNet34' and args['crop_size'] == 32
    spec = torch.load(run / 'last.pth', weights_only=True)['deploy']
    assert spec['dataset'] == 'imagenet'
    assert any((save / 'cache' / 'letkd').glob('*.pth'))
    # a torchvision teacher needs ImageNet
    bad = [a if a != 'imagenet' else 'cifar100' for a in argv if a not in ('--crop_size', '32')]
    with pytest.raises(UserError, match='--dataset imagenet'):
        train_student.main(train_student.get_args_parser().parse_args(bad))
