"""Prophesee `.raw` recordings: the ASCII header and the EVT 2.0, EVT 2.1 and EVT 3.0 encodings, decoded in numpy.

Layouts (Prophesee's "EVT 2.0/2.1/3.0 Format" pages; words little-endian, type in the 4 most significant bits):

- EVT 2.0, 32-bit: CD_OFF 0x0 / CD_ON 0x1 = [27:22] time LSBs (6 bits), [21:11] x, [10:0] y; EVT_TIME_HIGH 0x8 =
  [27:0] time MSBs (t = high << 6 | low); EXT_TRIGGER 0xA = [27:22] time LSBs, [12:8] id, [0] value; OTHERS 0xE,
  CONTINUED 0xF.
- EVT 2.1, 64-bit: EVT_NEG 0x0 / EVT_POS 0x1 = [59:54] time LSBs, [53:43] x (a multiple of 32), [42:32] y, [31:0]
  validity mask of pixels x .. x+31; EVT_TIME_HIGH 0x8 = [59:32]; EXT_TRIGGER 0xA = [59:54] time, [44:40] id, [32]
  value. `% format EVT21_LEGACY` files hold each word as two 32-bit halves, high half first (IMX636 order).
- EVT 3.0, 16-bit and stateful: EVT_ADDR_Y 0x0 = [10:0] y; EVT_ADDR_X 0x2 = [11] polarity, [10:0] x (one event);
  VECT_BASE_X 0x3 = [11] polarity, [10:0] base x; VECT_12 0x4 / VECT_8 0x5 = validity masks of pixels base .. base+11
  / +7, after which base advances by 12 / 8; EVT_TIME_LOW 0x6 and EVT_TIME_HIGH 0x8 = the low and high 12 bits of a
  24-bit µs time that wraps every 16.8 s (extended here to 64 bits); CONTINUED_4 0x7, EXT_TRIGGER 0xA = [11:8] id,
  [0] value; OTHERS 0xE, CONTINUED_12 0xF.

Decoding is vectorised per chunk and allocates by the event, not by the word: a chunk splits into the words
that emit events and the words that set state, each state value (time, row, vector base) is repeated once over
the events that follow it, and no per-word time or coordinate array is built. The big temporaries live in
per-thread scratch memory reused from chunk to chunk (fresh pages cost a fault each), and large EVT 2.0 chunks are
decoded in pieces on a few threads. The decoder state (time base, y, vector base, polarity) carries across chunks,
so a file of any size is read in bounded memory and chunked decoding equals whole-file decoding. A time high
that goes back by less than half its range is an error (a real wrap goes from near the top to near zero).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ems_yolo.events.io import EVENT_DTYPE, EventFileError, check_sensor_size
from ems_yolo.utils.files import atomic_write

TRIGGER_DTYPE = np.dtype([("t", "<i8"), ("id", "u1"), ("value", "u1")])
"""External trigger events: time in µs, trigger channel, edge value (never mixed into CD events)."""

WORD_BYTES = {"EVT2": 4, "EVT21": 8, "EVT3": 2}
_EVT_VERSIONS = {"2.0": "EVT2", "2.1": "EVT21", "3.0": "EVT3"}
# Sensor size by the sensor name in a plugin name (`hal_plugin_gen41_evk3`) or `% sensor_name`: (width, height).
SENSOR_SIZES = {"gen31": (640, 480), "gen3": (640, 480), "gen41": (1280, 720), "gen4": (1280, 720),
                "imx636": (1280, 720), "imx646": (1280, 720), "genx320": (320, 320), "imx8": (320, 320),
                "atis": (304, 240), "gen1": (304, 240)}
DECODE_THREADS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
PARALLEL_MIN_EVENTS = 1 << 17  # chunks with fewer CD events decode in the calling thread only
DEFAULT_CHUNK_BYTES = 1 << 20  # also the granularity of the sparse index (windowed reads decode about one chunk)
FULL_READ_CHUNK_BYTES = 1 << 22  # whole reads: few chunks (fewer copies), scratch memory bounded by one
FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK_BYTES = 8, 1 << 16  # the sampled content an index is keyed by
SCRATCH_MAX_BYTES = 1 << 24  # the largest decoder temporary kept per thread (a 4 MiB chunk: about 50 MiB in all)


@dataclass(frozen=True)
class RawHeader:
    """Parsed `.raw` header: encoding ("EVT2", "EVT21", "EVT3"), sensor size (None when the header does not tell),
    where the data starts, and every `% key value` line."""

    path: Path
    encoding: str
    width: int | None
    height: int | None
    data_offset: int
    fields: dict[str, str]
    legacy_evt21: bool = False

    @property
    def word_bytes(self) -> int:
        return WORD_BYTES[self.encoding]


def _sensor_size(fields: dict[str, str], fmt: dict[str, str]) -> tuple[int | None, int | None]:
    if "width" in fmt and "height" in fmt:
        return int(fmt["width"]), int(fmt["height"])
    geometry = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", fields.get("geometry", ""))
    if geometry:
        return int(geometry.group(1)), int(geometry.group(2))
    names = " ".join(fields.get(k, "") for k in ("sensor_name", "plugin_name", "sensor_generation")).lower()
    for sensor, size in SENSOR_SIZES.items():  # longer names first in the table (gen31 before gen3)
        if re.search(rf"(?<![a-z0-9]){sensor}(?![0-9])", names.replace(".", "")):
            return size
    return None, None


def read_raw_header(path: str | os.PathLike) -> RawHeader:
    """Parse the `% key value` lines (up to `% end` or the first non-header byte) of a `.raw` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: event recording not found")
    fields: dict[str, str] = {}
    offset = 0
    with path.open("rb") as f:
        while True:
            f.seek(offset)
            if f.read(1) != b"%":
                break
            line = b"%" + f.readline()
            if not line.endswith(b"\n"):
                raise EventFileError(path, offset, "header line not terminated (the file ends inside the header), "
                                                   "expected '% key value' lines then the event data")
            text = line[1:].decode("latin-1").strip()
            offset += len(line)
            if text == "end":
                break
            key, _, value = text.partition(" ")
            fields[key] = value.strip()
    fmt_text = fields.get("format", "")
    fmt = dict(kv.split("=", 1) for kv in fmt_text.split(";")[1:] if "=" in kv)
    name = fmt_text.split(";")[0].strip().upper()
    if name:
        encoding = {"EVT2": "EVT2", "EVT21": "EVT21", "EVT21_LEGACY": "EVT21", "EVT3": "EVT3"}.get(name)
        if encoding is None:
            raise EventFileError(path, 0, f"header format {name!r} is not supported, expected EVT2, EVT21 or EVT3")
    elif "evt" in fields:
        encoding = _EVT_VERSIONS.get(fields["evt"])
        if encoding is None:
            raise EventFileError(path, 0, f"header 'evt {fields['evt']}' is not supported, expected 2.0, 2.1 or 3.0")
    else:
        raise EventFileError(path, 0, "header declares no encoding, expected '% evt 2.0|2.1|3.0' or "
                                      "'% format EVT3;...'")
    width, height = _sensor_size(fields, fmt)
    check_sensor_size(path, "header geometry/format", width, height)
    return RawHeader(path, encoding, width, height, offset, fields, legacy_evt21=name == "EVT21_LEGACY")


