"""llama.cpp's own command-line tools, built from the exact source of the installed llama-cpp-python.

llama-cpp-python ships llama.cpp's shared libraries (libllama, libggml*) but none of its programs. To
compare with llama.cpp's *own* perplexity (tools/perplexity/perplexity.cpp, the `llama-perplexity`
executable) this module builds that one program:

  1. source: the sdist of the installed llama-cpp-python version, fetched with pip
     (`pip download --no-deps --no-binary :all: llama-cpp-python==<version>`; pip's cache makes repeats
     fast), which carries llama.cpp's source as vendor/llama.cpp — the source the installed libraries
     were built from. `WQEDGE_LLAMACPP_SOURCE` may name that tarball or an unpacked llama.cpp tree instead.
  2. compile only llama.cpp's `common/` library (plus the vendored cpp-httplib it links),
     tools/perplexity/perplexity.cpp and a 5-line main (llama.cpp's, plus a flush of its asynchronous
     logger before exit: see _MAIN) with the C++ compiler (`$CXX`, else c++/g++/clang++), 2 jobs
     by default (`WQEDGE_BUILD_JOBS`);
  3. link them against the installed package's libllama/libggml (same version, so the ABI matches; linked
     with -z defs so that a missing symbol is an error at build time, not at run time).

The executable is cached as ~/.cache/wqedge/llama.cpp-<version>/llama-perplexity (`WQEDGE_CACHE_DIR` or
`XDG_CACHE_HOME` move the root), built in a temporary folder and moved into place atomically under a
lock, so it is built once per machine. `WQEDGE_LLAMA_PERPLEXITY` may point at a ready executable.

`run_llama_perplexity(model, text)` runs it on a GGUF and a text file and parses its estimates.
Everything here needs the standard library only (plus importlib metadata of llama-cpp-python).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "LlamaPerplexityResult",
    "ToolUnavailable",
    "BuildError",
    "build_llama_perplexity",
    "llamacpp_lib_dir",
    "llamacpp_version",
    "llama_perplexity_path",
    "parse_llama_perplexity",
    "read_llama_perplexity_text",
    "read_saved_tokens",
    "run_llama_perplexity",
    "tools_cache_dir",
]

PACKAGE = "llama-cpp-python"
EXE = "llama-perplexity"


class ToolUnavailable(RuntimeError):
    """The tool cannot be had on this machine (no llama-cpp-python, no compiler, no source); the message says
    which. Tests skip on it."""


class BuildError(RuntimeError):
    """Everything needed was there but the build failed (a compiler or linker error: a real failure)."""


def _say(msg: str, progress: bool = True) -> None:
    if progress:
        print(f"[wqedge llama.cpp tools] {msg}", file=sys.stderr, flush=True)


# ================================================================ what is installed

def llamacpp_version() -> str:
    """The installed llama-cpp-python version (ToolUnavailable when it is not installed)."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ToolUnavailable(f"{PACKAGE} is not installed (pip install {PACKAGE})") from None


