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

Decoding is vectorised per chunk (state forward-filled with cumulative maxima of word indices, vector masks
expanded as bit matrices); the decoder state (time base, y, vector base, polarity) carries across chunks, so a
file of any size is read in bounded memory and chunked decoding equals whole-file decoding. A time high that goes
back by less than half its range is an error (a real wrap goes from near the top to near zero).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ems_yolo.events.io import EVENT_DTYPE, EventFileError
from ems_yolo.utils.files import atomic_write

TRIGGER_DTYPE = np.dtype([("t", "<i8"), ("id", "u1"), ("value", "u1")])
"""External trigger events: time in µs, trigger channel, edge value (never mixed into CD events)."""

WORD_BYTES = {"EVT2": 4, "EVT21": 8, "EVT3": 2}
_EVT_VERSIONS = {"2.0": "EVT2", "2.1": "EVT21", "3.0": "EVT3"}
# Sensor size by the sensor name in a plugin name (`hal_plugin_gen41_evk3`) or `% sensor_name`: (width, height).
SENSOR_SIZES = {"gen31": (640, 480), "gen3": (640, 480), "gen41": (1280, 720), "gen4": (1280, 720),
                "imx636": (1280, 720), "imx646": (1280, 720), "genx320": (320, 320), "imx8": (320, 320),
                "atis": (304, 240), "gen1": (304, 240)}
DEFAULT_CHUNK_BYTES = 1 << 20  # also the granularity of the sparse index (windowed reads decode about one chunk)
FULL_READ_CHUNK_BYTES = 1 << 24  # unbounded reads return everything anyway: fewer chunks, fewer copies


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
    lengths = np.diff(pos, prepend=0, append=n)
    return np.repeat(np.concatenate(([initial], values)).astype(np.int64), lengths)


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


def _events(t, x, y, p, rows: np.ndarray, state: DecoderState, header: RawHeader) -> np.ndarray:
    """CD events (`rows`: the word index of each), checked against the sensor size."""
    if header.width is not None and len(x):
        outside = np.flatnonzero((x >= header.width) | (y >= header.height))
        if outside.size:
            i = int(outside[0])
            raise EventFileError(header.path, state.offset + int(rows[i]) * header.word_bytes,
                                 f"event at x={int(x[i])}, y={int(y[i])} is outside the {header.width}x"
                                 f"{header.height} sensor, expected coordinates inside it")
    out = np.empty(len(t), EVENT_DTYPE)
    out["t"], out["x"], out["y"], out["p"] = t, x, y, p
    return out


def _triggers(t, ids, values) -> np.ndarray:
    out = np.empty(len(t), TRIGGER_DTYPE)
    out["t"], out["id"], out["value"] = t, ids, values
    return out


_EVT2_TYPES = _type_table((0x0, 0x1, 0x8, 0xA, 0xE, 0xF))
_EVT3_TYPES = _type_table((0x0, 0x2, 0x3, 0x4, 0x5, 0x6, 0x7, 0x8, 0xA, 0xE, 0xF))
_POPCOUNT_12 = np.array([bin(v).count("1") for v in range(4096)], np.int64)
_BITS_32 = np.arange(32, dtype=np.uint32)
_BITS_12 = np.arange(12, dtype=np.uint16)


def decode_evt2(words: np.ndarray, state: DecoderState, header: RawHeader) -> Decoded:
    """EVT 2.0 words (uint32) -> CD events and triggers."""
    state = replace(state)  # the caller's state is left as it was (the index keeps it)
    kind = (words >> 28).astype(np.uint8)
    _check_types(kind, _EVT2_TYPES, state, header)
    hi = np.flatnonzero(kind == 0x8)
    initial = state.time_high
    high = _ffill(hi, _time_high(words[hi] & 0x0FFFFFFF, hi, 28, state, header), initial, words.size)
    cd = np.flatnonzero(kind <= 1)
    w = words[cd]
    t = (high[cd] << 6) | (w >> 22 & 0x3F)
    events = _events(t, w >> 11 & 0x7FF, w & 0x7FF, kind[cd], cd, state, header)
    trig = np.flatnonzero(kind == 0xA)
    tw = words[trig]
    triggers = _triggers((high[trig] << 6) | (tw >> 22 & 0x3F), tw >> 8 & 0x1F, tw & 1)
    state.offset += words.size * 4
    return Decoded(events, triggers, state)


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
    events = _events(t, x, y, kind[cd][row], cd[row], state, header)
    trig = np.flatnonzero(kind == 0xA)
    tw = words[trig]
    triggers = _triggers((high[trig] << 6) | ((tw >> np.uint64(54)) & np.uint64(0x3F)).astype(np.int64),
                         (tw >> np.uint64(40)) & np.uint64(0x1F), (tw >> np.uint64(32)) & np.uint64(1))
    state.offset += words.size * 8
    return Decoded(events, triggers, state)


_EVT3_EMITS = _type_table((0x2, 0x4, 0x5))  # words that carry CD events
_EVT3_VECTOR_STREAM = _type_table((0x3, 0x4, 0x5))  # the words that set or advance the vector base
_EVT3_TIME = _type_table((0x6, 0x8))


