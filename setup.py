# Packaging for vlmkern: build_ext configures and runs CMake (+ Ninja) to produce vlmkern._C.
# It decides CPU-only vs CUDA, finds the CUDA toolkit and picks the architectures; CMake compiles.
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
VERSION = "0.1.0"


def log(msg: str) -> None:
    print(f"vlmkern build: {msg}", flush=True)


def find_cuda_home() -> Path | None:
    """CUDA_HOME / CUDA_PATH, else the toolkit behind `nvcc` (following wrapper scripts)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and (Path(os.environ[var]) / "bin" / "nvcc").exists():
            return Path(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        default = Path("/usr/local/cuda")
        return default if (default / "bin" / "nvcc").exists() else None
    nvcc_path = Path(nvcc).resolve()
    # Some machines put a small shell script on PATH that execs the real nvcc.
    try:
        head = nvcc_path.read_bytes()[:4096]
        if head.startswith(b"#!"):
            m = re.search(rb"(/\S+)/bin/nvcc", head)
            if m and (Path(m.group(1).decode()) / "bin" / "nvcc").exists():
                return Path(m.group(1).decode())
    except OSError:
        pass
    return nvcc_path.parent.parent


def cuda_archs() -> str:
    """VLMKERN_CUDA_ARCHS, else TORCH_CUDA_ARCH_LIST, else the visible GPU, else 9.0a+PTX."""
    for var in ("VLMKERN_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST"):
        if os.environ.get(var):
            return os.environ[var].replace(" ", ";")
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        suffix = "a" if major >= 9 else ""
        return f"{major}.{minor}{suffix}"
    return "9.0a+PTX"


def want_cuda() -> tuple[bool, str]:
    import torch

    flag = os.environ.get("VLMKERN_CUDA", "").strip().lower()
    if flag in ("0", "off", "false", "no"):
        return False, "VLMKERN_CUDA=0"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if find_cuda_home() is None:
        return False, "no nvcc found (set CUDA_HOME)"
    return True, ""


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch

        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        use_cuda, why_not = want_cuda()
        tag = "cuda" if use_cuda else "cpu"
        build_dir = Path(os.environ.get("VLMKERN_BUILD_DIR", ROOT / "build" / f"cmake-{tag}"))
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            "-G", "Ninja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('VLMKERN_BUILD_TYPE', 'Release')}",
            f"-DVLMKERN_VERSION={VERSION}",
            f"-DVLMKERN_CUDA={'ON' if use_cuda else 'OFF'}",
            f"-DVLMKERN_PTXAS_VERBOSE={'ON' if os.environ.get('VLMKERN_PTXAS_VERBOSE') else 'OFF'}",
        ]
        if use_cuda:
            cuda_home = find_cuda_home()
            archs = cuda_archs()
            args += [
                f"-DCMAKE_CUDA_COMPILER={cuda_home / 'bin' / 'nvcc'}",
                f"-DCUDAToolkit_ROOT={cuda_home}",
                f"-DVLMKERN_CUDA_ARCHS={archs}",
                # CUTLASS headers for the fused GEMMs: this root, else the nvidia-cutlass wheel of
                # the building interpreter (pip's isolated env has none: then no CUTLASS path).
                f"-DVLMKERN_CUTLASS_DIR={os.environ.get('VLMKERN_CUTLASS_DIR', '')}",
            ]
            log(f"CUDA kernels ON (torch {torch.__version__}, CUDA_HOME={cuda_home}, "
                f"archs {archs})")
        else:
            log(f"CPU-only build: CUDA kernels are NOT compiled ({why_not})")
        env = dict(os.environ, CUDA_HOME=str(find_cuda_home() or ""))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True, env=env)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True, env=env)


setup(
    version=VERSION,
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[CMakeExtension("vlmkern._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
