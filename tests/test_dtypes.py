"""numpy dtype handling (the torch-free data plane): conversions bit-exact against torch, raw reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mergekit_sparse.storage import dtypes
from mergekit_sparse.storage.checkpoint import Checkpoint


def _torch_bits(t: torch.Tensor) -> np.ndarray:
    return (
        t.view({2: torch.int16, 4: torch.int32}[t.element_size()])
        .numpy()
        .view({2: np.uint16, 4: np.uint32}[t.element_size()])
    )


def _awkward_floats() -> np.ndarray:
    """Random bit patterns over every exponent, exact ties of both parities, and the edges."""
    g = np.random.default_rng(0)
    bits = g.integers(0, 2**32, 1 << 18, dtype=np.uint64).astype(np.uint32)
    ties = (bits[: 1 << 14] & 0xFFFF0000) | 0x8000  # exactly halfway: to even
    edges = np.array(
        [
            0.0,
            -0.0,
            np.inf,
            -np.inf,
            3.4028235e38,
            -3.4028235e38,
            1e-45,
            -1e-45,
            1.0,
            1.0000001,
            3.3961776e38,
            3.3961778e38,
        ],
        dtype=np.float32,
    ).view(np.uint32)  # around bf16's largest
    x = np.concatenate([bits, ties, edges]).view(np.float32)
    return x[~np.isnan(x)]


def test_bf16_narrowing_rounds_exactly_as_torch():
    x = _awkward_floats()
    want = _torch_bits(torch.from_numpy(x).to(torch.bfloat16))
    got = dtypes.from_float32(x, "BF16")
    assert got.dtype == np.uint16 and np.array_equal(got, want)
    assert np.array_equal(dtypes.from_float32(x, "BF16", finite=True)[np.isfinite(x)], want[np.isfinite(x)])
    two_d = x[:4096].reshape(64, 64)  # any shape, into a given buffer
    out = np.empty((64, 64), dtype=np.uint16)
    assert dtypes.from_float32(two_d, "BF16", out) is not None and np.array_equal(out.reshape(-1), want[:4096])


def test_bf16_nan_stays_nan():
    x = np.array([np.nan, 1.0, -np.nan], dtype=np.float32)
    back = dtypes.to_float32(dtypes.from_float32(x, "BF16"), "BF16")
    assert np.isnan(back[0]) and back[1] == 1.0 and np.isnan(back[2])


@pytest.mark.parametrize("code", ["BF16", "F16"])
def test_widening_every_16_bit_pattern_is_exact(code):
    raw = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    t = torch.from_numpy(raw.view(np.int16)).view(dtypes.torch_dtype(code)).float()
    got = dtypes.to_float32(raw.view(dtypes.storage(code)), code)
    nan = torch.isnan(t).numpy()
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), t.numpy()[~nan].view(np.uint32))


def test_f16_narrowing_matches_torch():
    x = _awkward_floats()
    want = torch.from_numpy(x).half().numpy()
    got = dtypes.from_float32(x, "F16")
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


def test_codes_from_torch_dtypes_and_names():
    assert dtypes.code_of(torch.bfloat16) == dtypes.code_of("bfloat16") == dtypes.code_of("BF16") == "BF16"
    assert dtypes.code_of(torch.float8_e4m3fn) == "F8_E4M3" and dtypes.name("F16") == "float16"
    with pytest.raises(ValueError, match="unsupported"):
        dtypes.code_of("complex64")


def test_raw_reads_equal_torch_reads_at_any_offset(tmp_path):
    """`array`/`float32` read the file itself (no torch); a 3-byte tensor first leaves the rest unaligned."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.u8": torch.randint(0, 9, (3,), generator=g, dtype=torch.uint8),
        "b.bf16": torch.randn(5, 7, generator=g).bfloat16(),
        "c.f32": torch.randn(11, generator=g),
        "d.f16": torch.randn(4, 4, generator=g).half(),
        "e.i64": torch.arange(6).view(2, 3),
    }
    save_file(tensors, tmp_path / "m.safetensors")
    ck = Checkpoint.open(tmp_path / "m.safetensors")
    for name, t in tensors.items():
        raw = ck.array(name)
        assert raw.shape == tuple(t.shape) and not raw.flags.writeable, name  # inputs cannot be modified
        want = t.contiguous().view(torch.uint8).numpy().reshape(-1)
        assert np.array_equal(raw.reshape(-1).view(np.uint8), want), name
        if t.is_floating_point():
            assert np.array_equal(ck.float32(name), t.float().reshape(-1).numpy()), name
            assert np.array_equal(ck.float32(name, 2, 5), t.float().reshape(-1)[2:5].numpy()), name
        assert torch.equal(ck.tensor(name), t), name  # one mapping serves both
    before = (tmp_path / "m.safetensors").read_bytes()
    ck.tensor("c.f32").add_(1)  # copy-on-write: the file is never written
    assert (tmp_path / "m.safetensors").read_bytes() == before
    assert torch.equal(Checkpoint.open(tmp_path / "m.safetensors").tensor("c.f32"), tensors["c.f32"])
