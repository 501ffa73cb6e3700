"""Compiles a kernel's C file (ops/cpu/csrc/) with the system compiler on first use and loads it with ctypes.

The CPU kernels (AVX2 + FMA, AVX-512 chosen at run time) need no torch headers; most build in seconds, the int4 one in
about a minute (three on 2 busy cores). The shared object is cached by a hash of every file in the source folder, the
compiler (compiler_identity) and the flags, with a record of the compiler's warnings beside it (warnings_record), under
the cache directory the engine's configuration names (EngineConfig.cache_dir), compiled by one process at a time
(_build_lock); without a compiler or on another CPU a kernel does not build, and the CPU kernel set
(ops/cpu/__init__.py) keeps the torch reference, as it does when the configuration switches them off (cpu_kernels). The
ctypes types come from the prototypes in csrc/nanoqwen_cpu.h, which every .c file includes: the compiler checks each
definition against its prototype and Python reads the same prototype, so neither side can
drift from the other. A function declared `int` returns a status, which graph.call checks.

The kernels' thread pool (csrc/pool.c) is a library of its own, loaded RTLD_GLOBAL before the first kernel library,
which resolve nanoqwen_pool_run from it as they load: one pool, one set of helper threads, for the whole process (one
library each had its own: on 2 cores one library's helper spun while another's slept). A pool that does not build
leaves every kernel to torch; the first pool a process loads serves every library it loads after.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

log = logging.getLogger("nanoqwen")

CSRC = Path(__file__).parent / "csrc"
HEADER = "nanoqwen_cpu.h"
POOL = "pool.c"
# -Wmissing-prototypes: an exported function without a prototype in the header is a warning.
# No -Werror: a new compiler's new warning must not turn a working kernel into the torch fallback;
# tests/test_cpu_build.py requires a build without warnings instead.
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-Wall", "-Wextra", "-Wmissing-prototypes"]

# The C parameter types the header may use, as ctypes sees them (any pointer is a c_void_p).
C_TYPES = {"int": ctypes.c_int, "long": ctypes.c_long, "float": ctypes.c_float}


NO_COMPILER = "no C compiler found (cc, $CC or gcc)"


class BuildError(RuntimeError):
    """The compiler rejected a kernel source; the message is its output (file:line: error ...)."""


def profiled(name: str):
    """A profiler range around a kernel call, free when no profiler is running."""
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def kernel_op(name: str, impl: Callable, fake: Callable, mutates_args: Sequence[str] = ()) -> Callable:
    """The one torch.compile policy of every C kernel: `impl` is registered as the custom op
    nanoqwen::`name` (traced through `fake`), which compiled code calls; eager code calls `impl`
    directly, as the dispatcher would cost tens of µs a call. Both run the same C function."""
    op = torch.library.custom_op(f"nanoqwen::{name}", impl, mutates_args=tuple(mutates_args))
    op.register_fake(fake)

    @functools.wraps(impl)
    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else impl(*args)

    return call


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def unavailable() -> str | None:
    """Why the C kernels cannot run here (then they fall back to torch), or None where they must build."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "no AVX2 on this CPU"
    if compiler() is None:
        return NO_COMPILER
    return None


class Prototype(NamedTuple):
    restype: type | None  # None for void; c_int for a status (csrc/nanoqwen_cpu.h's NANOQWEN_NO_MEMORY)
    argtypes: list


def prototypes(header: str) -> dict[str, Prototype]:
    """{function: its ctypes types} for every `void name(params);` or `int name(params);` prototype in the header."""
    text = re.sub(r"/\*.*?\*/|//[^\n]*|^\s*#[^\n]*", "", header, flags=re.S | re.M)
    found = {}
    for statement in filter(str.strip, text.split(";")):
        match = re.fullmatch(r"\s*(void|int)\s+(\w+)\s*\(([^()]*)\)\s*", statement)
        if match is None:
            raise ValueError(f"{HEADER}: not a `void name(params)` or `int name(params)` prototype: "
                             f"{' '.join(statement.split())!r}")
        restype = ctypes.c_int if match[1] == "int" else None
        found[match[2]] = Prototype(restype, [_ctype(param, match[2]) for param in match[3].split(",")])
    return found


def _ctype(param: str, function: str):
    if "[" in param:  # C passes an array as a pointer: spell it `type *name`, not read as its element's type
        raise ValueError(f"{HEADER}: {function}: unsupported parameter {param.strip()!r}")
    if "*" in param:
        return ctypes.c_void_p
    words = [w for w in param.split() if w != "const"]
    if len(words) != 2 or words[0] not in C_TYPES:
        raise ValueError(f"{HEADER}: {function}: unsupported parameter {param.strip()!r}")
    return C_TYPES[words[0]]


