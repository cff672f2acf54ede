"""Bitmap storage of sparse matrices and the sparse-base linears that run from it.

docs/methods.md §6.3, §6.4 items 5-6.

Format (ours, docs/methods.md §6.4 item 6) for a ``(d_out, d_in)`` matrix ``W``:

- ``mask``: uint8 ``(d_out, ceil(d_in / 8))``; bit ``k`` (LSB first) of byte ``b`` of row ``i`` is set
  when ``W[i, 8b + k]`` is stored; the tail bits past ``d_in`` are zero.
- ``values``: the stored entries, row-major, in ``W``'s dtype, shape ``(nnz,)``.
- ``row_offsets``: int64 ``(d_out + 1,)``, prefix sums of the per-row counts (row ``i``'s values are
  ``values[row_offsets[i]:row_offsets[i + 1]]``), so rows or tiles can be decoded in parallel.

An entry is stored when its *bit pattern* is non-zero: ``+0.0`` is absent and decodes to ``+0.0``, while
``-0.0`` (never produced by ``prune_``) is kept as a value, so ``decode(encode(W))`` is bit-identical for
every input. Everything is vectorised torch (shifts and boolean indexing), on CPU or CUDA.

Linears behind one interface (``forward(x) = x Wᵀ + b``; ``in_features``, ``out_features``):
``nn.Linear`` holding the masked dense weight (the training reference), ``BitmapLinear`` (decode then
``F.linear``, the correctness reference for a fused kernel, docs/methods.md §8 item 25) and
``SemiStructuredLinear`` (PyTorch's 2:4 kernels, CUDA only); ``prunedlora.pruning.fused_bitmap`` adds the
fused kernel's linear and the ``base_format`` choice among them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
BITMAP_FORMAT = "prunedlora-bitmap-v1"
_SUFFIXES = (".mask", ".values", ".row_offsets")


@dataclass
class BitmapTensor:
    """One matrix in bitmap form (see the module docstring for the layout)."""

    mask: torch.Tensor  # uint8 (d_out, ceil(d_in / 8))
    values: torch.Tensor  # (nnz,), the matrix dtype
    row_offsets: torch.Tensor  # int64 (d_out + 1,)
    shape: tuple[int, int]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def storage(self) -> dict[str, float]:
        """Bytes of the dense matrix and of each part of the bitmap form, and their ratio."""
        dense = self.shape[0] * self.shape[1] * self.values.element_size()
        mask = self.mask.numel()
        values = self.values.numel() * self.values.element_size()
        offsets = self.row_offsets.numel() * self.row_offsets.element_size()
        total = mask + values + offsets
        numel = self.shape[0] * self.shape[1]
        return {"bytes_dense": dense, "bytes_mask": mask, "bytes_values": values, "bytes_offsets": offsets,
                "bytes_bitmap": total, "ratio": total / dense, "sparsity": 1.0 - self.nnz / numel}


# ------------------------------------------------------------------------------------- encode/decode
def present(weight: torch.Tensor) -> torch.Tensor:
    """Entries that are stored: non-zero bit pattern (``+0.0`` is absent, ``-0.0`` is not)."""
    return weight.contiguous().view(_INT_VIEW[weight.element_size()]) != 0


def _bit_weights(device: torch.device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)  # bit k of a byte <-> column 8b + k


def encode(weight: torch.Tensor) -> BitmapTensor:
    """Bitmap form of a 2-D ``weight`` (any float dtype, any ``d_in``)."""
    if weight.dim() != 2:
        raise ValueError(f"bitmap encoding takes a 2-D matrix, got shape {tuple(weight.shape)}")
    weight = weight.detach()
    d_out, d_in = weight.shape
    keep = present(weight)  # (d_out, d_in)
    padded = F.pad(keep, (0, 8 * math.ceil(d_in / 8) - d_in)).to(torch.uint8)  # zero tail bits
    bytes_ = (padded.view(d_out, -1, 8) << _bit_weights(weight.device)).sum(-1, dtype=torch.uint8)  # (d_out, nb)
    counts = keep.sum(1)  # (d_out,)
    offsets = torch.zeros(d_out + 1, dtype=torch.int64, device=weight.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return BitmapTensor(mask=bytes_, values=weight[keep], row_offsets=offsets, shape=(d_out, d_in))


def unpack_mask(mask: torch.Tensor, d_in: int) -> torch.Tensor:
    """bool ``(d_out, d_in)`` presence map from the mask bytes."""
    bits = (mask.unsqueeze(-1) >> _bit_weights(mask.device)) & 1  # (d_out, nb, 8)
    return bits.view(mask.shape[0], -1)[:, :d_in].bool()


def decode(bitmap: BitmapTensor) -> torch.Tensor:
    """The dense matrix back, bit-identical to what ``encode`` was given."""
    keep = unpack_mask(bitmap.mask, bitmap.shape[1])
    dense = torch.zeros(bitmap.shape, dtype=bitmap.dtype, device=bitmap.values.device)
    # masked_scatter_ fills the kept positions row-major, as encode's boolean read took them (and is ~2x
    # faster on CPU than a boolean index assignment).
    return dense.masked_scatter_(keep, bitmap.values)


def check(bitmap: BitmapTensor) -> None:
    """Consistency of mask, values and offsets (for data read from disk).

    Raises:
        ValueError: naming the first inconsistency.
    """
    d_out, d_in = bitmap.shape
    if tuple(bitmap.mask.shape) != (d_out, math.ceil(d_in / 8)) or bitmap.mask.dtype != torch.uint8:
        raise ValueError(f"mask has shape {tuple(bitmap.mask.shape)}/{bitmap.mask.dtype}, expected "
                         f"({d_out}, {math.ceil(d_in / 8)})/uint8")
    if d_in % 8 and int(bitmap.mask[:, -1].bitwise_right_shift(d_in % 8).count_nonzero()):
        raise ValueError(f"mask bits past column {d_in} are set (they must be zero)")
    counts = unpack_mask(bitmap.mask, d_in).sum(1)
    if bitmap.row_offsets.numel() != d_out + 1 or not torch.equal(bitmap.row_offsets.diff(), counts):
        raise ValueError("row_offsets do not match the per-row counts of the mask")
    if int(bitmap.row_offsets[-1]) != bitmap.nnz:
        raise ValueError(f"the mask marks {int(bitmap.row_offsets[-1])} entries but {bitmap.nnz} values are stored")


# ------------------------------------------------------------------------------------------ reports
def size_report(bitmaps: dict[str, BitmapTensor]) -> dict[str, object]:
    """Per-matrix and total storage: dense, mask, value and offset bytes, and the bitmap/dense ratio."""
    per_matrix = {name: b.storage() for name, b in bitmaps.items()}
    keys = ("bytes_dense", "bytes_mask", "bytes_values", "bytes_offsets", "bytes_bitmap")
    total: dict[str, float] = {k: sum(m[k] for m in per_matrix.values()) for k in keys}
    total["ratio"] = total["bytes_bitmap"] / total["bytes_dense"] if total["bytes_dense"] else 1.0
    numel = sum(b.shape[0] * b.shape[1] for b in bitmaps.values())
    total["sparsity"] = 1.0 - sum(b.nnz for b in bitmaps.values()) / numel if numel else 0.0
    return {"format": BITMAP_FORMAT, "total": total, "matrices": per_matrix}


# ------------------------------------------------------------------------------------------- on disk
def save_bitmaps(path: Path, bitmaps: dict[str, BitmapTensor], dense: dict[str, torch.Tensor]) -> None:
    """One safetensors file: ``<name>.mask|.values|.row_offsets`` per matrix, other tensors as they are.

    Shapes and dtypes go to the file's metadata (``prunedlora_bitmap``), so the file alone rebuilds every
    tensor of the model.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in dense.items()}
    meta = {}
    for name, b in bitmaps.items():
        for suffix, t in zip(_SUFFIXES, (b.mask, b.values, b.row_offsets), strict=True):
            tensors[name + suffix] = t.contiguous().cpu()
        meta[name] = {"shape": list(b.shape), "dtype": _DTYPE_NAMES[b.dtype]}
    header = {"format": "pt", "prunedlora_format": BITMAP_FORMAT, "prunedlora_bitmap": json.dumps(meta)}
    save_file(tensors, str(path), metadata=header)