def _evt3_time(kind, payload, state: DecoderState, header: RawHeader, n: int) -> np.ndarray:
    """The 64-bit µs time of every word, from the TIME_HIGH / TIME_LOW words only (then one repeat)."""
    tw = np.flatnonzero(_EVT3_TIME[kind])
    is_hi = kind[tw] == 0x8
    hi = tw[is_hi]
    initial_high, initial_low = state.time_high, state.time_low
    ext = _time_high(payload[hi], hi, 12, state, header)
    high = _ffill(np.flatnonzero(is_hi), ext, initial_high, tw.size)
    low = _ffill(np.flatnonzero(~is_hi), payload[tw[~is_hi]], initial_low, tw.size)
    if tw.size:
        state.time_low = int(low[-1])
    return _ffill(tw, (high << 12) | low, (initial_high << 12) | initial_low, n)


def decode_evt3(words: np.ndarray, state: DecoderState, header: RawHeader) -> Decoded:
    """EVT 3.0 words (uint16) -> CD events (single and vector events in file order) and triggers."""
    state = replace(state)
    n = words.size
    kind = (words >> 12).astype(np.uint8)
    _check_types(kind, _EVT3_TYPES, state, header)
    payload = (words & 0xFFF).astype(np.int32)
    t = _evt3_time(kind, payload, state, header, n)
    ys = np.flatnonzero(kind == 0x0)
    y = _ffill(ys, payload[ys] & 0x7FF, state.y, n)
    # vector base along the stream of VECT_BASE_X / VECT_12 / VECT_8 words: the last base plus 12 / 8 per vector
    # word since it (exclusive of the word itself)
    vs = np.flatnonzero(_EVT3_VECTOR_STREAM[kind])
    vk, vp = kind[vs], payload[vs]
    is_base = vk == 0x3
    step = np.where(vk == 0x4, 12, np.where(vk == 0x5, 8, 0))
    before = np.cumsum(step) - step
    bases = np.flatnonzero(is_base)
    base_x = _ffill(bases, (vp[bases] & 0x7FF) - before[bases], state.base_x, vs.size) + before
    polarity = _ffill(bases, vp[bases] >> 11, state.polarity, vs.size)
    if vs.size:
        state.base_x, state.polarity = int(base_x[-1] + step[-1]), int(polarity[-1])
    # events in file order: every emitting word repeated by its event count (1 for ADDR_X, the popcount of a
    # vector), plus the bit position within a vector
    emit = np.flatnonzero(_EVT3_EMITS[kind])
    ek, ep = kind[emit], payload[emit]
    is_vec = ek != 0x2
    mask = np.where(ek == 0x4, ep, ep & 0xFF)
    counts = np.where(is_vec, _POPCOUNT_12[mask], 1)
    vec = np.flatnonzero(is_vec)
    in_stream = np.searchsorted(vs, emit[vec])  # each vector word's place in the vector stream
    x_word, p_word = ep & 0x7FF, ep >> 11
    x_word[vec], p_word[vec] = base_x[in_stream], polarity[in_stream]
    _, bit = np.nonzero((mask[vec].astype(np.uint16)[:, None] >> _BITS_12) & 1)
    src = np.repeat(emit, counts)  # the word of each event
    xs = np.repeat(x_word, counts)
    xs[np.repeat(is_vec, counts)] += bit.astype(xs.dtype)
    ps = np.repeat(p_word, counts)
    events = _events(t[src], xs, y[src], ps, src, state, header)
    trig = np.flatnonzero(kind == 0xA)
    triggers = _triggers(t[trig], payload[trig] >> 8 & 0xF, payload[trig] & 1)
    if ys.size:
        state.y = int(y[-1])
    state.offset += n * 2
    return Decoded(events, triggers, state)


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

    def _words(self, raw: bytes) -> np.ndarray:
        dtype = DECODERS[self.header.encoding][1]
        if self.header.encoding == "EVT21" and self.header.legacy_evt21:
            halves = np.frombuffer(raw, "<u4").astype(np.uint64)
            return (halves[0::2] << np.uint64(32)) | halves[1::2]
        return np.frombuffer(raw, dtype)

    def chunks(self, state: DecoderState | None = None, chunk_bytes: int | None = None) -> Iterator[Decoded]:
        """Decoded chunks (of `chunk_bytes`, default the reader's) from `state` (default: the start of the data) to
        the end of the file."""
        decode = DECODERS[self.header.encoding][0]
        size = chunk_bytes or self.chunk_bytes
        state = state or DecoderState(offset=self.header.data_offset)
        pending = b""
        word = self.header.word_bytes
        with self.path.open("rb") as f:
            f.seek(state.offset)
            while True:
                data = f.read(size)
                if not data:
                    break
                data = pending + data
                whole = len(data) // word * word
                pending = data[whole:]
                if whole:
                    decoded = decode(self._words(data[:whole]), state, self.header)
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
    invalidated by the file's size and modification time."""

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
        from ems_yolo.cfg import ems_home

        key = re.sub(r"[^A-Za-z0-9_.-]", "_", str(path.resolve()))[-180:]
        return ems_home() / "raw-index" / f"{key}.npz"

    @classmethod
    def for_reader(cls, reader: RawReader) -> RawIndex:
        """Load the index of the reader's file, or build and save it."""
        st = reader.path.stat()
        stamp = np.array([st.st_size, st.st_mtime_ns, reader.chunk_bytes], np.int64)
        where = cls.location(reader.path)
        if where.is_file():
            with np.load(where) as z:
                if np.array_equal(z["stamp"], stamp):
                    return cls._from_arrays(z)
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
    header = (f"% evt 2.0\n% format EVT2;height={height};width={width}\n% geometry {width}x{height}\n"
              "% integrator_name ems-yolo\n% end\n").encode("ascii")
    body = encode_evt2(events)
    return atomic_write(path, lambda f: (f.write(header), f.write(body)))
