"""
The command line of train.py and sample.py: one way to turn flags into settings, one way to fail, what "auto" means
for precision and torch.compile on each device (auto_precision, auto_compile), and the C heap setting their CPU runs
use (keep_freed_memory).

A setting the user can fix ends in ONE line that names the flag, the value given and what is accepted, before anything
heavy runs, and never in a traceback:

    train.py: error: --precision fp8: choose one of auto, fp32, bf16, fp16

    parser = settings_parser(Settings, PRESETS, "what the script does")  # a flag per field, its comment as help
    run("train.py", lambda: main(...))            # UsageError / LoadError -> that one line, exit code 1
"""
import argparse
import contextlib
import ctypes
import dataclasses
import importlib.util
import inspect
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

YES, NO = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class UsageError(ValueError):
    """Bad input the user can fix: a setting, a prompt file, a missing download. Reported as one line."""


def need(ok, flag, value, accepted):
    """Stop with '--flag value: accepted' unless ok."""
    if not ok:
        raise UsageError(f"--{flag.replace('_', '-')} {value}: {accepted}")


def check_device(device, flag="device"):
    """auto, cpu, cuda or cuda:N, and the GPU must exist."""
    need(re.fullmatch(r"auto|cpu|cuda(:\d+)?", device), flag, device, "choose auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch
        n, index = torch.cuda.device_count(), int(device.split(":")[1]) if ":" in device else 0
        need(index < n, flag, device, f"no such GPU: this machine has {n} CUDA device(s)" + " (use cpu)" * (n == 0))


def gpu_generation(device):
    """The compute capability's major version of a CUDA device (7 for a V100 or T4, 8 for an A100 or RTX 30xx, 9 for
    an H100); 0 for a CPU."""
    import torch
    device = torch.device(device)
    return torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0


def auto_precision(device):
    """What --precision auto means: fp32 on a CPU; on a GPU bf16 from compute capability 8 (Ampere) on, fp16 before it
    (V100, T4: fp16 tensor cores only, and torch.compile's bf16 kernels fail to build there), as the authors trained."""
    major = gpu_generation(device)
    return "fp32" if major == 0 else "bf16" if major >= 8 else "fp16"


def torch_dtype(precision):
    """"fp32", "bf16" or "fp16" -> the torch dtype."""
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast_to(device, precision):
    """The context train.py, sample.py and the bench run the models in: torch.autocast to `precision` on `device`, or
    one that does nothing for fp32."""
    import torch
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, torch_dtype(precision))


def compile_blocker(device):
    """Why torch.compile cannot build kernels on this device, or None. On a GPU its compiler, Triton, needs compute
    capability 7 (a V100 on), is a package of its own (torch's Linux CUDA wheels bring it, its Windows wheels do not),
    and builds each kernel's launcher with a C compiler: $CC, else gcc, else clang. On a CPU, inductor writes C++ and
    builds it with $CXX, else g++ (clang++ on a Mac). Slim container images often have neither compiler."""
    major = gpu_generation(device)
    if major == 0:
        cxx = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")
        if sys.platform != "win32" and not shutil.which(cxx):  # on Windows, MSVC: found its own way
            return f"torch.compile builds C++ for the CPU with {cxx} ($CXX), which is not installed here (install g++)"
        return None
    if major < 7:
        return f"torch.compile's GPU compiler (Triton) needs compute capability 7 or more (a V100 on); this GPU has " \
               f"{major}"
    if importlib.util.find_spec("triton") is None:
        return "torch.compile's GPU compiler, Triton, is not installed here (torch's Linux CUDA wheels bring it)"
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        return "torch.compile's GPU compiler, Triton, needs a C compiler (install gcc) to build its kernel " \
               "launchers, and finds none here ($CC, gcc, clang)"
    return None


def auto_compile(device):
    """What --compile auto means: on for a GPU that torch.compile can build for, off on a CPU."""
    return gpu_generation(device) > 0 and compile_blocker(device) is None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # what PIL writes here without a plugin


def check_output(path, flag, suffixes=None):
    """An output written at the end of a run, checked before the work so that it is not lost: a file ending in one of
    `suffixes` (a folder when None) under a folder that exists or can be made, and is writable. Leaves nothing behind."""
    path = Path(path)
    if suffixes:
        need(path.suffix.lower() in suffixes, flag, path, f"must end in {', '.join(suffixes)}")
        need(not path.is_dir(), flag, path, "is a folder: give a file name")
    else:
        need(path.is_dir() or not path.exists(), flag, path, "is a file: give a folder")
    folder = path.parent if suffixes else path
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # "." or "/" at the latest
    need(existing.is_dir(), flag, path, f"{existing} is a file, not a folder")
    try:  # a real write: os.access says yes to root even where nothing can be written (/proc, a read-only mount)
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        need(False, flag, path, f"cannot write into {existing} ({e.strerror}); choose another place")


def yes_no(text):
    if text.lower() not in YES + NO:
        raise argparse.ArgumentTypeError(f"{text}: say one of {', '.join(YES)} or {', '.join(NO)}")
    return text.lower() in YES


