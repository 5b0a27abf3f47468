"""Model surgery: batchnorm <-> Batch Renorm. (Being written; see issue 3.)"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["convert_model", "revert_model"]


def convert_model(model: nn.Module, **kwargs: Any) -> nn.Module:
    raise NotImplementedError


def revert_model(model: nn.Module) -> nn.Module:
    raise NotImplementedError