def resolve_cache_dir(configured: str = "") -> Path:
    """Where the shared objects are cached: `configured` (NANOQWEN_CACHE_DIR, `~` expanded), else nanoqwen/ under
    $XDG_CACHE_HOME, else under ~/.cache. Read at each call, not at import: a process that sets either variable
    after importing ops gets what it set. A relative XDG_CACHE_HOME is ignored, as the XDG spec says."""
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "nanoqwen"


def isa_flags(isa: str) -> list[str]:
    """The compiler's flags for one cpu_isa setting (nanoqwen.choices.CPU_ISAS, checked by EngineConfig): the C
    side's cap, csrc/gemv.h's NANOQWEN_ISA, which every run-time choice of loops there reads."""
    return [*FLAGS, f"-DNANOQWEN_ISA=NANOQWEN_ISA_{isa.upper()}"]


def warnings_record(library: Path) -> Path:
    """The compiler's warnings on a cached shared object, kept beside it (empty when it built quietly): the one
    record of them, which tests/test_cpu_build.py reads instead of compiling again."""
    return library.with_suffix(".warnings")


def compile_library(cc: str, source: Path, path: Path, isa: str = "auto") -> str:
    """Compiles `source` (by its path, so diagnostics name it) into the shared object `path`, capped at `isa`, its
    warnings_record beside it; -> the compiler's warnings. Raises BuildError with its output when it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        command = [cc, *isa_flags(isa), f"-I{source.parent}", str(source), "-o", str(out), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(result.stderr.strip() or f"{cc} exited with {result.returncode}")
        warnings = result.stderr.strip()
        warnings_record(out).write_text(warnings)  # by the umask, as the library: a shared cache's users read it
        # atomic, the record first: concurrent processes never load a half-written file, nor find one without it
        os.replace(warnings_record(out), warnings_record(path))
        os.replace(out, path)
    return warnings


def _cached(path: Path) -> bool:
    return path.exists() and warnings_record(path).exists()


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Held while `path` is compiled: a second process after the same library (the suite's two workers and the servers
    they start, on an empty cache) waits for the first's and loads it, rather than compile it again beside it (the
    int4 library takes minutes on 2 busy cores). Released by the kernel when its holder dies; the lock file stays, as
    unlinking it would let a waiter and a newcomer lock two different files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _locked(path.with_suffix(".lock"))
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _locked(lock: Path) -> int | None:
    """A descriptor of `lock` holding its exclusive flock, or None where none can be had (a filesystem without flock,
    another user's lock file it cannot open): then the build goes on unlocked, as before the lock, which the atomic
    renames keep safe at the cost of a second compile; a lock must never cost the kernels themselves."""
    try:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)  # NFS locks exclusively only what is open for writing
        except PermissionError:  # another user's lock file: a local flock needs no write access
            fd = os.open(lock, os.O_RDONLY)
    except OSError as exc:
        log.info("building without a lock: %s", exc)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:  # ENOLCK, EBADF, EOPNOTSUPP: NFS without a lock daemon, some overlay filesystems
        os.close(fd)
        log.info("building without a lock on %s: %s", lock, exc)
        return None
    return fd


def _library(name: str, source: Path, cache_dir: Path, cc: str, isa: str, digest: str) -> Path:
    """The shared object of `source` in `cache_dir` (`digest`: _digest of its folder's sources), compiled first
    unless cached with its warnings_record, by one process at a time."""
    path = cache_dir / f"{name}-{digest}.so"
    if not _cached(path):
        with _build_lock(path):
            if not _cached(path):  # else built by the process this one waited for
                warnings = compile_library(cc, source, path, isa)
                if warnings:
                    log.warning("%s built with warnings:\n%s", name, warnings)
    return path


# The pool libraries this process loaded, by cache folder and digest: every kernel library's build asks for the pool,
# and only the first of each looks for it on disk and loads it.
_pools: dict[tuple[Path, str], ctypes.CDLL] = {}


def load_pool(csrc: Path, cache_dir: Path, cc: str, sources: bytes | None = None) -> ctypes.CDLL:
    """The thread pool's library, loaded where every kernel library loaded after it finds its symbols; its flags carry
    no cap (it has no loops to cap), so every cap's kernels share it. `sources`: _sources(csrc) where the caller read
    them already. Raises as compile_library does."""
    digest = _digest(_sources(csrc) if sources is None else sources, cc, "auto")
    if (cache_dir, digest) not in _pools:
        path = _library("cpu_pool", csrc / POOL, cache_dir, cc, "auto", digest)
        _pools[cache_dir, digest] = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    return _pools[cache_dir, digest]


def _sources(csrc: Path) -> bytes:
    """Every source and header of the folder, named, in order: an edit to any rebuilds all."""
    return b"".join(file.name.encode() + b"\0" + file.read_bytes() for file in sorted(csrc.glob("*.[ch]")))


# A compiler that hangs when asked its --version must not hang the model's load: past this its kernels fall back
# to torch. (A compile that hangs is not bounded: it is the kernel's own build, cached once done.)
COMPILER_QUERY_TIMEOUT_S = 30.0


@functools.cache
def compiler_identity(cc: str) -> str | None:
    """What every library's key (so its warnings_record's too) knows the compiler by: its path and what its `--version`
    prints, so a compiler upgraded at the same path builds libraries and records of its own rather than reuse the old
    one's. Asked once a process, in the C locale (gcc translates its text: the key must not follow the language); its
    stderr left out, as a wrapper's notes there may change from one call to the next. None where it does not answer
    (it cannot start, or it hangs): kept too, so the next kernel's build fails at once rather than wait again."""
    try:
        result = subprocess.run([cc, "--version"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"},
                                timeout=COMPILER_QUERY_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("%s --version did not answer: %s", cc, exc)
        return None
    return f"{cc}\n{result.returncode}\n{result.stdout}"


def _digest(sources: bytes, cc: str, isa: str) -> str:
    identity = compiler_identity(cc)
    if identity is None:
        raise BuildError(f"{cc} did not answer --version")
    return hashlib.sha256(" ".join([identity, *isa_flags(isa)]).encode() + sources).hexdigest()[:16]


class CKernel:
    """The functions of one C file, built at most once, for one cpu_isa. `ready` is a plain attribute, so code that
    torch.compile traces can branch on it; `error` holds why a build failed."""

    def __init__(self, name: str, source: str, functions: tuple[str, ...], csrc: Path = CSRC) -> None:
        self.name = name
        self.source = csrc / source
        self.functions = functions
        self.csrc = csrc
        self.lib: ctypes.CDLL | None = None
        self.ready = False
        self.error: str | None = None
        self.isa: str | None = None  # the cpu_isa of the first build (tried or done)

    def build(self, cache_dir: Path | None = None, isa: str | None = None) -> bool:
        """Compiles into `cache_dir` (None: resolve_cache_dir()'s default), or loads from there, on the first call,
        capped at `isa` (None: the first call's, else auto); whether the kernel can run. ValueError for an isa other
        than the first call's where that one built: a process runs one build of each file (the int4 weights it packed
        follow its layout), so a second cap needs a CKernel of its own."""
        if isa is not None and self.isa not in (None, isa):
            if not self.ready:  # nothing built (no compiler, a refused build): no packed layout to mismatch
                return False
            raise ValueError(f"{self.name} is built for cpu_isa={self.isa}, not {isa}: one cap a process")
        if self.isa is None:
            self.isa = isa or "auto"
            try:
                self.lib = self._load(cache_dir or resolve_cache_dir())
            except Exception as exc:  # a kernel that cannot be built must never stop the model from loading
                self.error = str(exc) or repr(exc)
                log.warning("could not build %s: using its fallback\n%s", self.name, self.error[:2000])
            self.ready = self.lib is not None
        return self.ready

    def _load(self, cache_dir: Path) -> ctypes.CDLL | None:
        reason = unavailable()
        if reason is not None:  # only a missing compiler is news: the rest is the user's choice or the CPU
            level = logging.WARNING if reason == NO_COMPILER else logging.INFO
            log.log(level, "%s: %s, using torch", self.name, reason)
            return None
        cc = compiler()
        sources = _sources(self.csrc)
        load_pool(self.csrc, cache_dir, cc, sources)
        path = _library(self.name, self.source, cache_dir, cc, self.isa, _digest(sources, cc, self.isa))
        signatures = prototypes((self.csrc / HEADER).read_text())
        # libgomp.so.1 resolves to the OpenMP runtime torch already loaded: the kernels' thread pool
        # (csrc/pool.h) sizes itself by its thread count (torch.set_num_threads).
        lib = ctypes.CDLL(str(path))
        for function in self.functions:
            if function not in signatures:
                raise BuildError(f"{self.name}: {function} has no prototype in {self.csrc / HEADER}")
            getattr(lib, function).restype, getattr(lib, function).argtypes = signatures[function]
        return lib