@dataclass
class DecoderState:
    """What an EVT decoder carries from one word to the next: the extended time high and its last raw value, the
    time low, and (EVT 3.0) the row, vector base and polarity. `offset` is the byte offset of the next word."""

    offset: int
    time_high: int = 0
    last_high: int | None = None
    time_low: int = 0
    y: int = 0
    base_x: int = 0
    polarity: int = 0


@dataclass
class Decoded:
    """One chunk's CD events and triggers, and the state after it."""

    events: np.ndarray
    triggers: np.ndarray
    state: DecoderState = field(repr=False)


def _ffill(pos: np.ndarray, values: np.ndarray, initial: int, n: int) -> np.ndarray:
    """For each of `n` words, the value of the last of the words at sorted indices `pos` up to and including it
    (`values[k]` belongs to word `pos[k]`), else `initial`: one `np.repeat`, no per-word search."""
    if not pos.size:
        return np.full(n, initial, dtype=np.int64)
    return np.repeat(np.concatenate(([initial], values)).astype(np.int64), _runs(pos, n))


def _type_table(allowed: tuple) -> np.ndarray:
    table = np.zeros(16, bool)
    table[list(allowed)] = True
    return table


def _check_types(kind: np.ndarray, table: np.ndarray, state: DecoderState, header: RawHeader) -> None:
    bad = np.flatnonzero(~table[kind])
    if bad.size:
        i = int(bad[0])
        allowed = ", ".join(f"0x{a:X}" for a in np.flatnonzero(table))
        raise EventFileError(header.path, state.offset + i * header.word_bytes, f"word type 0x{int(kind[i]):X} is "
                             f"not an {header.encoding} word type, expected one of {allowed}")


def _time_high(words_hi: np.ndarray, pos: np.ndarray, bits: int, state: DecoderState, header: RawHeader) -> np.ndarray:
    """Raw time-high values (at word indices `pos`) -> extended values, wraps counted, `state` updated; a backward
    step that is not a wrap (less than half the range back) is an error."""
    raw = words_hi.astype(np.int64)
    if not raw.size:
        return raw
    first = state.last_high if state.last_high is not None else int(raw[0])
    step = np.diff(raw, prepend=first)
    wraps = step < -(1 << (bits - 1))
    back = np.flatnonzero((step < 0) & ~wraps)
    if back.size:
        i = int(back[0])
        before = int(raw[i - 1]) if i else first
        raise EventFileError(header.path, state.offset + int(pos[i]) * header.word_bytes,
                             f"time goes backwards (time high {before} -> {int(raw[i])}), expected non-decreasing time")
    base = 0 if state.last_high is None else state.time_high - state.last_high
    ext = raw + base
    if wraps.any():
        ext += np.cumsum(wraps, dtype=np.int64) << bits
    state.time_high, state.last_high = int(ext[-1]), int(raw[-1])
    return ext


