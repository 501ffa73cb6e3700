"""Building the C kernels: warnings, diagnostics that name the real file, the header as the one
declaration of the ctypes signatures, and the cache key."""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from nanoqwen.cli import ENGINE_OPTIONS
from ops.cpu import C_KERNELS
from ops.cpu import build as cpu_build
from ops.cpu import graph as cpu_graph
from server_process import REPO_ROOT
from waits import wait_for

KERNELS = list(C_KERNELS)
SLOT_TYPES = {"p": ctypes.c_void_p, "l": ctypes.c_long, "i": ctypes.c_int, "f": ctypes.c_float}  # replay.c's slot
needs_compiler = pytest.mark.skipif(cpu_build.unavailable() is not None, reason=f"{cpu_build.unavailable()}")


def copy_sources(tmp_path: Path) -> Path:
    csrc = tmp_path / "csrc"
    shutil.copytree(cpu_build.CSRC, csrc)
    return csrc


def test_header_declares_every_function_the_kernels_load():
    signatures = cpu_build.prototypes((cpu_build.CSRC / cpu_build.HEADER).read_text())
    assert sorted(signatures) == sorted(f for kernel in KERNELS for f in kernel.functions)


def test_prototype_parser():
    header = """
        #include <stdint.h>
        /* a comment; with a semicolon */
        void f(const void *x, int32_t *y, int n,
               long stride, float eps);  // trailing
        int g(int a);
    """
    assert cpu_build.prototypes(header) == {
        "f": (None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float]),
        "g": (ctypes.c_int, [ctypes.c_int]),
    }
    with pytest.raises(ValueError, match="unsupported parameter 'double x'"):
        cpu_build.prototypes("void f(double x);")
    for near_miss in ("float f(int x);", "int64_t f(int x);", "int *f(int x);", "unsigned int f(int x);"):
        with pytest.raises(ValueError, match="not a `void name"):
            cpu_build.prototypes(near_miss)
    with pytest.raises(ValueError, match="unsupported parameter 'int x\\[\\]'"):
        cpu_build.prototypes("int f(int x[]);")


def test_every_kernel_has_a_replay_thunk_that_reads_its_header_types():
    """csrc/replay.c's thunk for each prototype (but the replay's own) reads each argument from the slot member of
    its header type, as graph.py packs it, and returns the status of an `int` function (0 for a `void` one)."""
    signatures = cpu_build.prototypes((cpu_build.CSRC / cpu_build.HEADER).read_text())
    source = (cpu_build.CSRC / "replay.c").read_text()
    thunks = {}
    for name, returns, typeof, args in re.findall(
            r"static int thunk_(\w+)\(void \*fn, const union slot \*a\) \{\s*(return )?\(\(__typeof__\((\w+)\) "
            r"\*\)fn\)\(([^;]*)\);", source):
        assert typeof == name
        members = re.findall(r"a\[(\d+)\]\.(\w)", args)
        assert [int(k) for k, _ in members] == list(range(len(members))), name
        thunks[name] = (ctypes.c_int if returns else None, [SLOT_TYPES[m] for _, m in members])
    assert thunks == {f: signatures[f] for f in signatures if f not in cpu_graph.KERNEL.functions}
    assert set(re.findall(r'\{"(\w+)", thunk_(\w+)\}', source)) == {(f, f) for f in thunks}


def build_warnings(kernel: cpu_build.CKernel) -> str:
    """The compiler's warnings on `kernel`'s library as the engine builds it (cpu_isa auto, the default cache): the
    record the runtime build keeps beside it (ops/cpu/build.py), so the library the suite's servers and engines load
    is compiled once, here or there, not a second time for its warnings."""
    built = cpu_build.CKernel(kernel.name, kernel.source.name, kernel.functions)
    assert built.build(isa="auto"), built.error
    return cpu_build.warnings_record(Path(built.lib._name)).read_text()


@needs_compiler
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
def test_builds_without_warnings(kernel):
    """-Wall -Wextra -Wmissing-prototypes stay quiet: the tests' stand-in for -Werror."""
    warnings = build_warnings(kernel)
    assert warnings == "", warnings


@needs_compiler
def test_the_pool_builds_without_warnings():
    pool = cpu_build.load_pool(cpu_build.CSRC, cpu_build.resolve_cache_dir(), cpu_build.compiler())
    warnings = cpu_build.warnings_record(Path(pool._name)).read_text()
    assert warnings == "", warnings


