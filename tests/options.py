"""The one way tests build a method's options: through train_student.py's real parser and resolver.

    opt = student_options('letkd2', model_s='resnet8', model_t='resnet14', k_penult=16)
    distiller = build_distiller('letkd2', student, teacher, opt, data_info(num_classes=100))

``values`` replace parsed flags (as Python values, before resolution, so the method's published
weights and per-pair defaults are resolved as on the command line); a name that is not a flag of
train_student.py is an error, so a typo cannot pass silently. The data's facts are not options:
``data_info`` builds them.
"""
from __future__ import annotations

from typing import Any

import train_student
from dataset import DataInfo
from helper.options import ResolvedOptions, updated


def student_options(distill: str = 'kd', **values: Any) -> ResolvedOptions:
    """train_student.py's resolved (read-only) options for ``--distill distill`` with ``values`` set."""
    parsed = train_student.get_args_parser().parse_args(['--distill', distill])
    unknown = sorted(set(values) - set(vars(parsed)))
    if unknown:
        raise KeyError(f"not flags of train_student.py: {unknown}")
    return train_student.resolve_options(updated(parsed, **values))


def data_info(num_classes: int = 100, n_data: int = 32, image_size: int = 32) -> DataInfo:
    """The facts of a (made-up) data set: classes, training images, image side."""
    return DataInfo(num_classes=num_classes, n_data=n_data, image_size=image_size)
