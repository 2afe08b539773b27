"""int8 and 16-bit wire compressions of CUDA tensors: quantised on the device, the same codes
and bound as on the CPU (needs only torch + numpy, so it runs on a bare GPU machine:
``python -m pytest -q tests/wire/test_quant_cuda.py``)."""

from __future__ import annotations

import pytest
import torch

from volunteer.wire import COMPRESSIONS, quant
from volunteer.wire.limits import WireLimits
from volunteer.wire.tensors import frames_to_tensors, tensor_to_frame

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_quantisation_gives_the_cpu_codes_within_the_bound() -> None:
    x = torch.randn(10_007) * torch.exp(torch.randn(10_007) * 4)
    on_gpu = quant.quantize(x.cuda())
    assert on_gpu.is_cpu
    on_cpu = quant.quantize(x)
    # absmax values are bit-identical; codes may differ by one where x / a * 127 sits on a tie
    assert torch.equal(on_gpu[: 4 * quant.n_blocks(x.numel(), quant.BLOCK)],
                       on_cpu[: 4 * quant.n_blocks(x.numel(), quant.BLOCK)])
    diff = (on_gpu.view(torch.int8).int() - on_cpu.view(torch.int8).int()).abs()
    assert int(diff.max()) <= 1
    got = quant.dequantize(memoryview(on_gpu.numpy()), x.numel(), quant.BLOCK).double()
    flat = torch.nn.functional.pad(x.double(), (0, (-x.numel()) % quant.BLOCK)).view(-1, quant.BLOCK)
    absmax = flat.abs().amax(1).repeat_interleave(quant.BLOCK)[: x.numel()]
    assert bool(((got - x.double()).abs() <= absmax / 254 * (1 + 2.0**-12) + 2.0**-149).all())


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_every_compression_of_a_cuda_tensor_decodes_on_the_host(compression: str | None) -> None:
    x = torch.randn(64, 256, device="cuda")
    spec, buf = tensor_to_frame(x, compression)
    (got,) = frames_to_tensors([spec], [memoryview(bytearray(buf))], WireLimits())
    assert got.device.type == "cpu" and got.dtype == torch.float32 and got.shape == x.shape
    assert torch.allclose(got, x.cpu(), atol=0.05 * float(x.abs().max()))