@needs_compiler
def test_a_library_records_its_warnings_and_one_cached_without_its_record_is_built_anew(tmp_path):
    csrc = copy_sources(tmp_path)
    source = csrc / "pointwise.c"
    source.write_text(source.read_text() + "\nint unused_here(void);\nint unused_here(void) { int idle; return 0; }\n")

    def build() -> Path:
        kernel = cpu_build.CKernel("cpu_pointwise", "pointwise.c", (), csrc=csrc)
        assert kernel.build(tmp_path / "cache"), kernel.error
        return Path(kernel.lib._name)

    library = build()
    record = cpu_build.warnings_record(library)
    assert f"{source}:" in record.read_text() and "-Wunused-variable" in record.read_text()
    # readable by whom the library is (a cache shared by a group): both as the umask leaves a new file
    assert record.stat().st_mode & 0o444 == library.stat().st_mode & 0o444
    assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix not in (".so", ".warnings", ".lock")]
    assert cpu_build.warnings_record(Path(cpu_build.load_pool(csrc, tmp_path / "cache", cpu_build.compiler())._name)
                                     ).read_text() == ""
    record.unlink()
    built = library.stat().st_ino  # os.replace: a new file
    assert build() == library and "-Wunused-variable" in record.read_text()
    assert library.stat().st_ino != built


def waits_on_a_lock(pid: int) -> bool:
    """Whether a thread of process `pid` waits for an exclusive flock (/proc/locks' `->` line)."""
    return re.search(rf"^\d+: -> FLOCK\s+\w+\s+WRITE\s+{pid}\s", Path("/proc/locks").read_text(), re.M) is not None


@needs_compiler
def test_two_builders_of_one_library_compile_it_once_and_both_load_it(tmp_path, monkeypatch):
    """On an empty cache (CI's clean clone), the second builder after a library the first is compiling waits for it
    and loads it (ops/cpu/build.py's _build_lock), where both compiled it (the suite's two workers, and the servers
    they start, each paid minutes for the int4 library). Two threads here: a flock is an open file's, so they contend
    as two processes do. The compiler logs each compile and holds it until the second has either started a compile
    of its own or blocks on the lock: no timing decides."""
    log, go, cc, cache = tmp_path / "compiles", tmp_path / "go", tmp_path / "cc", tmp_path / "cache"
    cc.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then exec {cpu_build.compiler()} "$@"; fi\n'
                  f'for a in "$@"; do case "$a" in *.c) basename "$a" >> {log};; esac; done\n'
                  f'while [ ! -e {go} ]; do sleep 0.05; done\nexec {cpu_build.compiler()} "$@"\n')
    cc.chmod(0o755)
    digest = cpu_build._digest(cpu_build._sources(cpu_build.CSRC), str(cc), "auto")
    built: list[Path] = []

    def build() -> None:
        built.append(cpu_build._library("cpu_pool", cpu_build.CSRC / cpu_build.POOL, cache, str(cc), "auto", digest))

    def compiles() -> list[str]:
        return log.read_text().split() if log.exists() else []

    builders = [threading.Thread(target=build, daemon=True) for _ in range(2)]
    try:
        builders[0].start()
        wait_for(lambda: compiles() == ["pool.c"], 120, what="the first builder compiles the pool")
        builders[1].start()
        wait_for(lambda: len(compiles()) > 1 or waits_on_a_lock(os.getpid()), 120,
                 what="the second compiles or waits")
    finally:
        go.touch()  # a failed wait leaves no thread held by the compiler
    for builder in builders:
        builder.join(timeout=300)
    assert compiles() == ["pool.c"]
    assert len(built) == 2 and built[0] == built[1] and cpu_build.warnings_record(built[0]).read_text() == ""


@needs_compiler
def test_a_filesystem_without_flock_builds_unlocked(tmp_path, monkeypatch):
    """Where the cache's filesystem refuses the build lock (NFS without its lock daemon, an exclusive flock on a file
    not open for writing there: EBADF), the kernels build as they did before the lock, never fall back to torch."""
    def refused(fd: int, operation: int) -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(cpu_build.fcntl, "flock", refused)
    kernel = cpu_build.CKernel("cpu_pointwise", "pointwise.c", ())
    assert kernel.build(tmp_path / "cache"), kernel.error


