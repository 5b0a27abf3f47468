"""The call an fx graph (``torch.fx.symbolic_trace``, timm's and torchvision's fx feature extractors) records for
one Batch Renorm layer."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from lightning_brn import functional


def batch_renorm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    schedule: Tensor,
    eps: float,
    microbatch_size: Optional[int],
    correction_stats: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    nonfinite_count: Optional[Tensor] = None,
) -> Tensor:
    """:func:`lightning_brn.functional.batch_renorm` with (rmax, dmax, momentum) read from a layer's ``_schedule``
    buffer each time the graph runs.

    The graph takes the buffer itself as an argument (a ``get_attr`` of the layer's ``_schedule``), not slices of it,
    which fx would record as tensor constants: persistent buffers of the graph's own, so that its state dict would
    not be the model's. The traced module shares the buffer with the layer, so it follows new values assigned to
    the layer, until the traced module is moved or cast (``.to(device)``, ``.half()``: fx's copy of the layer is a
    plain ``nn.Module``, which copies the buffer, and ``.half()`` rounds it to float16); trace again after that."""
    return functional.batch_renorm(
        input, running_mean, running_var, weight, bias, training, schedule[2:3], eps, schedule[0:1], schedule[1:2],
        microbatch_size, correction_stats, num_batches_tracked, nonfinite_count,
    )