def llamacpp_lib_dir() -> Path:
    """The folder holding the installed package's libllama.so and libggml*.so."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin:
        raise ToolUnavailable(f"{PACKAGE} is not installed (pip install {PACKAGE})")
    root = Path(spec.origin).parent
    for d in (root / "lib", root):
        if (d / "libllama.so").is_file() and (d / "libggml-base.so").is_file():
            return d
    raise ToolUnavailable(f"{root}: no libllama.so/libggml-base.so inside the installed llama_cpp package "
                          f"(this module supports Linux builds of {PACKAGE})")


def tools_cache_dir(version: str | None = None) -> Path:
    """~/.cache/wqedge/llama.cpp-<version>/ (root from WQEDGE_CACHE_DIR, else $XDG_CACHE_HOME/wqedge)."""
    root = os.environ.get("WQEDGE_CACHE_DIR")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wqedge"
    return base / f"llama.cpp-{version or llamacpp_version()}"


def _compiler() -> str:
    cxx = os.environ.get("CXX")
    cands = [cxx] if cxx else ["c++", "g++", "clang++"]
    for c in cands:
        path = shutil.which(c)
        if path:
            return path
    raise ToolUnavailable(f"no C++ compiler found ({'$CXX=' + cxx if cxx else 'tried c++, g++, clang++'}); "
                          f"building {EXE} needs a C++17 compiler")


def _works(exe: Path, lib_dir: Path | None) -> bool:
    try:
        r = subprocess.run([str(exe), "--help"], cwd="/", env=_run_env(lib_dir), capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and b"--chunks" in r.stdout + r.stderr


def _run_env(lib_dir: Path | None) -> dict:
    env = dict(os.environ)
    if lib_dir is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(lib_dir), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


# ================================================================ source

_NEEDED = ("include/", "ggml/include/", "common/", "tools/perplexity/", "vendor/nlohmann/", "vendor/sheredom/",
           "vendor/cpp-httplib/", "src/", "LICENSE")


def _extract(tarball: Path, dest: Path) -> Path:
    """Unpack the parts of vendor/llama.cpp the build needs; returns the llama.cpp root."""
    with tarfile.open(tarball) as tf:
        members = []
        root_name = None
        for m in tf:
            parts = m.name.split("/")
            if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"]:
                continue
            rel = "/".join(parts[3:])
            if rel.startswith(_NEEDED) and (m.isfile() or m.isdir()):
                if rel.startswith("src/") and not rel.endswith(".h"):
                    continue
                members.append(m)
                root_name = "/".join(parts[:3])
        if not members:
            raise ToolUnavailable(f"{tarball}: no vendor/llama.cpp inside (not a {PACKAGE} sdist?)")
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(dest, members=members, **kw)
    return dest / root_name


def _fetch_source(version: str, work: Path, progress: bool) -> Path:
    """llama.cpp's source tree for `version` (from WQEDGE_LLAMACPP_SOURCE or pip download of the sdist)."""
    given = os.environ.get("WQEDGE_LLAMACPP_SOURCE")
    if given:
        p = Path(given)
        if p.is_dir():
            if not (p / "tools" / "perplexity" / "perplexity.cpp").is_file():
                raise ToolUnavailable(f"WQEDGE_LLAMACPP_SOURCE={p}: not a llama.cpp source tree")
            return p
        if p.is_file():
            return _extract(p, work / "src")
        raise ToolUnavailable(f"WQEDGE_LLAMACPP_SOURCE={p} does not exist")
    dl = work / "sdist"
    dl.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
           "-q", f"{PACKAGE}=={version}", "-d", str(dl)]
    _say(f"fetching the {PACKAGE} {version} sdist (llama.cpp source): {' '.join(cmd[2:])}", progress)
    try:
        r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise ToolUnavailable(f"pip download of the {PACKAGE}=={version} sdist timed out") from None
    tarballs = sorted(dl.glob("*.tar.gz"))
    if r.returncode != 0 or not tarballs:
        tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
        raise ToolUnavailable(f"could not download the {PACKAGE}=={version} sdist with pip (needed for llama.cpp's "
                              f"source; set WQEDGE_LLAMACPP_SOURCE to a copy): " + " | ".join(tail))
    return _extract(tarballs[0], work / "src")


# ================================================================ build

def _sources(src: Path) -> list[Path]:
    common = src / "common"
    files = sorted(common.glob("*.cpp")) + sorted(common.glob("jinja/*.cpp")) + sorted(common.glob("parsers/*.cpp"))
    httplib = src / "vendor" / "cpp-httplib" / "httplib.cpp"
    if httplib.is_file():
        files.append(httplib)
    files.append(src / "tools" / "perplexity" / "perplexity.cpp")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise BuildError(f"llama.cpp source incomplete: {missing}")
    # heaviest first, so that two jobs finish together
    return sorted(files, key=lambda f: -f.stat().st_size)


# tools/perplexity/main.cpp is `return llama_perplexity(argc, argv);`. llama.cpp's logger prints from a
# background thread that is never joined (llama.cpp issue 22142: "logs may be lost if not flushed before the
# program exits"); with stdout/stderr on pipes the last chunk's value and the "Final estimate" line were lost
# that way here. This main is the same call followed by the flush that log.h recommends.
_MAIN = """// wqedge: llama.cpp's tools/perplexity/main.cpp plus a flush of the asynchronous logger before exit
#include "log.h"

int llama_perplexity(int argc, char ** argv);

int main(int argc, char ** argv) {
    const int rc = llama_perplexity(argc, argv);
    common_log_flush(common_log_main());
    return rc;
}
"""


def _main_cpp(out: Path) -> Path:
    p = out / "perplexity-main.cpp"
    p.write_text(_MAIN)
    return p


def _build_info(src: Path, out: Path, version: str, cxx: str) -> Path:
    tpl = (src / "common" / "build-info.cpp.in").read_text()
    text = (tpl.replace("@LLAMA_BUILD_NUMBER@", "0")
            .replace("@LLAMA_BUILD_COMMIT@", f"{PACKAGE}-{version}")
            .replace("@BUILD_COMPILER@", Path(cxx).name)
            .replace("@BUILD_TARGET@", os.uname().machine if hasattr(os, "uname") else "unknown"))
    p = out / "build-info.cpp"
    p.write_text(text)
    return p


def _children_cpu() -> float:
    try:
        import resource
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime
    except ImportError:  # pragma: no cover
        return 0.0


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            import fcntl
            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not Linux
            pass
        yield


