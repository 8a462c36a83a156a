"""llama.cpp in process (the pinned `llama-cpp-py-sync` CPU wheel), used to verify an exported GGUF: the
tokenizer llama.cpp reads from the file, option log-likelihoods scored exactly like evaluate scores them,
greedy generation, and which tokens end a turn.

The wheel's libraries are built against glibc 2.38, for four symbols only (`__isoc23_strtol` and kin, the C23
names of strtol/strtoul/strtoull/sscanf). On an older glibc (Debian 12 has 2.36) `prepare` (run once by
`make install-export`) marks that version requirement weak in the wheel's copies of the libraries and builds a
tiny shim that defines the four names by calling the classic functions; `load` preloads the shim. On glibc
2.38 and newer nothing is changed.

`python -m pipeline.gguf.runtime prepare` does the preparation.
"""

from __future__ import annotations

import ctypes
import glob
import os
import struct
import subprocess
import sys
from pathlib import Path

from pipeline.errors import DataError
from pipeline.gguf import missing_tools_message, tools_dir

SHIM_SOURCE = r"""
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
long __isoc23_strtol(const char *s, char **e, int b) { return strtol(s, e, b); }
long long __isoc23_strtoll(const char *s, char **e, int b) { return strtoll(s, e, b); }
unsigned long __isoc23_strtoul(const char *s, char **e, int b) { return strtoul(s, e, b); }
unsigned long long __isoc23_strtoull(const char *s, char **e, int b) { return strtoull(s, e, b); }
int __isoc23_sscanf(const char *s, const char *f, ...) { va_list ap; va_start(ap, f); int r = vsscanf(s, f, ap); va_end(ap); return r; }
"""
SHIM = "libisoc23_shim.so"
VER_FLG_WEAK = 0x2
SHT_GNU_VERNEED = 0x6FFFFFFE


def glibc() -> tuple[int, int]:
    return tuple(int(x) for x in os.confstr("CS_GNU_LIBC_VERSION").split()[1].split(".")[:2])


def package_dir() -> Path:
    return tools_dir() / "llama" / "llama_cpp_py_sync"


def weaken_newer_glibc(path: Path, have: tuple[int, int]) -> list[str]:
    """Mark every GLIBC_x.y version requirement newer than `have` weak in an ELF64 library (the loader then
    binds those symbols to any definition, here the shim's). Returns the requirements changed."""
    data = bytearray(path.read_bytes())
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise DataError(f"{path}: not a little-endian ELF64 library")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    changed = []
    for _name, kind, _flags, _addr, offset, _size, link, info, _align, _entsize in sections:
        if kind != SHT_GNU_VERNEED:
            continue
        strings = sections[link][4]
        need = offset
        for _ in range(info):
            _version, count, _file, aux, following = struct.unpack_from("<HHIII", data, need)
            entry = need + aux
            for _ in range(count):
                _hash, flags, _other, name, next_entry = struct.unpack_from("<IHHII", data, entry)
                text = data[strings + name:data.index(b"\0", strings + name)].decode()
                if (text.startswith("GLIBC_2.") and tuple(int(x) for x in text[6:].split(".")[:2]) > have
                        and not flags & VER_FLG_WEAK):
                    struct.pack_into("<H", data, entry + 4, flags | VER_FLG_WEAK)
                    changed.append(text)
                entry += next_entry
            need += following
    if changed:
        path.write_bytes(bytes(data))
    return changed


def prepare() -> str:
    """Make the installed wheel's libraries load on this glibc (idempotent)."""
    libs = package_dir()
    if not libs.is_dir():
        raise DataError(missing_tools_message(libs))
    if glibc() >= (2, 38):
        return f"glibc {glibc()}: nothing to change"
    source = libs / "libisoc23_shim.c"
    source.write_text(SHIM_SOURCE, encoding="utf-8")
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(libs / SHIM), str(source)], check=True)
    changed = {}
    for lib in sorted(glob.glob(str(libs / "lib*.so*"))):
        if not os.path.islink(lib) and SHIM not in lib:
            changed[Path(lib).name] = weaken_newer_glibc(Path(lib), glibc())
    return f"glibc {glibc()}: shim built; weakened {changed}"


_LOG_SINK = None  # the C callback that silences llama.cpp's logging must outlive every model


