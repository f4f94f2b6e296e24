"""The condensed layout: inference for constant fan-in layers on the CPU.

A layer in which every output unit has the same number ``k`` of active inputs
(:class:`~sparsetorch.structure.ConstantFanIn`) is stored as two
``(out, k)`` matrices: for each output unit, the positions of its ``k`` inputs
and their values. The forward gathers each unit's inputs and takes ``k``-long
dot products::

    y[b, o] = bias[o] + sum_j values[o, j] * x[b, indices[o, j]]

A batch is one ``F.embedding_bag`` over the rows of ``x^T`` with the values as
per-sample weights: a fused gather-multiply-add kernel, each gather a row of
``batch`` contiguous inputs. A single input row runs PyTorch's CSR
matrix-vector kernel on the same two arrays (the constant fan-in makes the row
offsets ``0, k, 2k, ...``, so they are not stored): one fused pass, where a
gather followed by a product and a sum would take three. This is
SRigL's condensed representation (Lasby et al. 2023,
https://arxiv.org/abs/2305.02299, section 5): ``k * out`` multiply-adds
instead of ``in * out``, with no per-row offsets to read as CSR needs. Rows of
unequal counts (an unstructured layer, or rows ablated by SRigL's neuron
ablation) are padded to the longest row with zero values, so any layer can be
condensed; it pays off when rows are equal. See ``docs/sparse_execution.md``
for its speed against dense and CSR.
"""

from __future__ import annotations

import warnings
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["CondensedLinear"]


class CondensedLinear(nn.Module):
    """An inference ``nn.Linear`` stored as per-row input indices and values.

    Made by :func:`sparsetorch.export_sparse` with ``execution="condensed"``.
    ``indices`` and ``values`` are ``(out_features, k)`` buffers, ``k`` the
    largest number of active weights in a row (rows with fewer are padded with
    zero values). Gradients flow to the input only.

    Args:
        weight: dense ``(out_features, in_features)`` weight.
        bias: ``(out_features,)`` bias, or ``None``.
        mask: bool mask of ``weight``'s shape naming the active weights.
            Default: ``None`` (the nonzeros of ``weight``).

    Example::

        >>> w = torch.tensor([[0.0, 2.0, 1.0], [1.0, 0.0, 3.0]])
        >>> layer = CondensedLinear(w, torch.tensor([0.5, 0.0]))
        >>> layer
        CondensedLinear(in_features=3, out_features=2, fan_in=2, bias=True)
        >>> layer.indices
        tensor([[1, 2],
                [0, 2]], dtype=torch.int32)
        >>> layer(torch.tensor([[1.0, 3.0, 2.0]]))
        tensor([[8.5000, 7.0000]])
    """

    indices: Tensor
    values: Tensor
    bias: Tensor | None

    def __init__(
        self, weight: Tensor, bias: Tensor | None, mask: Tensor | None = None
    ) -> None:
        super().__init__()
        if weight.dim() != 2 or weight.layout != torch.strided:
            raise ValueError(
                "CondensedLinear needs a dense 2-D weight, got shape "
                f"{tuple(weight.shape)} and layout {weight.layout}."
            )
        weight = weight.detach()
        active = weight != 0 if mask is None else mask.to(weight.device, torch.bool)
        if active.shape != weight.shape:
            raise ValueError(
                f"mask has shape {tuple(active.shape)}, weight {tuple(weight.shape)}."
            )
        self.out_features, self.in_features = weight.shape
        k = max(1, int(active.sum(1).max())) if active.numel() else 1
        # Active positions first in each row, in ascending order (a stable
        # sort of the descending mask), then padding.
        order = active.to(torch.uint8).argsort(dim=1, descending=True, stable=True)
        indices = order[:, :k]
        values = weight.gather(1, indices) * active.gather(1, indices)
        index_dtype = torch.int32 if self.in_features < 2**31 else torch.int64
        self.register_buffer("indices", indices.to(index_dtype).contiguous())
        self.register_buffer("values", values.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def fan_in(self) -> int:
        """``k``: the inputs each output unit reads."""
        return int(self.indices.shape[1])

    def forward(self, input: Tensor) -> Tensor:
        x = input.reshape(-1, self.in_features)  # (rows, in)
        if x.shape[0] == 1:  # online inference: the k-long dot products, fused
            out, k = self.values.shape
            crow = torch.arange(
                0, out * k + 1, k, dtype=self.indices.dtype, device=x.device
            )  # constant fan-in: row offsets without storing them
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Sparse CSR tensor support")
                weight = torch.sparse_csr_tensor(
                    crow,
                    self.indices.view(-1),
                    self.values.view(-1),
                    (out, self.in_features),
                    check_invariants=False,  # built from a valid layout
                )
            y = cast(Tensor, torch.sparse.mm(weight, x.t())).t()  # (1, out)
        else:  # a batch: each unit sums k weighted rows of x^T in one fused kernel
            y = F.embedding_bag(
                self.indices,
                x.t().contiguous(),  # (in, rows)
                per_sample_weights=self.values,
                mode="sum",
            ).t()  # (rows, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*input.shape[:-1], self.out_features)

    def dense_weight(self) -> Tensor:
        """The ``(out_features, in_features)`` weight this layer computes with."""
        weight = self.values.new_zeros(self.out_features, self.in_features)
        return weight.scatter_add_(1, self.indices.long(), self.values)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"fan_in={self.fan_in}, bias={self.bias is not None}"
        )