def _outside(x: np.ndarray, xy: np.ndarray, header: RawHeader) -> int | None:
    """The first event outside the sensor (x coordinates, and words with y in the high 16 bits), found with two
    max() reductions when there is none."""
    if header.width is None or not x.size:
        return None
    if int(x.max()) < header.width and int(xy.max()) >> 16 < header.height:
        return None
    return int(np.flatnonzero((x >= header.width) | (xy >> 16 >= header.height))[0])


def _outside_error(x: np.ndarray, xy: np.ndarray, i: int, word: int, state: DecoderState,
                   header: RawHeader) -> EventFileError:
    return EventFileError(header.path, state.offset + word * header.word_bytes,
                          f"event at x={int(x[i])}, y={int(xy[i]) >> 16} is outside the {header.width}x"
                          f"{header.height} sensor, expected coordinates inside it")


def _store(out: np.ndarray, t: np.ndarray, xy: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Write CD events into `out`: times, `x | y << 16` words (x and y in one 4-byte store) and polarities."""
    out["t"] = t
    out["p"] = p
    out.view(np.uint8).reshape(-1, EVENT_DTYPE.itemsize)[:, 8:12].view("<u4")[:, 0] = xy  # <u2 x, then <u2 y
    return out


def _pack(t: np.ndarray, xyp: np.ndarray, word_of, state: DecoderState, header: RawHeader) -> np.ndarray:
    """CD events from times and `x | p << 15 | y << 16` words (consumed), checked against the sensor size;
    `word_of(i)`, the word index of event i, is asked for the error message only."""
    x = xyp & 0x7FFF
    bad = _outside(x, xyp, header)
    if bad is not None:
        raise _outside_error(x, xyp, bad, int(word_of(bad)), state, header)
    p = np.right_shift(xyp, 15, out=x)
    p &= 1
    xyp &= 0xFFFF7FFF
    return _store(np.empty(len(t), EVENT_DTYPE), t, xyp, p)


_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (the process that made it, the pool)


def _in_threads(fn, items: list) -> list:
    """`[fn(item) for item in items]`, the first in the calling thread and the others in the decoder's thread pool
    (numpy lets go of the GIL in its loops). The pool belongs to one process: a forked DataLoader worker makes its
    own."""
    global _POOL
    if len(items) == 1:
        return [fn(items[0])]
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(DECODE_THREADS - 1, thread_name_prefix="ems-yolo-decode"))
    futures = [_POOL[1].submit(fn, item) for item in items[1:]]
    first = fn(items[0])
    return [first, *(f.result() for f in futures)]


def _triggers(t, ids, values) -> np.ndarray:
    out = np.empty(len(t), TRIGGER_DTYPE)
    out["t"], out["id"], out["value"] = t, ids, values
    return out


def _narrow(times: np.ndarray, low_bits: int = 0) -> np.ndarray:
    """`times` (µs, with `low_bits` still to be OR-ed in) as uint32 when they all stay below 2^32 µs, the first 71
    minutes of a recording: half the bytes to spread over the events, and a cheaper store. Else as they are."""
    if times.size and int(times.min()) >= 0 and int(times.max()) | ((1 << low_bits) - 1) < 1 << 32:
        return times.astype(np.uint32)
    return times


def _runs(starts: np.ndarray, total: int) -> np.ndarray:
    """Lengths of the runs that `starts` (non-decreasing positions in 0..total) cut 0..total into, the run before
    the first start included: the repeat counts that spread one value per run over the positions."""
    return np.diff(starts, prepend=0, append=total)


def _spread(values: np.ndarray, starts: np.ndarray, initial: int, n: int) -> np.ndarray:
    """int32 array of n: `initial`, then from each (non-decreasing) start on the value starting there (the last of
    equal starts). A cumulative sum of the changes, in scratch memory (valid until the next call): cheaper than
    `_ffill`'s repeat when the runs are many and short."""
    keep = np.flatnonzero(np.diff(starts, append=n) != 0)  # the last value of each start before n
    out = _scratch("spread", n, np.int32)
    out.fill(0)
    if n:
        out[starts[keep]] = np.diff(values[keep], prepend=initial)
        out[0] += initial
    return np.cumsum(out, dtype=np.int32, out=out)


_EVT2_TYPES = _type_table((0x0, 0x1, 0x8, 0xA, 0xE, 0xF))
_EVT3_TYPES = _type_table((0x0, 0x2, 0x3, 0x4, 0x5, 0x6, 0x7, 0x8, 0xA, 0xE, 0xF))
_BITS_32 = np.arange(32, dtype=np.uint32)


def decode_evt2(words: np.ndarray, state: DecoderState, header: RawHeader) -> Decoded:
    """EVT 2.0 words (uint32) -> CD events and triggers. The CD words are compressed out once; their time highs are
    one repeat of the TIME_HIGH values over the runs of CD words between them (no per-word time array). A large
    chunk is cut at TIME_HIGH words into pieces decoded on DECODE_THREADS threads, straight into one output."""
    state = replace(state)  # the caller's state is left as it was (the index keeps it)
    n = words.size
    is_cd = np.less(words, 0x20000000, out=_scratch("is_cd", n, bool))  # CD_OFF 0x0, CD_ON 0x1
    is_hi = np.greater_equal(words, 0x80000000, out=_scratch("is_hi", n, bool))  # TIME_HIGH 0x8 and the kinds above
    n_cd = int(np.count_nonzero(is_cd))
    others = None  # EXT_TRIGGER, OTHERS, CONTINUED (rare): looked at only when present
    if n_cd + int(np.count_nonzero(is_hi)) != n or (n_cd < n and int(words.max()) >= 0x90000000):
        kind = words >> 28
        _check_types(kind.astype(np.uint8), _EVT2_TYPES, state, header)
        np.equal(kind, 0x8, out=is_hi)
        others = np.flatnonzero(kind >= 0xA)
    hi = np.flatnonzero(is_hi)
    highs = np.concatenate(([state.time_high], _time_high(words[hi] & 0x0FFFFFFF, hi, 28, state, header)))
    cd_before = hi - np.arange(hi.size)  # CD words before each TIME_HIGH
    if others is not None:
        cd_before -= np.searchsorted(others, hi)
    runs = _runs(cd_before, n_cd)  # CD events under each time high (the carried one first)
    events = np.empty(n_cd, EVENT_DTYPE)
    pieces = _evt2_pieces(hi, runs, n, DECODE_THREADS if n_cd >= PARALLEL_MIN_EVENTS else 1)
    bad = _in_threads(lambda piece: _evt2_piece(words, is_cd, highs, runs, events, header, *piece), pieces)
    for (w0, w1, *_), b in zip(pieces, bad):
        if b is not None:
            i, x, xy = b
            raise _outside_error(x, xy, i, w0 + int(np.flatnonzero(is_cd[w0:w1])[i]), state, header)
    triggers = np.empty(0, TRIGGER_DTYPE)
    if others is not None:
        trig = others[words[others] >> 28 == 0xA]
        tw = words[trig]
        triggers = _triggers((highs[np.searchsorted(hi, trig)] << 6) | (tw >> 22 & 0x3F), tw >> 8 & 0x1F, tw & 1)
    state.offset += words.size * 4
    return Decoded(events, triggers, state)


def _evt2_pieces(hi: np.ndarray, runs: np.ndarray, n: int, parts: int) -> list[tuple[int, int, int, int, int]]:
    """Up to `parts` pieces of about equal CD counts, cut at TIME_HIGH words: (first word, end word, first time
    high, end time high, first CD event)."""
    before = np.concatenate(([0], np.cumsum(runs)))  # CD events before each time high's run
    cuts = np.unique(np.searchsorted(before, np.arange(1, parts) * before[-1] / parts).clip(1, runs.size - 1))
    cuts = [0, *cuts.tolist(), runs.size] if runs.size > 1 else [0, runs.size]
    word = [0, *(int(hi[v - 1]) for v in cuts[1:-1]), n]
    return [(word[k], word[k + 1], cuts[k], cuts[k + 1], int(before[cuts[k]])) for k in range(len(cuts) - 1)]


def _evt2_piece(words, is_cd, highs, runs, events, header, w0, w1, v0, v1, c0):
    """Decode the CD words of words[w0:w1] (time highs v0:v1) into events[c0:...]; the first event outside the
    sensor comes back (with the x and x | y << 16 words) instead of being written."""
    w = words[w0:w1][is_cd[w0:w1]]  # (boolean indexing: three times np.compress, where nearly every word is kept)
    n_cd = w.size
    t = np.repeat(_narrow(highs[v0:v1] << 6, low_bits=6), runs[v0:v1])
    a = np.right_shift(w, 22, out=_scratch("a", n_cd, np.uint32))
    a &= 0x3F
    t |= a
    p = np.right_shift(w, 28, out=_scratch("p", n_cd, np.uint32))  # CD_OFF 0, CD_ON 1
    x = np.right_shift(w, 11, out=a)
    x &= 0x7FF
    w <<= 16  # y (bits 10:0) up to bits 26:16
    w &= 0x07FF0000
    w |= x
    bad = _outside(x, w, header)
    if bad is not None:
        return bad, x, w
    _store(events[c0:c0 + n_cd], t, w, p)
    return None


def decode_evt21(words: np.ndarray, state: DecoderState, header: RawHeader) -> Decoded:
    """EVT 2.1 words (uint64) -> CD events (32-pixel masks expanded, in pixel order) and triggers."""
    state = replace(state)
    kind = (words >> np.uint64(60)).astype(np.uint8)
    _check_types(kind, _EVT2_TYPES, state, header)
    hi = np.flatnonzero(kind == 0x8)
    raw_hi = (words[hi] >> np.uint64(32)) & np.uint64(0x0FFFFFFF)
    initial = state.time_high
    high = _ffill(hi, _time_high(raw_hi, hi, 28, state, header), initial, words.size)
    cd = np.flatnonzero(kind <= 1)
    w = words[cd]
    mask = (w & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    row, col = np.nonzero((mask[:, None] >> _BITS_32) & 1)
    w = w[row]
    t = (high[cd][row] << 6) | ((w >> np.uint64(54)) & np.uint64(0x3F)).astype(np.int64)
    x = ((w >> np.uint64(43)) & np.uint64(0x7FF)).astype(np.int64) + col
    y = ((w >> np.uint64(32)) & np.uint64(0x7FF)).astype(np.int64)
    xyp = (x | kind[cd][row].astype(np.int64) << 15 | y << 16).astype(np.uint32)
    events = _pack(t, xyp, lambda i: cd[row[i]], state, header)
    trig = np.flatnonzero(kind == 0xA)
    tw = words[trig]
    triggers = _triggers((high[trig] << 6) | ((tw >> np.uint64(54)) & np.uint64(0x3F)).astype(np.int64),
                         (tw >> np.uint64(40)) & np.uint64(0x1F), (tw >> np.uint64(32)) & np.uint64(1))
    state.offset += words.size * 8
    return Decoded(events, triggers, state)


def _evt3_times(sk: np.ndarray, sp: np.ndarray, spos: np.ndarray, state: DecoderState, header: RawHeader):
    """The TIME_LOW / TIME_HIGH words of the state stream (kinds `sk`, payloads `sp`, word indices `spos`): their
    indices in it and the 64-bit µs time from each on, with the carried time first."""
    ti = np.flatnonzero((sk == 0x6) | (sk == 0x8))
    is_hi = sk[ti] == 0x8
    initial_high, initial_low = state.time_high, state.time_low
    ext = _time_high(sp[ti[is_hi]], spos[ti[is_hi]], 12, state, header)
    high = _ffill(np.flatnonzero(is_hi), ext, initial_high, ti.size)
    low = _ffill(np.flatnonzero(~is_hi), sp[ti[~is_hi]], initial_low, ti.size)
    if ti.size:
        state.time_low = int(low[-1])
    return ti, np.concatenate(([(initial_high << 12) | initial_low], (high << 12) | low))


def decode_evt3(words: np.ndarray, state: DecoderState, header: RawHeader) -> Decoded:
    """EVT 3.0 words (uint16) -> CD events (single and vector events in file order) and triggers.

    The words split into two streams: the emitting ones (ADDR_X, VECT_12, VECT_8) and the state ones (ADDR_Y,
    VECT_BASE_X, TIME_LOW/HIGH, triggers). Each state word knows how many emitting words, hence events, come
    before it, so time and row are one repeat each over the events, and the vector base one over the vector
    words; a vector's pixels are its set bits, taken lowest first, one pass per bit rank (rarely more than 4)."""
    state = replace(state)
    n = words.size
    kind = np.right_shift(words, 12, out=_scratch("kind", n, np.uint16))
    is_emit = np.equal(kind, 0x2, out=_scratch("is_emit", n, bool))  # ADDR_X, VECT_12, VECT_8
    vector = np.less(np.subtract(kind, 0x4, out=kind), 2, out=_scratch("mask", n, bool))  # kinds below 4 wrap
    is_emit |= vector
    ew = np.compress(is_emit, words, out=_scratch("ew", int(np.count_nonzero(is_emit)), np.uint16))
    spos = np.flatnonzero(np.logical_not(is_emit, out=vector))  # word index of each state word
    sw = words[spos]
    sk, sp = sw >> 12, sw & 0xFFF
    if not _EVT3_TYPES[sk].all():
        _check_types((words >> 12).astype(np.uint8), _EVT3_TYPES, state, header)
    emit_before = spos - np.arange(spos.size)  # emitting words before each state word
    # events per emitting word: 1 for ADDR_X, the set bits of a vector's mask
    ek = np.right_shift(ew, 12, out=_scratch("ek", ew.size, np.uint16))
    vec = np.flatnonzero(ek != 0x2)
    vk, vmask = ek[vec], ew[vec] & 0xFFF
    vmask[vk == 0x5] &= 0xFF
    ev_before = _scratch("ev_before", ew.size + 1, np.intp)  # events before emitting word j
    counts = ev_before[1:]
    counts.fill(1)
    counts[vec] = np.bitwise_count(vmask)
    ev_before[0] = 0
    np.cumsum(counts, out=counts)
    n_ev = int(ev_before[-1])
    # time, from the state stream, over the events
    ti, times = _evt3_times(sk, sp, spos, state, header)
    t = np.repeat(_narrow(times), _runs(ev_before[emit_before[ti]], n_ev))
    # x | p << 15 | y << 16 of each emitting word: the last ADDR_Y's row, and x and p of an ADDR_X
    yi = np.flatnonzero(sk == 0x0)
    rows = sp[yi] & 0x7FF
    xyp = _spread(rows.astype(np.int32) << 16, emit_before[yi], state.y << 16, ew.size).view(np.uint32)
    xyp |= ew & 0x7FF
    xyp |= (ew & 0x800) << 4
    if yi.size:
        state.y = int(rows[-1])
    # vector base and polarity: the last VECT_BASE_X (state stream), plus 12 / 8 per vector word since it
    bi = np.flatnonzero(sk == 0x3)
    bases = np.concatenate(([state.base_x], sp[bi] & 0x7FF))
    polarities = np.concatenate(([state.polarity], sp[bi] >> 11))
    after_base = _runs(np.searchsorted(vec, emit_before[bi]), vec.size)  # vector words after each base
    which = np.repeat(np.arange(bi.size + 1), after_base)  # the base of each vector word (0: carried)
    step = np.where(vk == 0x4, 12, 8)
    stepped = np.cumsum(step) - step  # steps before each vector word
    first = np.concatenate(([0], np.cumsum(after_base)))[which]  # the first vector word of its base
    base_x = bases[which] + stepped - stepped[first]
    if vec.size and int(base_x.max()) > 0x7FFF - 12:
        i = int(np.flatnonzero(base_x > 0x7FFF - 12)[0])
        raise EventFileError(header.path, state.offset + int(np.flatnonzero(is_emit)[vec[i]]) * 2,
                             f"vector base x={int(base_x[i])} after {i} vector words, expected an x address below "
                             "2048 (a VECT_BASE_X before the vectors)")
    if bi.size:
        state.polarity = int(polarities[-1])
    if vec.size and which[-1] == bi.size:  # the last base has vectors after it
        state.base_x = int(base_x[-1] + step[-1])
    elif bi.size:
        state.base_x = int(bases[-1])
    # the events: each ADDR_X at its slot (vector words to a spare slot past the end), then the vectors' pixels,
    # their set bits lowest first, one pass per bit rank
    at = _scratch("at", ew.size, np.intp)
    at[:] = ev_before[:-1]
    at[vec] = n_ev
    packed = _scratch("packed", n_ev + 1, np.uint32)
    packed[at] = xyp
    lit = np.flatnonzero(vmask)
    slot, masks = ev_before[vec[lit]], vmask[lit]
    head = (xyp[vec[lit]] & 0xFFFF0000) | (base_x[lit] | polarities[which[lit]] << 15).astype(np.uint32)
    while slot.size:
        packed[slot] = head + np.bitwise_count((masks & (~masks + 1)) - 1)
        masks &= masks - 1
        more = np.flatnonzero(masks)
        slot, masks, head = slot[more] + 1, masks[more], head[more]
    events = _pack(t, packed[:n_ev], lambda i: _evt3_word_of_event(i, is_emit, ev_before), state, header)
    tri = np.flatnonzero(sk == 0xA)
    triggers = _triggers(times[np.searchsorted(ti, tri)], sp[tri] >> 8 & 0xF, sp[tri] & 1)
    state.offset += n * 2
    return Decoded(events, triggers, state)


def _evt3_word_of_event(i: int, is_emit: np.ndarray, ev_before: np.ndarray) -> int:
    """The word index of event i: its emitting word (the last with fewer events before it)."""
    j = int(np.searchsorted(ev_before, i, side="right")) - 1
    return int(np.flatnonzero(is_emit)[j])


class _Scratch(threading.local):
    """Per-thread scratch memory of the decoders, kept from chunk to chunk and read to read. A decode's temporaries
    are several times its output, and fresh pages cost a page fault each (microseconds in a virtual machine): the
    cost a C decoder writing into one buffer does not pay. Buffers over SCRATCH_MAX_BYTES are not kept."""

    def __init__(self):
        self.buffers: dict[str, np.ndarray] = {}

    def __call__(self, name: str, n: int, dtype) -> np.ndarray:
        """An uninitialised array of n `dtype` items, valid until the next call with the same name."""
        dtype = np.dtype(dtype)
        nbytes = n * dtype.itemsize
        if nbytes > SCRATCH_MAX_BYTES:
            return np.empty(n, dtype)
        buf = self.buffers.get(name)
        if buf is None or buf.size < nbytes:
            buf = self.buffers[name] = np.empty(max(nbytes, 64), np.uint8)
        return buf[:nbytes].view(dtype)


_scratch = _Scratch()


DECODERS = {"EVT2": (decode_evt2, "<u4"), "EVT21": (decode_evt21, "<u8"), "EVT3": (decode_evt3, "<u2")}


class RawReader:
    """Streaming reader of a `.raw` file: `chunks()` decodes it piece by piece in bounded memory (the decoder state
    carries across chunk borders, and a word split by a border is completed by the next chunk)."""

    def __init__(self, path: str | os.PathLike, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.header = read_raw_header(path)
        self.path = self.header.path
        self.size = self.path.stat().st_size
        word = self.header.word_bytes
        self.chunk_bytes = chunk_bytes // word * word or chunk_bytes  # whole words (smaller chunks split words)
        tail = (self.size - self.header.data_offset) % word
        if tail:
            raise EventFileError(self.path, self.size - tail, f"truncated final word ({tail} of {word} bytes), "
                                 f"expected whole {self.header.encoding} words")

    def _words(self, raw: np.ndarray) -> np.ndarray:
        dtype = DECODERS[self.header.encoding][1]
        if self.header.encoding == "EVT21" and self.header.legacy_evt21:
            halves = raw.view("<u4").astype(np.uint64)
            return (halves[0::2] << np.uint64(32)) | halves[1::2]
        return raw.view(dtype)

    def chunks(self, state: DecoderState | None = None, chunk_bytes: int | None = None) -> Iterator[Decoded]:
        """Decoded chunks (of `chunk_bytes`, default the reader's) from `state` (default: the start of the data) to
        the end of the file. The bytes are read into the thread's scratch memory (a chunk is decoded before the
        next is read), a word cut by a chunk border completed from the next."""
        decode = DECODERS[self.header.encoding][0]
        size = chunk_bytes or self.chunk_bytes
        state = state or DecoderState(offset=self.header.data_offset)
        pending = b""
        word = self.header.word_bytes
        with self.path.open("rb") as f:
            f.seek(state.offset)
            while (want := min(size, self.size - f.tell())) > 0:  # never more than is left
                buf = _scratch("read", len(pending) + want, np.uint8)
                buf[:len(pending)] = np.frombuffer(pending, np.uint8)
                got = len(pending) + f.readinto(memoryview(buf)[len(pending):])
                whole = got // word * word
                pending = buf[whole:got].tobytes()
                if whole:
                    decoded = decode(self._words(buf[:whole]), state, self.header)
                    state = decoded.state
                    yield decoded

    def read(self, t_start: int | None = None, t_end: int | None = None,
             triggers: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Events with t_start <= t < t_end (µs; None = unbounded), and the triggers of that window if asked.
        Time windows start decoding at the indexed chunk before `t_start` and stop after `t_end`."""
        start, size = None, max(self.chunk_bytes, FULL_READ_CHUNK_BYTES)  # a whole read: few, large chunks
        if t_start is not None:
            start, size = RawIndex.for_reader(self).state_before(t_start), None
        events, trig = [], []
        for d in self.chunks(start, size):
            events.append(_window(d.events, t_start, t_end))
            trig.append(_window(d.triggers, t_start, t_end))
            if t_end is not None and d.events.size and d.events["t"][-1] >= t_end:
                break
        ev = events[0] if len(events) == 1 else np.concatenate(events) if events else np.empty(0, EVENT_DTYPE)
        tr = trig[0] if len(trig) == 1 else np.concatenate(trig) if trig else np.empty(0, TRIGGER_DTYPE)
        return (ev, tr) if triggers else ev


def _window(a: np.ndarray, t_start: int | None, t_end: int | None) -> np.ndarray:
    if t_start is None and t_end is None:
        return a
    keep = np.ones(a.size, bool)
    if t_start is not None:
        keep &= a["t"] >= t_start
    if t_end is not None:
        keep &= a["t"] < t_end
    return a[keep]


@dataclass
class RawIndex:
    """Sparse index of a `.raw` file: the decoder state at the start of every chunk, the first event time in it and
    the file's last event time, built in one pass and kept in the ems-yolo cache (never beside the user's file),
    keyed by the file's identity (whole resolved path, size, modification time, inode, sampled content)."""

    states: list[DecoderState]
    first_t: np.ndarray
    last_t: int = -1
    events: int = 0

    @classmethod
    def build(cls, reader: RawReader) -> RawIndex:
        states, first, last, count = [], [], -1, 0
        state = DecoderState(offset=reader.header.data_offset)
        for d in reader.chunks(state):
            states.append(state)
            first.append(int(d.events["t"][0]) if d.events.size else -1)
            if d.events.size:
                last, count = max(last, int(d.events["t"].max())), count + d.events.size
            state = d.state
        first_t = np.array(first, np.int64)
        following = np.iinfo(np.int64).max  # a chunk without events takes the next chunk's first time
        for i in range(len(first_t) - 1, -1, -1):
            if first_t[i] < 0:
                first_t[i] = following
            following = first_t[i]
        return cls(states, first_t, last, count)

    @staticmethod
    def location(path: Path) -> Path:
        """Where the index of `path` is kept: named by a hash of the whole resolved path (distinct files never
        share one)."""
        from ems_yolo.cfg import ems_home

        key = hashlib.sha256(os.fsencode(path.resolve())).hexdigest()
        return ems_home() / "raw-index" / f"{key}.npz"

    @classmethod
    def for_reader(cls, reader: RawReader) -> RawIndex:
        """Load the index of the reader's file, or build and save it. A saved index is used only for the same
        file: its size, modification time, inode and a hash of sampled content (header, first and last blocks)."""
        st = reader.path.stat()
        stamp = np.concatenate((np.array([st.st_size, st.st_mtime_ns, st.st_ino, reader.chunk_bytes], np.int64),
                                _fingerprint(reader.path, st.st_size)))
        where = cls.location(reader.path)
        try:
            with np.load(where) as z:
                if np.array_equal(z["stamp"], stamp):
                    return cls._from_arrays(z)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # none yet, or unreadable: rebuilt
            pass
        index = cls.build(reader)
        cols = ("offset", "time_high", "time_low", "y", "base_x", "polarity")
        table = np.array([[getattr(s, c) for c in cols] + [-1 if s.last_high is None else s.last_high]
                          for s in index.states], np.int64).reshape(-1, len(cols) + 1)

        def write(f):
            np.savez(f, stamp=stamp, table=table, first_t=index.first_t, totals=np.array([index.last_t, index.events]))

        atomic_write(where, write)
        return index

    @classmethod
    def _from_arrays(cls, z) -> RawIndex:
        states = [DecoderState(offset=int(r[0]), time_high=int(r[1]), time_low=int(r[2]), y=int(r[3]),
                               base_x=int(r[4]), polarity=int(r[5]), last_high=None if r[6] < 0 else int(r[6]))
                  for r in z["table"]]
        last_t, events = (int(v) for v in z["totals"])
        return cls(states, z["first_t"].copy(), last_t, events)

    def state_before(self, t: int) -> DecoderState | None:
        """The state at the start of the last chunk whose first event is before `t` (None: the file start)."""
        i = int(np.searchsorted(self.first_t, t, side="left")) - 1
        return replace(self.states[max(i, 0)]) if self.states else None


def _fingerprint(path: Path, size: int) -> np.ndarray:
    """SHA-256 (as 32 int64 values) of FINGERPRINT_BLOCKS blocks spread evenly over the file, the first (with the
    header) and the last included: the whole file up to 512 KiB."""
    digest = hashlib.sha256()
    starts = np.linspace(0, max(size - FINGERPRINT_BLOCK_BYTES, 0), FINGERPRINT_BLOCKS).astype(np.int64)
    with open(path, "rb") as f:
        for start in np.unique(starts):
            f.seek(int(start))
            digest.update(f.read(FINGERPRINT_BLOCK_BYTES))
    return np.frombuffer(digest.digest(), np.uint8).astype(np.int64)


def read_raw(path: str | os.PathLike, t_start: int | None = None, t_end: int | None = None,
             triggers: bool = False):
    """Decode a `.raw` recording (EVT 2.0, 2.1 or 3.0) as EVENT_DTYPE events, optionally with its triggers."""
    return RawReader(path).read(t_start, t_end, triggers)


def encode_evt2(events: np.ndarray) -> bytes:
    """EVT 2.0 words for CD events with non-decreasing integer t (a TIME_HIGH word whenever t >> 6 changes)."""
    t = events["t"].astype(np.int64)
    if t.size and (t[0] < 0 or np.any(np.diff(t) < 0)):
        raise ValueError("events must have non-negative, non-decreasing t to be written as EVT 2.0")
    high = t >> 6
    new_high = np.concatenate(([True], high[1:] != high[:-1])) if t.size else np.zeros(0, bool)
    cd = ((events["p"].astype(np.uint32) & 1) << 28) | ((t & 0x3F).astype(np.uint32) << 22) \
        | (events["x"].astype(np.uint32) << 11) | events["y"].astype(np.uint32)
    th = (0x8 << 28) | (high & 0x0FFFFFFF).astype(np.uint32)
    words = np.empty(t.size + int(new_high.sum()), np.uint32)
    pos = np.arange(t.size) + np.cumsum(new_high)  # each event after its TIME_HIGH
    words[pos] = cd
    words[pos[new_high] - 1] = th[new_high]
    return words.astype("<u4").tobytes()


def write_raw_evt2(path: str | os.PathLike, events: np.ndarray, width: int, height: int) -> Path:
    """Write CD events as an EVT 2.0 `.raw` file (atomic) that Prophesee's tools and `read_raw` read."""
    if events.size and (int(events["x"].max()) >= width or int(events["y"].max()) >= height):
        raise ValueError(f"events outside the {width}x{height} sensor cannot be written")
    header = evt2_header(width, height)
    body = encode_evt2(events)
    return atomic_write(path, lambda f: (f.write(header), f.write(body)))


def evt2_header(width: int, height: int) -> bytes:
    """The header of an EVT 2.0 `.raw` file written by ems-yolo (`encode_evt2` words follow it)."""
    return (f"% evt 2.0\n% format EVT2;height={height};width={width}\n% geometry {width}x{height}\n"
            "% integrator_name ems-yolo\n% end\n").encode("ascii")