@needs_compiler
def test_loaded_functions_take_the_header_signatures():
    signatures = cpu_build.prototypes((cpu_build.CSRC / cpu_build.HEADER).read_text())
    for kernel in KERNELS:
        assert kernel.build(), kernel.error
        for function in kernel.functions:
            loaded = getattr(kernel.lib, function)
            assert (loaded.restype, loaded.argtypes) == signatures[function]


@needs_compiler
def test_a_broken_source_names_its_file_and_line(tmp_path):
    csrc = copy_sources(tmp_path)
    lines = (csrc / "linear.c").read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if text.startswith("void linear("))
    lines.insert(line, "    int broken = ;")  # the new line `line + 1`, inside the function
    (csrc / "linear.c").write_text("\n".join(lines) + "\n")
    kernel = cpu_build.CKernel("cpu_linear", "linear.c", ("linear",), csrc=csrc)
    assert not kernel.build(tmp_path / "cache") and kernel.lib is None
    assert f"{csrc / 'linear.c'}:{line + 1}:" in kernel.error and "error" in kernel.error
    assert not list((tmp_path / "cache").glob("cpu_linear-*.so"))


@needs_compiler
def test_a_pool_that_does_not_build_leaves_every_kernel_to_torch(tmp_path):
    """The kernel libraries resolve the pool's function from its library (ops/cpu/build.py): without one, none loads."""
    csrc = copy_sources(tmp_path)
    (csrc / cpu_build.POOL).write_text((csrc / cpu_build.POOL).read_text() + "\nint broken = ;\n")
    for kernel in KERNELS:
        rebuilt = cpu_build.CKernel(kernel.name, kernel.source.name, kernel.functions, csrc=csrc)
        assert not rebuilt.build(tmp_path / "cache") and rebuilt.lib is None
        assert f"{csrc / cpu_build.POOL}:" in rebuilt.error and "error" in rebuilt.error
    assert not list((tmp_path / "cache").glob("*.so"))


@needs_compiler
def test_a_definition_that_drifts_from_the_header_does_not_build(tmp_path):
    csrc = copy_sources(tmp_path)
    source = csrc / "linear.c"
    source.write_text(source.read_text().replace("int M, int N, int K, int bf16)", "long M, int N, int K, int bf16)"))
    with pytest.raises(cpu_build.BuildError, match=rf"{source}:\d+:.*conflicting types for .linear"):
        cpu_build.compile_library(cpu_build.compiler(), source, tmp_path / "k.so")


@needs_compiler
def test_the_cache_is_keyed_by_every_source_and_header(tmp_path):
    csrc = copy_sources(tmp_path)

    def built() -> set[str]:
        kernel = cpu_build.CKernel("cpu_attention", "attention.c", ("decode_attention",), csrc=csrc)
        assert kernel.build(tmp_path / "cache"), kernel.error
        return {p.name for p in (tmp_path / "cache").glob("*.so")}

    first = built()
    assert built() == first and len(first) == 2  # the kernel and the pool; a second load reuses the cached objects
    (csrc / "simd.h").write_text((csrc / "simd.h").read_text() + "\n/* edited */\n")
    assert len(built()) == 4  # a header edit builds both anew


@needs_compiler
def test_a_compiler_upgraded_at_its_path_builds_its_own_library_and_record(tmp_path, monkeypatch):
    """The cache knows the compiler by its --version too, not by its path alone: one upgraded in place builds a library
    and warnings_record of its own, where the old compiler's were reused and the new one's warnings never seen. What
    a wrapper notes on stderr there (its pid here) is not the compiler's identity: one version, one library."""
    real, cc = cpu_build.compiler(), tmp_path / "bin" / "cc"
    cc.parent.mkdir()
    monkeypatch.setenv("CC", str(cc))

    def install(version: str, warning: str = "") -> Path:
        """`cc` answering --version with `version`, the real compiler behind it, `warning` on its stderr."""
        said = f'echo "{warning}" >&2\n' if warning else ""
        cc.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then echo "{version}"; echo "pid $$" >&2; exit 0; fi\n'
                      f'{said}exec {real} "$@"\n')
        cc.chmod(0o755)
        cpu_build.compiler_identity.cache_clear()  # asked once a process: this one's compiler changes under it
        kernel = cpu_build.CKernel("cpu_pointwise", "pointwise.c", ())
        assert kernel.build(tmp_path / "cache"), kernel.error
        return Path(kernel.lib._name)

    old = install("cc 1.0")
    assert cpu_build.warnings_record(old).read_text() == ""
    assert install("cc 1.0") == old
    new = install("cc 2.0", "a warning of cc 2.0's")
    assert new != old and cpu_build.warnings_record(new).read_text() == "a warning of cc 2.0's"
    assert len(list((tmp_path / "cache").glob("cpu_pointwise-*.so"))) == 2