def load_bitmaps(path: Path) -> tuple[dict[str, BitmapTensor], dict[str, torch.Tensor]]:
    """Read what ``save_bitmaps`` wrote: ``(bitmaps, dense tensors)``, checked for consistency.

    Raises:
        ValueError: when the file is not in this format or a matrix is inconsistent.
    """
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        if header.get("prunedlora_format") != BITMAP_FORMAT:
            raise ValueError(f"{path} is not a {BITMAP_FORMAT} file (metadata {sorted(header)})")
        meta = json.loads(header["prunedlora_bitmap"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    bitmaps = {}
    for name, info in meta.items():
        mask, values, offsets = (tensors.pop(name + s) for s in _SUFFIXES)
        if values.dtype != _DTYPES[info["dtype"]]:
            raise ValueError(f"{name}: values are {values.dtype}, metadata says {info['dtype']}")
        bitmaps[name] = BitmapTensor(mask, values, offsets, tuple(info["shape"]))
        check(bitmaps[name])
    return bitmaps, tensors


# ------------------------------------------------------------------------------------------ linears
def _frozen(t: torch.Tensor) -> nn.Parameter:
    # Frozen parameters, not buffers: they move with .to(), sit in state_dict(), and stay out of
    # checkpoints (prunedlora.train.checkpoint saves trainable parameters and our modules' buffers only).
    return nn.Parameter(t, requires_grad=False)


class BitmapLinear(nn.Module):
    """Reference sparse linear: decode the bitmap to a dense weight, then ``F.linear`` (docs/methods.md §6.4 item 5).

    Holds only the bitmap form (``mask``, ``values``, ``row_offsets``) and the bias; the dense weight is a
    temporary of each forward. Gradients flow to the input (the weight is frozen).
    """

    def __init__(self, bitmap: BitmapTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = bitmap.shape
        self.mask = _frozen(bitmap.mask)
        self.values = _frozen(bitmap.values)
        self.row_offsets = _frozen(bitmap.row_offsets)
        self.bias = None if bias is None else _frozen(bias.detach())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BitmapLinear:
        return cls(encode(linear.weight), linear.bias)

    def bitmap(self) -> BitmapTensor:
        return BitmapTensor(self.mask.data, self.values.data, self.row_offsets.data,
                            (self.out_features, self.in_features))

    def dense_weight(self) -> torch.Tensor:
        return decode(self.bitmap())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the decoded weight (for ``save_pretrained``)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.values.device, dtype=self.values.dtype)
        linear.weight = _frozen(self.dense_weight())
        if self.bias is not None:
            linear.bias = _frozen(self.bias.data)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.values.numel()}"


def semi_structured_available(device: torch.device | str) -> str | None:
    """``None`` when PyTorch's 2:4 kernels can run on ``device``, else the reason they cannot."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return "2:4 semi-structured kernels need a CUDA device"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    major, _ = torch.cuda.get_device_capability(torch.device(device))
    if major < 8:
        return "2:4 semi-structured kernels need compute capability >= 8.0 (Ampere or newer)"
    return None


class SemiStructuredLinear(nn.Module):
    """A 2:4-sparse linear on PyTorch's semi-structured tensors (cuSPARSELt or CUTLASS; CUDA only).

    Raises:
        RuntimeError: off CUDA, or when the weight is not 2:4 sparse / not a supported shape and dtype.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        reason = semi_structured_available(linear.weight.device)
        if reason is not None:
            raise RuntimeError(reason)
        self.out_features, self.in_features = linear.weight.shape
        weight = linear.weight.detach()
        groups = (weight.view(self.out_features, -1, 4) != 0).sum(-1)
        if int(groups.max()) > 2:
            raise RuntimeError("the weight is not 2:4 sparse; prune it with method.pattern=2:4 first")
        self.weight = _frozen(torch.sparse.to_sparse_semi_structured(weight))
        self.bias = None if linear.bias is None else _frozen(linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # the semi-structured kernels take 2-D inputs
        return F.linear(flat, self.weight, self.bias).reshape(*x.shape[:-1], self.out_features)