def load(gguf: Path, n_ctx: int = 2048):
    """A llama.cpp context on the GGUF file: single sequence, logits only where asked, the CPU's threads."""
    global _LOG_SINK
    libs = package_dir()
    if not libs.is_dir():
        raise DataError(missing_tools_message(libs))
    if (libs / SHIM).exists():
        ctypes.CDLL(str(libs / SHIM), mode=ctypes.RTLD_GLOBAL)
    if str(libs.parent) not in sys.path:
        sys.path.append(str(libs.parent))  # appended: nothing there shadows the venv's packages
    from llama_cpp_py_sync import Llama
    from llama_cpp_py_sync._cffi_bindings import get_ffi, get_lib

    if _LOG_SINK is None and not os.environ.get("LLAMA_VERBOSE"):
        _LOG_SINK = get_ffi().callback("void(enum ggml_log_level, const char *, void *)", lambda *_: None)
        get_lib().llama_log_set(_LOG_SINK, get_ffi().NULL)
    llm = Llama(str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_threads=len(os.sched_getaffinity(0)), verbose=False)
    llm._lib.llama_set_embeddings(llm._ctx, False)  # the wrapper turns embeddings on; scoring wants logits
    return Gguf(llm)


class Gguf:
    """Scoring and generation on a loaded GGUF, by token ids (the tokenizer check is separate: `tokenize`)."""

    def __init__(self, llm):
        self.llm, self.lib, self.ffi = llm, llm._lib, llm._ffi
        self.n_vocab = self.lib.llama_vocab_n_tokens(llm._vocab)

    def close(self) -> None:
        self.llm.close()

    def tokenize(self, text: str) -> list[int]:
        """Tokens of a rendered prompt as llama.cpp (and Ollama) make them: BOS added where the file says so,
        special tokens in the text parsed."""
        return self.llm.tokenize(text, add_special=True, parse_special=True)

    def add_bos(self) -> bool:
        return bool(self.lib.llama_vocab_get_add_bos(self.llm._vocab))

    def is_end_of_turn(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.llm._vocab, token))

    def _forget(self, start: int) -> None:
        self.lib.llama_memory_seq_rm(self.lib.llama_get_memory(self.llm._ctx), 0, start, -1)

    def _decode(self, tokens: list[int], start: int, want: set[int]) -> dict[int, "object"]:
        """Decode tokens at positions start.. (after what the cache holds); the log-softmax rows at positions in want."""
        import numpy as np

        rows, width = {}, self.llm._n_batch
        for off in range(0, len(tokens), width):
            chunk = tokens[off:off + width]
            batch = self.lib.llama_batch_init(len(chunk), 0, 1)
            try:
                batch.n_tokens = len(chunk)
                for j, token in enumerate(chunk):
                    pos = start + off + j
                    batch.token[j], batch.pos[j], batch.n_seq_id[j] = int(token), pos, 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = pos in want
                if self.lib.llama_decode(self.llm._ctx, batch) != 0:
                    raise DataError("llama.cpp could not decode the sequence (llama_decode failed)")
                for j in range(len(chunk)):
                    if start + off + j in want:
                        logits = np.frombuffer(self.ffi.buffer(self.lib.llama_get_logits_ith(self.llm._ctx, j),
                                                               4 * self.n_vocab), dtype=np.float32).astype(np.float64)
                        top = logits.max()
                        rows[start + off + j] = logits - top - np.log(np.exp(logits - top).sum())
            finally:
                self.lib.llama_batch_free(batch)
        return rows

    def option_logprobs(self, options: list[tuple[list[int], list[int]]]) -> list[float]:
        """Per option (input ids, scored positions), the summed log-prob of the scored tokens; the prefix the
        options share is decoded once and kept in the cache."""
        ids = [o[0] for o in options]
        first = min(min(p for p in scored) for _, scored in options)
        shared = 0
        while shared < first and len({seq[shared] for seq in ids}) == 1:
            shared += 1
        self._forget(0)
        rows = self._decode(ids[0][:shared], 0, {shared - 1}) if shared else {}
        out = []
        for seq, scored in options:
            self._forget(shared)
            end = max(scored)
            mine = {**rows, **self._decode(seq[shared:end], shared, {p - 1 for p in scored if p - 1 >= shared})}
            out.append(float(sum(mine[p - 1][seq[p]] for p in scored)))
        return out

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation until an end-of-turn token (not included) or max_new_tokens."""
        self._forget(0)
        logits = self._decode(prompt, 0, {len(prompt) - 1})[len(prompt) - 1]
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits.argmax())
            if self.is_end_of_turn(token):
                break
            out.append(token)
            position = len(prompt) + len(out) - 1
            logits = self._decode([token], position, {position})[position]
        return out


if __name__ == "__main__":
    if sys.argv[1:] != ["prepare"]:
        sys.exit("usage: python -m pipeline.gguf.runtime prepare")
    print(f"llama.cpp runtime: {prepare()}")