@needs_compiler
def test_a_compiler_that_hangs_on_its_version_falls_back_to_torch_once(tmp_path, monkeypatch):
    """A compiler whose --version hangs (or cannot start) is asked once, bounded: every kernel falls back to torch
    with the reason, and the next kernels do not wait again."""
    cc = tmp_path / "cc"
    cc.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then sleep 30; fi\nexec {cpu_build.compiler()} "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setattr(cpu_build, "COMPILER_QUERY_TIMEOUT_S", 0.5)  # `cc` is this test's own path: asked anew
    started = time.monotonic()
    kernels = [cpu_build.CKernel(name, source, ()) for name, source in
               (("cpu_pointwise", "pointwise.c"), ("cpu_embedding", "embedding.c"))]
    assert [kernel.build(tmp_path / "cache") for kernel in kernels] == [False, False]
    assert time.monotonic() - started < 5
    assert all("did not answer --version" in kernel.error for kernel in kernels)
    assert not list((tmp_path / "cache").glob("*.so"))


@needs_compiler
def test_the_pool_is_loaded_once_for_its_cache_and_sources(tmp_path):
    """Every kernel library's build asks for the pool (ops/cpu/build.py): the first of a cache folder and digest looks
    for it on disk and loads it, the next builds reuse that load (a pool deleted from the cache since is not built
    again), and an edited source is another digest, so its pool is built and loaded anew."""
    csrc, cache = copy_sources(tmp_path), tmp_path / "cache"

    def build(name: str, source: str) -> None:
        kernel = cpu_build.CKernel(name, source, (), csrc=csrc)
        assert kernel.build(cache), kernel.error

    build("cpu_pointwise", "pointwise.c")
    pool = cpu_build.load_pool(csrc, cache, cpu_build.compiler())
    Path(pool._name).unlink()
    build("cpu_embedding", "embedding.c")
    assert cpu_build.load_pool(csrc, cache, cpu_build.compiler()) is pool and not Path(pool._name).exists()
    (csrc / "simd.h").write_text((csrc / "simd.h").read_text() + "\n/* edited */\n")
    build("cpu_embedding", "embedding.c")
    assert cpu_build.load_pool(csrc, cache, cpu_build.compiler()) is not pool
    assert len(list(cache.glob("cpu_pool-*.so"))) == 1


@needs_compiler
def test_each_cap_is_a_library_of_its_own_and_a_kernel_takes_one(tmp_path):
    """cpu_isa is part of the cache key (two caps, two libraries), and a CKernel stays with the cap of its first build:
    the process's kernels serve every engine in it, and int4 weights packed for one cap's layout would be misread by
    another's (ops/cpu/build.py)."""
    capped = cpu_build.CKernel("cpu_pointwise", "pointwise.c", ())
    assert capped.build(tmp_path, "avx2") and capped.build(tmp_path) and capped.build(tmp_path, "avx2")
    with pytest.raises(ValueError, match="cpu_pointwise is built for cpu_isa=avx2, not auto"):
        capped.build(tmp_path, "auto")
    assert cpu_build.CKernel("cpu_pointwise", "pointwise.c", ()).build(tmp_path, "auto")
    assert len(list(tmp_path.glob("cpu_pointwise-*.so"))) == 2


