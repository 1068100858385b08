"""Tensor dtypes without torch: safetensors codes, numpy storage, float32 conversion.

The streaming data plane (reading checkpoints, selecting, fusing, writing) works on numpy arrays, so
a merge never imports torch (1.2-2 s of start-up on a small machine, a quarter of a 1 B-parameter
fusion). A dtype is its safetensors code ("BF16", "F32", ...). numpy has no bfloat16: BF16 data is
held as its uint16 bit patterns and converted here exactly as torch converts (widening is exact,
narrowing rounds to nearest, ties to even; a NaN stays a NaN). FP8 goes through torch (rare).
"""

from __future__ import annotations

import sys

import numpy as np

# code -> (numpy storage dtype, torch's name for it, floating point)
CODES: dict[str, tuple[type, str, bool]] = {
    "F64": (np.float64, "float64", True),
    "F32": (np.float32, "float32", True),
    "F16": (np.float16, "float16", True),
    "BF16": (np.uint16, "bfloat16", True),
    "I64": (np.int64, "int64", False),
    "I32": (np.int32, "int32", False),
    "I16": (np.int16, "int16", False),
    "I8": (np.int8, "int8", False),
    "U8": (np.uint8, "uint8", False),
    "BOOL": (np.bool_, "bool", False),
    "F8_E4M3": (np.uint8, "float8_e4m3fn", True),
    "F8_E5M2": (np.uint8, "float8_e5m2", True),
}
_BY_NAME = {name: code for code, (_, name, _) in CODES.items()}
_LITTLE = sys.byteorder == "little"


def code_of(dtype) -> str:
    """The safetensors code of a code, a torch dtype or torch's name for it ("bfloat16")."""
    text = dtype if isinstance(dtype, str) else str(dtype)
    if text in CODES:
        return text
    code = _BY_NAME.get(text.removeprefix("torch."))
    if code is None:
        raise ValueError(f"unsupported tensor dtype {dtype}")
    return code


def storage(code: str) -> np.dtype:
    """The numpy dtype holding `code`'s data (its bit patterns where numpy lacks the type)."""
    return np.dtype(CODES[code][0])


def itemsize(code: str) -> int:
    return storage(code).itemsize


def is_float(code: str) -> bool:
    return CODES[code][2]


def name(code: str) -> str:
    """torch's name of the dtype ("bfloat16"), as config.json and messages spell it."""
    return CODES[code][1]


def torch_dtype(code: str):
    import torch

    return getattr(torch, CODES[code][1])


def to_float32(raw: np.ndarray, code: str, out: np.ndarray | None = None) -> np.ndarray:
    """float32 values of `raw` (storage of `code`), written into `out` (same shape) when given."""
    if out is None:
        out = np.empty(raw.shape, dtype=np.float32)
    if code == "BF16":  # bf16 is the high half of a float32
        bits = out.view(np.uint32)
        bits[...] = raw
        np.left_shift(bits, 16, out=bits)
    elif code in ("F8_E4M3", "F8_E5M2"):
        import torch

        out[...] = torch.from_numpy(np.array(raw)).view(torch_dtype(code)).float().numpy()
    else:
        out[...] = raw
    return out


def from_float32(
    x: np.ndarray, code: str, out: np.ndarray | None = None, *, scratch: np.ndarray | None = None, finite: bool = False
) -> np.ndarray:
    """`x` (float32) as storage of `code`, rounded as torch rounds; `out`/`scratch` (uint32, x's size) are
    reused buffers when given. `finite`: the caller knows x holds no NaN (skips a scan for it)."""
    if out is None:
        out = np.empty(x.shape, dtype=storage(code))
    if code == "BF16":
        shape, x, out = out.shape, np.ascontiguousarray(x).reshape(-1), out.reshape(-1)
        bits = x.view(np.uint32)
        t = np.right_shift(bits, 16, out=scratch)  # round to nearest even: + 0x7FFF + (bit 16)
        np.bitwise_and(t, 1, out=t)
        np.add(t, 0x7FFF, out=t)
        np.add(t, bits, out=t)
        if _LITTLE:
            out[...] = t.view(np.uint16)[1::2]  # the high halves
        else:
            out[...] = np.right_shift(t, 16, out=t)
        if not finite:
            nan = np.isnan(x)
            if nan.any():
                out[nan] = 0x7FC0
        return out.reshape(shape)
    elif code in ("F8_E4M3", "F8_E5M2"):
        import torch

        out[...] = torch.from_numpy(np.array(x)).to(torch_dtype(code)).view(torch.uint8).numpy()
    else:
        with np.errstate(over="ignore"):  # beyond float16's range is ±Inf, as in torch
            out[...] = x
    return out


def convert(raw: np.ndarray, code: str, to: str) -> np.ndarray:
    """`raw` (storage of `code`) as storage of `to` (floating codes; the same array when they agree)."""
    if code == to:
        return raw
    return from_float32(to_float32(raw, code), to)
