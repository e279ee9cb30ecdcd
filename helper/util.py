"""Small shared utilities: LR schedule, meters, accuracy, seeding, devices, checkpoint I/O."""
from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from helper.distributed import is_main
from helper.errors import UserError

def default_learning_rate(model_name: str) -> float:
    """The protocol's initial learning rate for a model: 0.01 for MobileNet/ShuffleNet, else 0.05."""
    from models import model_facts   # models import helper.errors only; kept local so helper stays light
    return 0.01 if model_facts(model_name).low_lr else 0.05


def parse_milestones(text: str) -> list[int]:
    """'150,180,210' -> [150, 180, 210]; raises UserError on anything else."""
    try:
        return [int(part) for part in text.split(',') if part.strip()]
    except ValueError:
        raise UserError(f"--lr_decay_epochs must be comma-separated integers, got {text!r}") from None


def lr_at_epoch(epoch: int, base_lr: float, milestones: Sequence[int], rate: float) -> float:
    """RepDistiller's step schedule: base_lr * rate ** (number of milestones m with epoch > m)."""
    steps = sum(epoch > m for m in milestones)
    return base_lr * rate ** steps


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group['lr'] = lr


def progress(iterable: Iterable, desc: str, total: int | None = None, enabled: bool | None = None) -> tqdm:
    """A tqdm bar on stderr; ``enabled=None`` shows it on a terminal only, so log files stay readable."""
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr,
                disable=None if enabled is None else not enabled)


class AverageMeter:
    """Sample-weighted running average (the epoch value is exact over the dataset)."""

    def __init__(self) -> None:
        self.sum = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.sum += float(value) * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / max(self.count, 1)


def accuracy(logits: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """Top-k accuracies in percent of a (B, num_classes) logit batch against (B,) labels."""
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices                       # (B, maxk)
    correct = pred.eq(target.view(-1, 1))                          # (B, maxk)
    return [correct[:, :min(k, maxk)].any(dim=1).float().mean().item() * 100.0 for k in topk]


def seed_from_trial(trial: str) -> int:
    """A default seed per trial id: the number itself, or a stable hash of a non-numeric id."""
    return int(trial) if trial.isdigit() else zlib.crc32(trial.encode()) % (2 ** 31)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA); optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def rng_state() -> dict[str, Any]:
    """Every global RNG state, in a form that loads with torch.load(weights_only=True)."""
    np_name, np_keys, np_pos, np_gauss, np_cached = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': (np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_gauss), float(np_cached)),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of rng_state(); expects CPU tensors (load the checkpoint with map_location='cpu').

    CUDA generators are restored when CUDA is available, one state per visible device (a run resumed
    with fewer visible GPUs than it was saved with restores the first ones).
    """
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    np_name, np_keys, np_pos, np_gauss, np_cached = state['numpy']
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_gauss, np_cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state['cuda'])[:torch.cuda.device_count()])


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available else cpu; 'cuda' without a GPU is a user error."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise UserError("--device cuda was given but no CUDA device is available (use --device cpu)")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return 'cpu'


def count_params(module: nn.Module) -> int:
    """Number of learnable parameters (BN affine included, buffers excluded)."""
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def count_macs(module: nn.Module, image_size: int) -> int:
    """Multiply-adds of one forward of a (1, 3, S, S) image (convolutions and matmuls; eval mode)."""
    from torch.utils.flop_counter import FlopCounterMode
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    with FlopCounterMode(display=False) as counter:
        module(torch.zeros(1, 3, image_size, image_size, device=device))
    module.train(was_training)
    return counter.get_total_flops() // 2


def git_sha() -> str:
    """The repository's commit, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def atomic_write_bytes(path: str | os.PathLike, writer) -> None:
    """Write a file through `writer(fileobj)` into a temp file beside it, then rename over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def to_cpu(obj: Any) -> Any:
    """A copy of ``obj`` with every tensor moved to the CPU, through nested dicts, lists and tuples.

    Containers keep their type and keys (an OrderedDict state_dict keeps its ``_metadata``); tensors
    already on the CPU are not copied; anything else is returned as is.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        out = copy.copy(obj)          # same class and instance attributes (state_dict._metadata)
        for key, value in obj.items():
            out[key] = to_cpu(value)
        return out
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        items = [to_cpu(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, '_fields') else type(obj)(items)
    return obj


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """torch.save of a CPU copy of ``obj``, atomically (a crash never leaves a half-written checkpoint).

    Every tensor (weights, optimizer state, RNG states) is written on the CPU, so the file loads with a
    plain ``torch.load`` on a machine without a GPU, as RepDistiller-style tools do.
    Under torchrun only rank 0 writes (helper/distributed.py); the other ranks return.
    """
    if not is_main():
        return
    cpu_obj = to_cpu(obj)
    atomic_write_bytes(path, lambda f: torch.save(cpu_obj, f))


def save_json(obj: Any, path: str | os.PathLike) -> None:
    """json.dump, atomically (under torchrun rank 0 only)."""
    if not is_main():
        return
    atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=2, default=str) + '\n').encode()))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = 'cpu',
                    trust: bool = False) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only) unless the user explicitly trusts the file.

    Raises UserError for a missing file, a file torch cannot read, or one that needs arbitrary
    pickled objects (then --trust_checkpoint is the way out).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=not trust)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        text = str(err)
        if not trust and 'Unsupported global' in text:
            what = text[text.index('Unsupported global'):].split(' was not')[0]
            raise UserError(f"{path} holds pickled Python objects ({what}) and is not loaded by default; "
                            "pass --trust_checkpoint if you trust its source") from None
        first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        raise UserError(f"cannot read checkpoint {path}: not a torch checkpoint or damaged ({first[:120]})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a checkpoint dictionary (got {type(ckpt).__name__})")
    return ckpt


def state_dict_from_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights of a RepDistiller-style checkpoint ({'model': state_dict, ...}) or a bare state_dict."""
    state = ckpt.get('model', ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} has no 'model' state_dict")
    # checkpoints saved from nn.DataParallel / DDP prefix every key with 'module.'
    if state and all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], model_name: str, path: str | os.PathLike) -> None:
    """Strict load_state_dict that reports an architecture mismatch as one readable line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)})")
        raise UserError(f"{path} does not match architecture {model_name}: " + '; '.join(parts)
                        + " (check --model_t / the folder name and the dataset's number of classes)")
    model.load_state_dict(state, strict=True)



def load_teacher(path: str | os.PathLike, model_name: str, num_classes: int, trust: bool = False,
                 dataset: str | None = None) -> nn.Module:
    """Build ``model_name`` (for ``dataset``) and load the checkpoint strictly (CPU map_location; weights_only
    unless trusted). ``path`` may be ``torchvision:<name>``: torchvision's ImageNet weights (helper/teachers.py)."""
    from helper.teachers import is_torchvision_teacher, load_torchvision_state_dict
    from models import create_model
    model = create_model(model_name, num_classes=num_classes, dataset=dataset)
    if is_torchvision_teacher(path):
        load_weights(model, load_torchvision_state_dict(str(path)), model_name, path)
        return model
    ckpt = load_checkpoint(path, map_location='cpu', trust=trust)
    load_weights(model, state_dict_from_checkpoint(ckpt, path), model_name, path)
    return model