def test_without_a_compiler_the_kernels_fall_back_cleanly(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, no gcc
    kernel = cpu_build.CKernel("cpu_linear", "linear.c", ("linear",))
    if cpu_build.unavailable() == "no AVX2 on this CPU":
        pytest.skip("no AVX2: the compiler is never looked for")
    assert cpu_build.unavailable() == cpu_build.NO_COMPILER
    with caplog.at_level("WARNING", logger="nanoqwen"):
        assert not kernel.build(tmp_path / "cache")
    assert kernel.lib is None and kernel.error is None and "no C compiler" in caplog.text
    assert not kernel.build(tmp_path / "cache", "avx2")  # another cap: still torch, no layout to mismatch
    assert not (tmp_path / "cache").exists()


def test_the_cache_dir_is_the_configured_one_else_under_xdg_cache_home_else_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cpu_build.resolve_cache_dir() == tmp_path / "home" / ".cache" / "nanoqwen"
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # set but empty: unset, says the XDG spec
    assert cpu_build.resolve_cache_dir() == tmp_path / "home" / ".cache" / "nanoqwen"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # relative: ignored, as the spec says
    assert cpu_build.resolve_cache_dir() == tmp_path / "home" / ".cache" / "nanoqwen"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpu_build.resolve_cache_dir() == tmp_path / "xdg" / "nanoqwen"
    assert cpu_build.resolve_cache_dir("~/kernels") == tmp_path / "home" / "kernels"  # NANOQWEN_CACHE_DIR first


@needs_compiler
def test_a_kernel_built_without_a_cache_dir_lands_under_xdg_cache_home(tmp_path, monkeypatch):
    """Read when it builds, not when ops was imported (the variable set after the import here)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernel = cpu_build.CKernel("cpu_pointwise", "pointwise.c", ())
    assert kernel.build(), kernel.error
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "nanoqwen").glob("*.so")) == ["cpu_pointwise", "cpu_pool"]


def test_the_cli_help_and_the_readme_name_the_same_default():
    [option] = [o for o in ENGINE_OPTIONS if o.env == "NANOQWEN_CACHE_DIR"]
    [row] = [line for line in (REPO_ROOT / "README.md").read_text().splitlines()
             if line.startswith("| `NANOQWEN_CACHE_DIR` |")]
    for text in (option.help, row):
        assert "$XDG_CACHE_HOME/nanoqwen" in text and "~/.cache/nanoqwen" in text


@needs_compiler
@pytest.mark.parametrize(("name", "build_line_mark"), [("stream_ceiling.c", "-DKERNEL_C='\"linear.c\"'"),
                                                       ("stream_ceiling.c", "-DKERNEL_C='\"linear_int8.c\"'"),
                                                       ("ab_int8_row.c", "profiles/ab_int8_row.c -o"),
                                                       ("ab_int4_row.c", "profiles/ab_int4_row.c -o"),
                                                       ("ab_int4_rows.c", "profiles/ab_int4_rows.c -o"),
                                                       ("int4_bits.c", "profiles/int4_bits.c -o"),
                                                       ("ab_int8_rows.c", "profiles/ab_int8_rows.c -o"),
                                                       ("pool_handoff.c", "profiles/pool_handoff.c -o"),
                                                       ("preread_bound.c", "profiles/preread_bound.c -o"),
                                                       ("b1_linears.c", "profiles/b1_linears.c -o"),
                                                       ("b1_between.c", "profiles/b1_between.c -o"),
                                                       ("b8_split.c", "profiles/b8_split.c -o"),
                                                       ("small_kernels.c", "profiles/small_kernels.c -o"),
                                                       ("avx2_mix.c", "profiles/avx2_mix.c -o")])
def test_the_c_profiling_tools_compile_by_their_documented_build_lines(name, build_line_mark):
    """profiles/stream_ceiling.c, ab_int8_row.c, ab_int4_row.c, ab_int4_rows.c, int4_bits.c, ab_int8_rows.c,
    pool_handoff.c and preread_bound.c include a kernel's source and call its internals (the pool and its claims, the
    activation pieces, the int4 transposition, the AVX2 interleaved layout and packing, the int8 kernel's AVX2 helpers
    and 1-row loop), b1_linears.c, b1_between.c and small_kernels.c the kernels' entry points, b8_split.c those and the
    pool (pool.c included, its entry point wrapped): a change there must not break them silently; avx2_mix.c is the int8
    and int4 loops' instructions in asm. Each one's own header's build line, checked for syntax only."""
    tool = REPO_ROOT / "profiles" / name
    [line] = [line.strip() for line in tool.read_text().splitlines() if build_line_mark in line]
    words = [word.replace("'", "") for word in line.split()]
    flags = [word for word in words[1:] if word.startswith(("-D", "-I", "-m", "-f"))]
    result = subprocess.run([cpu_build.compiler(), "-fsyntax-only", "-Wall", "-Wextra", *flags, str(tool)],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr
