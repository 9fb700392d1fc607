"""`--device auto|cpu|cuda|cuda:N[,cuda:M...]`: where calibration and verify compute.

The choice is made at plan time. Its `kind` ("cpu", or "cuda/<GPU model>") enters the keys of the
stages that compute on it (calibrate, verify) when it is not cpu: the same inputs give other bytes on
another kind of device, while the devices' count and indices never change the bytes (several devices
split the calibration batches and their statistics are reduced in batch order).

torch is imported only when a spec names CUDA (or auto): "cpu", the default, keeps a warm no-op
build off torch (inside functions, for that reason).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from recipe_runner.errors import UserError

if TYPE_CHECKING:
    import torch

ENV = "RECIPE_DEVICE"
CPU = "cpu"
DEFAULT = CPU  # without --device and RECIPE_DEVICE: today's CPU run (and no torch on the warm path)


@dataclass(frozen=True)
class CudaInfo:
    """What torch sees of CUDA: the one place the device module asks (tests replace `cuda_info`)."""

    count: int  # torch.cuda.device_count(), 0 when CUDA is unavailable
    names: tuple[str, ...]  # torch.cuda.get_device_name(i) for each index
    torch_version: str


def cuda_info() -> CudaInfo:
    import torch  # torch: only a spec naming CUDA (or auto) asks

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return CudaInfo(count, tuple(torch.cuda.get_device_name(i) for i in range(count)), torch.__version__)


@dataclass(frozen=True)
class DeviceChoice:
    """The devices a stage computes on ("cpu", "cuda:0", ...) and their kind, which enters keys."""

    names: tuple[str, ...]
    kind: str  # "cpu" or "cuda/<model>"
    spec: str = CPU  # as given (re-parsed by a worker process that rebuilds the plan)

    @property
    def is_cpu(self) -> bool:
        return self.kind == CPU

    @property
    def is_cuda(self) -> bool:
        return self.kind.startswith("cuda/")

    def key_param(self) -> dict[str, str]:
        """What enters a computing stage's params: nothing on CPU, so CPU keys stay as they were."""
        return {} if self.is_cpu else {"device": self.kind}

    def torch_devices(self) -> list["torch.device"]:
        import torch  # torch: the stage computing on the devices has it loaded already

        return [torch.device(n) for n in self.names]


CPU_CHOICE = DeviceChoice((CPU,), CPU)


def _bad(spec: str, why: str) -> UserError:
    return UserError(f"--device {spec}: {why}")


def parse_device(spec: str | None = None) -> DeviceChoice:
    """`spec`, else $RECIPE_DEVICE, else cpu; one clear UserError line for anything wrong."""
    given = spec if spec is not None else os.environ.get(ENV) or DEFAULT
    text = given.strip().lower()
    if text == CPU:
        return DeviceChoice((CPU,), CPU, given)
    if not text:
        raise _bad(given, "empty; use auto, cpu, cuda, cuda:N or a comma list cuda:0,cuda:1")
    info = cuda_info()
    if text == "auto":
        if not info.count:
            return DeviceChoice((CPU,), CPU, given)
        return _cuda_choice(given, list(range(info.count)), info)
    indices = [_cuda_index(given, part.strip(), info) for part in text.split(",")]
    if len(set(indices)) != len(indices):
        raise _bad(given, "names a device twice")
    return _cuda_choice(given, indices, info)


def _cuda_index(spec: str, part: str, info: CudaInfo) -> int:
    if part == CPU:
        raise _bad(spec, "cpu cannot be combined with CUDA devices; use --device cpu alone")
    if part != "cuda" and not (part.startswith("cuda:") and part[5:].isdigit()):
        raise _bad(spec, f"{part!r} is not a device; use auto, cpu, cuda, cuda:N or a comma list cuda:0,cuda:1")
    if not info.count:
        build = " is a CPU build" if "+cpu" in info.torch_version else ""
        raise _bad(spec, f"torch sees no CUDA device (torch {info.torch_version}{build}); use --device cpu or auto")
    index = 0 if part == "cuda" else int(part[5:])
    if index >= info.count:
        raise _bad(spec, f"torch sees {info.count} CUDA device(s) (cuda:0 to cuda:{info.count - 1}), "
                         f"not cuda:{index}")
    return index


def _cuda_choice(spec: str, indices: list[int], info: CudaInfo) -> DeviceChoice:
    models = sorted({info.names[i] for i in indices})
    if len(models) > 1:
        raise _bad(spec, f"the devices are of different models ({', '.join(models)}); results differ between "
                         "models, so give devices of one model")
    return DeviceChoice(tuple(f"cuda:{i}" for i in indices), f"cuda/{models[0]}", spec)