def build_llama_perplexity(dest: Path | None = None, *, jobs: int | None = None, progress: bool = True) -> Path:
    """Build llama-perplexity for the installed llama-cpp-python into `dest` (default: the cache path)."""
    version = llamacpp_version()
    lib_dir = llamacpp_lib_dir()
    cxx = _compiler()
    dest = Path(dest) if dest else tools_cache_dir(version) / EXE
    jobs = int(jobs or os.environ.get("WQEDGE_BUILD_JOBS") or min(2, os.cpu_count() or 1))
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cpu0 = _children_cpu()
    with tempfile.TemporaryDirectory(prefix=".build-", dir=dest.parent) as tmp:
        work = Path(tmp)
        src = _fetch_source(version, work, progress)
        t_src = time.perf_counter() - t0
        obj = work / "obj"
        obj.mkdir()
        files = _sources(src) + [_build_info(src, obj, version, cxx), _main_cpp(obj)]
        # -O0 for common/ and cpp-httplib (argument parsing, chat templates, downloads: nothing the scoring
        # runs; 20-30% less compiler time per file than -O1), -O2 for perplexity.cpp (its log-softmax over
        # the vocabulary) and main. The model itself runs in the installed, optimized libllama/libggml.
        flags = ["-std=c++17", "-g0", "-w", "-fPIC", "-pthread", "-DNDEBUG",
                 f"-I{src / 'include'}", f"-I{src / 'ggml' / 'include'}", f"-I{src / 'common'}",
                 f"-I{src / 'vendor'}", f"-I{src / 'src'}", f"-I{src / 'vendor' / 'cpp-httplib'}"]
        _say(f"compiling {len(files)} files of llama.cpp {PACKAGE}-{version} (common/ + tools/perplexity) with "
             f"{Path(cxx).name}, {jobs} jobs", progress)
        done = [0]

        def compile_one(i_f):
            i, f = i_f
            o = obj / f"{i:03d}_{f.stem}.o"
            extra = ["-DCPPHTTPLIB_FORM_URL_ENCODED_PAYLOAD_MAX_LENGTH=1048576",
                     "-DCPPHTTPLIB_LISTEN_BACKLOG=512", "-DCPPHTTPLIB_REQUEST_URI_MAX_LENGTH=32768",
                     "-DCPPHTTPLIB_TCP_NODELAY=1"] if f.name == "httplib.cpp" else []
            opt = "-O2" if f.name in ("perplexity.cpp", "perplexity-main.cpp") else "-O0"
            r = subprocess.run([cxx, opt, *flags, *extra, "-c", str(f), "-o", str(o)], cwd=work,
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise BuildError(f"compiling {f.relative_to(src) if src in f.parents else f} failed:\n"
                                 f"{r.stderr[-4000:]}")
            done[0] += 1
            _say(f"  [{done[0]}/{len(files)}] {f.relative_to(src) if src in f.parents else f.name} "
                 f"({time.perf_counter() - t0:.0f} s)", progress)
            return o

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
            objs = list(ex.map(compile_one, enumerate(files)))
        exe = work / EXE
        link = [cxx, "-o", str(exe), *map(str, objs), f"-L{lib_dir}", "-lllama", "-lggml", "-lggml-base",
                f"-Wl,-rpath,{lib_dir}", "-Wl,-z,defs", "-pthread"]
        r = subprocess.run(link, cwd=work, capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"linking {EXE} against {lib_dir} failed (is the installed {PACKAGE} really "
                             f"{version}?):\n{r.stderr[-4000:]}")
        if not _works(exe, lib_dir):
            raise BuildError(f"the built {EXE} does not run (`{exe} --help` failed)")
        total = time.perf_counter() - t0
        cpu = _children_cpu() - cpu0
        info = {"package": PACKAGE, "version": version, "lib_dir": str(lib_dir), "compiler": cxx,
                "jobs": jobs, "files": len(files), "source_seconds": round(t_src, 1),
                "build_seconds": round(total, 1),
                "compiler_cpu_seconds": round(cpu, 1), "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (work / f"{EXE}.json").write_text(json.dumps(info, indent=1) + "\n")
        os.replace(work / f"{EXE}.json", dest.with_name(dest.name + ".json"))
        os.replace(exe, dest)   # same file system (the temp dir is beside dest): atomic
    _say(f"built {dest} in {total:.0f} s wall (source {t_src:.0f} s; compiler CPU time {cpu:.0f} s)", progress)
    return dest


def llama_perplexity_path(build: bool = True, progress: bool = True) -> Path:
    """The llama-perplexity executable for the installed llama-cpp-python: WQEDGE_LLAMA_PERPLEXITY, else the
    cached build, else (build=True) built now (once per machine; a few minutes on 2 cores).

    Raises ToolUnavailable (with the reason) when it is not there and cannot be built here, BuildError when a
    build was attempted and failed.
    """
    env = os.environ.get("WQEDGE_LLAMA_PERPLEXITY")
    lib_dir = llamacpp_lib_dir()
    if env:
        p = Path(env)
        if not p.is_file():
            raise ToolUnavailable(f"WQEDGE_LLAMA_PERPLEXITY={p} does not exist")
        return p
    dest = tools_cache_dir() / EXE
    if dest.is_file() and _works(dest, lib_dir):
        return dest
    if not build:
        raise ToolUnavailable(f"{dest} is not built (llama_perplexity_path(build=True) builds it)")
    _compiler()  # a clear reason before anything is downloaded
    with _lock(dest.with_name(".build.lock")):
        if dest.is_file() and _works(dest, lib_dir):  # built by another process meanwhile
            return dest
        return build_llama_perplexity(dest, progress=progress)


# ================================================================ run and parse

@dataclass
class LlamaPerplexityResult:
    perplexity: float                 # "Final estimate: PPL = x"
    error: float                      # "+/- y"
    running: list[float]              # the estimate printed after each chunk: [1]x,[2]y,...
    n_chunks: int
    n_ctx: int
    output: str = field(repr=False, default="")

    @property
    def per_chunk(self) -> list[float]:
        """Each chunk's own perplexity, recovered from the running estimates (4 printed decimals: ~1e-4)."""
        out, prev = [], 0.0
        for k, p in enumerate(self.running, 1):
            s = k * math.log(p)
            out.append(math.exp(s - prev))
            prev = s
        return out


_FINAL = re.compile(r"Final estimate: PPL = ([0-9.eE+-]+|nan|inf) \+/- ([0-9.eE+-]+|nan|inf)")
_CHUNK = re.compile(r"\[(\d+)\]([0-9.eE+-]+|nan|inf),")
_HEAD = re.compile(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)")


def parse_llama_perplexity(output: str) -> LlamaPerplexityResult:
    """Parse llama-perplexity's output (stdout + stderr)."""
    m = _FINAL.search(output)
    if not m:
        raise ValueError("no 'Final estimate: PPL = x +/- y' in llama-perplexity's output:\n" + output[-3000:])
    h = _HEAD.search(output)
    running = [float(v) for _, v in sorted(((int(i), v) for i, v in _CHUNK.findall(output)))]
    n_chunks = int(h.group(1)) if h else len(running)
    return LlamaPerplexityResult(float(m.group(1)), float(m.group(2)), running, n_chunks,
                                 int(h.group(2)) if h else 0, output)


def run_llama_perplexity(model, text_file, *, n_ctx: int = 512, chunks: int | None = None, threads: int = 2,
                         batch: int | None = None, extra: tuple[str, ...] = (), exe: Path | None = None,
                         timeout: float = 1800) -> LlamaPerplexityResult:
    """Run llama.cpp's llama-perplexity on a GGUF and a text file (-c n_ctx, --chunks, -t threads, -b batch:
    default n_ctx, one window per decode) and parse its final estimate and per-chunk values.

    Note: the tool reads the file, drops one trailing newline, and tokenizes the whole text with a BOS.
    """
    exe = Path(exe) if exe else llama_perplexity_path()
    cmd = [str(exe), "-m", os.fspath(model), "-f", os.fspath(text_file), "-c", str(n_ctx),
           "-b", str(batch or n_ctx), "-t", str(threads), "-tb", str(threads), "--no-warmup"]
    if chunks is not None:
        cmd += ["--chunks", str(chunks)]
    cmd += list(extra)
    r = subprocess.run(cmd, cwd="/", env=_run_env(llamacpp_lib_dir()), capture_output=True, text=True,
                       timeout=timeout)
    out = r.stdout + "\n" + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{out[-3000:]}")
    return parse_llama_perplexity(out)


def read_llama_perplexity_text(text_file) -> str:
    """The text exactly as llama-perplexity sees it (-f): the file's contents less one trailing newline."""
    t = Path(text_file).read_text(encoding="utf-8")
    return t[:-1] if t.endswith("\n") else t


def read_saved_tokens(logits_file) -> list[int]:
    """The token ids llama-perplexity scored, from a --kl-divergence-base file: n_chunk * n_ctx ids."""
    import struct
    with open(logits_file, "rb") as fh:
        head = fh.read(8 + 12)
        if head[:8] != b"_logits_":
            raise ValueError(f"{logits_file}: not a llama-perplexity logits file")
        n_ctx, n_vocab, n_chunk = struct.unpack("<iii", head[8:])
        data = fh.read(4 * n_ctx * n_chunk)
    return list(struct.unpack(f"<{n_ctx * n_chunk}i", data))