def number(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: expected {'a whole number' if kind is int else 'a number'}")
        if kind is float and not math.isfinite(value):  # inf, nan, 1e400: checks like `>= 0` pass them, or fail oddly
            raise argparse.ArgumentTypeError(f"{text}: expected a finite number")
        return value
    return parse


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block and exit code 2
        # argparse names a flag by all its spellings, "--kl-coef/--kl_coef": the first is the one to show
        raise UsageError(re.sub(r"(--[\w-]+)(/--\w+)+", r"\1", message.replace("argument ", "")))


def settings_parser(cls, presets, description):
    """A flag for every field of the dataclass `cls` (--out-dir and --out_dir alike), with the field's comment in the
    source as its help and each preset's value as its default. Every default is None: 'not given'."""
    comments = dict(re.findall(r"^    (\w+): \w+ = .*?# (.*)$", inspect.getsource(cls), re.M))
    parser = Parser(description=description)
    for f in dataclasses.fields(cls):
        defaults = ", ".join(f"{p} {values.get(f.name, f.default)!r}" for p, values in presets.items()) \
            if f.name != "preset" else repr(f.default)
        kind = yes_no if f.type is bool else number(f.type) if f.type in (int, float) else str
        parser.add_argument(*dict.fromkeys(["--" + f.name.replace("_", "-"), "--" + f.name]), dest=f.name, type=kind,
                            default=None, metavar=f.type.__name__,
                            help=f"{comments.get(f.name, '')} (default: {defaults})")
    return parser


def is_out_of_memory(e):
    """torch's OutOfMemoryError, Python's MemoryError, or a RuntimeError that says so: the CPU allocator's "can't
    allocate memory", a CUDA library's "CUDA error: out of memory"."""
    import torch
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or any(
        text in str(e) for text in ("can't allocate memory", "out of memory"))


def first_line(e):
    text = (str(e).strip().splitlines() or [""])[0].removeprefix(f"{type(e).__name__}: ")  # some repeat their name
    return f"{type(e).__name__}: {text[:160]}"


def keep_freed_memory(device="cpu"):
    """On a CPU, have glibc keep freed memory for the next tensor instead of handing it back to the kernel. By
    default it maps large blocks fresh and unmaps them when freed (over a threshold that adapts up to 32 MB: at SD
    size, each weight's gradient, oneDNN's per-call weight copies, large activations), and trims the top of its heap,
    so the next tensor pays a page fault per 4 KB and a zeroing: on this project's CPU that was half of a full
    fine-tuning call at SD size (docs/RESULTS.md, "The allocator under the CPU figures"). The price: the process keeps
    its peak resident set until it exits, so a GPU `device` is left as it is (its host memory would stay at its
    loading peak for nothing). A MALLOC_* variable, GLIBC_TUNABLES or another allocator in LD_PRELOAD is the user's
    own choice and is left alone, as are other C libraries. Returns, in words, what the heap does."""
    if not str(device).startswith("cpu"):  # "cpu" or torch.device("cpu")
        return "the C library's defaults (not a CPU run)"
    chosen = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    if chosen:
        return " ".join(f"{k}={v}" for k, v in chosen.items())
    if platform.libc_ver()[0] != "glibc":
        return "the C library's defaults"
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # malloc.h; a trim threshold of -1 never trims
    libc = ctypes.CDLL(None)
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, -1)):
        return "glibc's defaults (mallopt refused)"
    return "glibc, freed memory kept for reuse (no mmap, no trim)"


def run(prog, main, out_of_memory="use smaller batches", interrupted=""):
    """Run main(); input the user can fix ends in one line on stderr and exit code 1, and so does running out of
    memory, with `out_of_memory` saying what to lower. Ctrl-C is one line too, with `interrupted` saying how to go on,
    exit code 130 as a shell reports it; and so are nanoddpo's own warnings ("prog: warning: ..."). Both texts may be
    functions, asked when they are needed (what to do next may depend on how far main() got)."""
    from nanoddpo.model import LoadError

    ours = (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent)  # nanoddpo/ and the scripts
    with warnings.catch_warnings():  # restores the warning printer on the way out
        show = warnings.showwarning

        def one_line(message, category, filename, lineno, file=None, line=None):
            if category is UserWarning and Path(filename).resolve().parent in ours:  # ours, for the user: as an error
                print(f"{prog}: warning: {message}", file=sys.stderr)
            else:  # a library's: where it came from helps
                show(message, category, filename, lineno, file, line)
        warnings.showwarning = one_line
        try:
            return main()
        except (UsageError, LoadError) as e:
            sys.exit(f"{prog}: error: {e}")
        except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
            if type(e).__name__ == "BackendCompilerFailed":  # torch.compile's, e.g. no C++ compiler on a CPU machine
                sys.exit(f"{prog}: error: torch.compile failed ({first_line(e.inner_exception)}): run with --compile off")
            if not is_out_of_memory(e):
                raise
            out_of_memory = out_of_memory() if callable(out_of_memory) else out_of_memory
            sys.exit(f"{prog}: error: out of memory ({first_line(e)}): {out_of_memory}")
        except KeyboardInterrupt:  # not the traceback of wherever the loop happened to be
            interrupted = interrupted() if callable(interrupted) else interrupted
            print(f"\n{prog}: interrupted" + (f": {interrupted}" if interrupted else ""), file=sys.stderr)
            sys.exit(130)
