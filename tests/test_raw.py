"""Prophesee `.raw` recordings (EVT 2.0 / 2.1 / 3.0): real files, chunked and windowed reads, formats, bad files."""

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from ems_yolo.cli import app
from ems_yolo.events.formats import convert_events, open_events, read_events
from ems_yolo.events.io import EVENT_DTYPE, EventFileError, read_dat
from ems_yolo.events.raw import RawReader, read_raw, read_raw_header, write_raw_evt2
from shared_data import SAMPLE, SHARED_DATA

EVT3 = SHARED_DATA / "events" / "evt3_sample.raw"
EVT3_OPENEB = SHARED_DATA / "events" / "evt3_sample.openeb.npy"  # Prophesee's official decoder: the reference
EVT3_REF = SHARED_DATA / "events" / "evt3_sample.npy"  # expelliarmus: right but for time (see below)
EVT2 = SHARED_DATA / "events" / "evt2_sample.raw"
needs_raw = pytest.mark.skipif(not (EVT3.exists() and EVT2.exists()), reason="shared .raw samples not available")


@pytest.fixture(scope="module")
def evt3():
    return read_raw(EVT3)


@needs_raw
def test_headers_give_encoding_and_sensor_size_from_the_plugin_name():
    h3, h2 = read_raw_header(EVT3), read_raw_header(EVT2)
    assert (h3.encoding, h3.width, h3.height, h3.data_offset) == ("EVT3", 1280, 720, 166)  # hal_plugin_gen41_evk3
    assert (h2.encoding, h2.width, h2.height, h2.data_offset) == ("EVT2", 640, 480, 164)  # hal_plugin_gen3_fx3
    assert h3.fields["serial_number"] == "00000307"


@needs_raw
def test_evt3_sample_equals_prophesees_openeb_decoder(evt3):
    """The camera's EVT 3.0 sample equals Prophesee's own decode (OpenEB's standalone EVT 3.0 decoder, built
    unmodified), event by event, in file order: t, x, y and p."""
    ref = np.load(EVT3_OPENEB)
    assert len(evt3) == len(ref) == 219_596
    for k in "txyp":
        np.testing.assert_array_equal(evt3[k].astype(np.int64), ref[k].astype(np.int64), err_msg=k)


@needs_raw
def test_evt3_sample_decodes_to_the_independent_decoders_events(evt3):
    """x, y, p equal and in file order. The reference decoder (expelliarmus) counts every backward TIME_LOW step as
    a 4096 us wrap; this file has 11 (9 steps back of 3-11 us, and the 2 real wraps 4095 -> 0 that come with their
    TIME_HIGH increment, which it thus counts twice). Its times are ours plus 4096 us per such step before the event."""
    ref = np.load(EVT3_REF)
    assert len(evt3) == len(ref) == 219_596
    for k in "xyp":
        assert np.array_equal(evt3[k].astype(np.int64), ref[k].astype(np.int64)), k
    words = np.fromfile(EVT3, "<u2", offset=166).astype(np.int64)
    kind, payload = words >> 12, words & 0xFFF
    lows = np.flatnonzero(kind == 0x6)
    back = lows[1:][np.diff(payload[lows]) < 0]  # word indices of backward TIME_LOW steps
    assert len(back) == 11
    emitted = np.where(kind == 0x2, 1, 0) + np.where(kind == 0x4, [bin(v).count("1") for v in payload], 0) + \
        np.where(kind == 0x5, [bin(v & 0xFF).count("1") for v in payload], 0)
    first_event_after = np.cumsum(emitted)[back]  # events decoded before each step
    extra = np.zeros(len(ref), np.int64)
    for n in first_event_after:
        extra[n:] += 4096
    assert np.array_equal(evt3["t"] + extra, ref["t"])
    assert evt3["t"][0] == 11718656 and evt3["t"][-1] - evt3["t"][0] == 8801  # 8.8 ms, TIME_HIGH 0xB2D..0xB2F


@needs_raw
def test_evt2_sample_is_monotonic_and_inside_the_sensor():
    ev = read_raw(EVT2)
    assert len(ev) == 539_481 and ev.dtype == EVENT_DTYPE
    assert np.all(np.diff(ev["t"]) >= 0)
    assert ev["x"].max() < 640 and ev["y"].max() < 480 and set(np.unique(ev["p"])) == {0, 1}


@needs_raw
@pytest.mark.parametrize("chunk", [2, 4, 6, 10, 64, 1000, 4096, 1 << 20])
def test_chunked_decoding_equals_whole_file_decoding(chunk, tmp_path, evt3):
    whole2 = read_raw(EVT2)
    for path, whole in ((EVT3, evt3), (EVT2, whole2)):
        if chunk < 64:  # tiny chunks on a 6 KB prefix (whole words), to keep the test fast
            head = read_raw_header(path)
            cut = head.data_offset + 6000 // head.word_bytes * head.word_bytes
            short = tmp_path / path.name
            short.write_bytes(path.read_bytes()[:cut])
            path, whole = short, read_raw(short)
        parts = list(RawReader(path, chunk_bytes=chunk).chunks())
        got = np.concatenate([p.events for p in parts])
        assert (len(parts) > 1 or chunk >= path.stat().st_size) and np.array_equal(got, whole)


@needs_raw
@pytest.mark.parametrize("path", [EVT3, EVT2])
def test_windowed_reads_equal_slices_of_a_full_read(path, tmp_path):
    full = read_raw(path)
    reader = RawReader(path, chunk_bytes=1 << 14)  # many indexed chunks
    t0 = int(full["t"][0])
    for a, b in ((t0, t0 + 1000), (t0 + 2500, t0 + 2600), (t0 + 4000, t0 + 90_000), (t0 - 10, t0 + 1)):
        sl = full[(full["t"] >= a) & (full["t"] < b)]
        assert np.array_equal(reader.read(a, b), sl), (a, b)
    src = open_events(path)
    assert src.count == len(full) and src.t_first == t0 and src.t_last == int(full["t"].max())
    assert not list(path.parent.glob("*.ems-index*"))  # the index lives in the ems-yolo cache


@needs_raw
def test_dat_to_evt2_raw_and_back_is_lossless(tmp_path):
    raw = tmp_path / "ncars.raw"
    out, n = convert_events(SAMPLE, raw, width=304, height=240)
    assert read_raw_header(raw).encoding == "EVT2" and n == 2009
    assert np.array_equal(read_events(raw), read_dat(SAMPLE))
    r = CliRunner().invoke(app, ["events", f"source={raw}", f"out={tmp_path / 'back_td.dat'}"])
    assert r.exit_code == 0, r.output
    assert np.array_equal(read_dat(tmp_path / "back_td.dat"), read_dat(SAMPLE))
    r = CliRunner().invoke(app, ["events", f"source={raw}", "info=True"])
    assert "EVT 2.0 .raw, 304x240, 100.0 ms" in r.output and "2,009 events" in r.output


def test_long_recordings_wrap_evt2_time_high(tmp_path):
    """Times past 2^34 us (4.8 h) wrap the 28-bit TIME_HIGH; the decoder extends them back to 64 bits."""
    ev = np.zeros(4, EVENT_DTYPE)
    ev["t"] = [(1 << 34) - 100, (1 << 34) - 1, 1 << 34, (1 << 34) + 5000]
    ev["x"], ev["y"], ev["p"] = [1, 2, 3, 4], [5, 6, 7, 8], [0, 1, 0, 1]
    path = write_raw_evt2(tmp_path / "wrap.raw", ev, 16, 16)
    assert np.array_equal(read_raw(path), ev)


def _evt21_file(path, events, legacy=False):
    """EVT 2.1 words written from the format page's layout: a TIME_HIGH whenever t >> 6 changes, one vector word
    per event, then a trigger."""
    words, high = [], None
    for e in events:
        if int(e["t"]) >> 6 != high:
            high = int(e["t"]) >> 6
            words.append((0x8 << 60) | (high << 32))
        x0 = int(e["x"]) // 32 * 32
        words.append((int(e["p"]) << 60) | ((int(e["t"]) & 0x3F) << 54) | (x0 << 43) | (int(e["y"]) << 32)
                     | (1 << (int(e["x"]) - x0)))
    words.append((0xA << 60) | ((int(events["t"][-1]) & 0x3F) << 54) | (3 << 40) | (1 << 32))  # trigger id 3
    w = np.array(words, np.uint64)
    data = (np.stack([w >> np.uint64(32), w & np.uint64(0xFFFFFFFF)], 1).astype("<u4").tobytes() if legacy
            else w.astype("<u8").tobytes())
    fmt = "EVT21_LEGACY" if legacy else "EVT21"
    path.write_bytes(f"% evt 2.1\n% format {fmt};height=64;width=96\n% end\n".encode() + data)
    return path


@pytest.mark.parametrize("legacy", [False, True])
def test_evt21_vectors_and_triggers(tmp_path, legacy):
    ev = np.zeros(3, EVENT_DTYPE)
    ev["t"], ev["x"], ev["y"], ev["p"] = [100, 101, 130], [5, 40, 95], [1, 2, 63], [1, 0, 1]
    path = _evt21_file(tmp_path / "a.raw", ev, legacy)
    events, triggers = read_raw(path, triggers=True)
    assert np.array_equal(events, ev)
    assert triggers.tolist() == [(130, 3, 1)]  # triggers apart from CD events


def test_evt3_vectors_and_state_across_words(tmp_path):
    """ADDR_Y, VECT_BASE_X then VECT_12 and VECT_8 (base advancing 12 then 8), a single ADDR_X, TIME_LOW/HIGH."""
    words = [0x8001, 0x6010, 0x0007, 0x3800 | 100, 0x4000 | 0b100000000101, 0x5000 | 0b10000001, 0x2000 | 7,
             0xA000 | (2 << 8) | 1]
    path = tmp_path / "v.raw"
    path.write_bytes(b"% evt 3.0\n% geometry 640x480\n% end\n" + np.array(words, "<u2").tobytes())
    events, triggers = read_raw(path, triggers=True)
    t = (1 << 12) | 0x10
    assert events.tolist() == [(t, 100, 7, 1), (t, 102, 7, 1), (t, 111, 7, 1), (t, 112, 7, 1), (t, 119, 7, 1),
                               (t, 7, 7, 0)]
    assert triggers.tolist() == [(t, 2, 1)]


@pytest.mark.parametrize(("content", "message"), [
    (b"% evt 2.0\n% geometry 16x16\n% end\n" + b"\x00\x00\x00", "truncated final word (3 of 4 bytes)"),
    (b"% evt 4.0\n% end\n", "header 'evt 4.0' is not supported, expected 2.0, 2.1 or 3.0"),
    (b"% evt 2.0\n% geometry 16x16", "header line not terminated"),
    (b"% date today\n% end\n", "header declares no encoding"),
    (b"% evt 2.0\n% geometry 16x16\n% end\n" + np.array([0x3 << 28], "<u4").tobytes(),
     "word type 0x3 is not an EVT2 word type"),
    (b"% evt 2.0\n% geometry 16x16\n% end\n" + np.array([(0x8 << 28) | 1, (1 << 28) | (20 << 11) | 3], "<u4").tobytes(),
     "event at x=20, y=3 is outside the 16x16 sensor"),
    (b"% evt 2.0\n% geometry 16x16\n% end\n" + np.array([(0x8 << 28) | 500, (0x8 << 28) | 400], "<u4").tobytes(),
     "time goes backwards (time high 500 -> 400)"),
    (b"% evt 3.0\n% geometry 16x16\n% end\n" + np.array([0x8005, 0x8003], "<u2").tobytes(),
     "time goes backwards (time high 5 -> 3)"),
])
def test_bad_raw_files_name_the_file_and_offset(tmp_path, content, message):
    path = tmp_path / "bad.raw"
    path.write_bytes(content)
    with pytest.raises(EventFileError) as e:
        read_raw(path)
    assert message in str(e.value) and str(path) in str(e.value) and "byte offset" in str(e.value)


@needs_raw
def test_truncated_copy_of_a_real_file_is_refused_at_its_last_word(tmp_path):
    path = tmp_path / "cut.raw"
    path.write_bytes(EVT2.read_bytes()[:-1])
    with pytest.raises(EventFileError, match="truncated final word") as e:
        read_raw(path)
    assert e.value.offset == EVT2.stat().st_size - 4


@needs_raw
def test_read_events_opens_every_format(tmp_path):
    shutil.copy(EVT3_REF, tmp_path / "ref.npy")
    ref = read_events(tmp_path / "ref.npy", 11718656, 11719000)
    assert len(ref) and ref["t"].min() >= 11718656 and ref["t"].max() < 11719000
    assert len(read_events(EVT3, 11718656, 11719000)) == np.sum(read_raw(EVT3)["t"] < 11719000)
    (tmp_path / "ref.txt").write_text("x")
    with pytest.raises(ValueError, match="not an event file"):
        read_events(tmp_path / "ref.txt")


def _rvt_h5(path, events, width=None, height=None, p_minus=True):
    """An HDF5 event file in RVT's layout (events/t, x, y, p, blosc-compressed; polarity -1/1 as RVT stores it)."""
    import h5py
    import hdf5plugin

    with h5py.File(path, "w") as f:
        g = f.create_group("events")
        comp = hdf5plugin.Blosc(cname="zstd", clevel=5)
        for k in "txy":
            g.create_dataset(k, data=events[k], chunks=(256,), **comp)
        g.create_dataset("p", data=events["p"].astype(np.int8) * 2 - 1 if p_minus else events["p"], chunks=(256,),
                         **comp)
        if width:
            g["width"], g["height"] = width, height
    return path


@pytest.mark.skipif(not SAMPLE.exists(), reason="shared N-CARS sample not available")
def test_rvt_hdf5_event_files_read_like_the_others(tmp_path):
    ev = read_dat(SAMPLE)
    path = _rvt_h5(tmp_path / "rec_td.dat.h5", ev, 304, 240)
    src = open_events(path)
    assert (src.width, src.height, src.count, src.t_first, src.t_last) == (304, 240, len(ev), ev["t"][0], ev["t"][-1])
    assert np.array_equal(read_events(path), ev)  # polarity -1 read as 0
    for a, b in ((0, 5000), (20_000, 20_500), (90_000, 200_000)):
        assert np.array_equal(read_events(path, a, b), ev[(ev["t"] >= a) & (ev["t"] < b)])
    out, n = convert_events(path, tmp_path / "back_td.dat")
    assert n == len(ev) and np.array_equal(read_dat(out), ev)


def test_hdf5_without_events_is_refused_with_its_name(tmp_path):
    import h5py

    path = tmp_path / "cache.h5"
    with h5py.File(path, "w") as f:
        f["samples"] = np.zeros(3)
    with pytest.raises(ValueError, match="cache.h5: no 'events' group with t, x, y, p"):
        read_events(path)


def _evt3_reference(words: list[int]) -> list[tuple[int, int, int, int]]:
    """A word-by-word EVT 3.0 decoder written from the format page, to check the vectorised one against."""
    events, high, low, y, base, pol, last_high = [], 0, 0, 0, 0, 0, None
    for w in words:
        kind, pay = w >> 12, w & 0xFFF
        if kind == 0x8:
            high += (pay - last_high) % 4096 if last_high is not None else pay
            last_high = pay
        elif kind == 0x6:
            low = pay
        elif kind == 0x0:
            y = pay & 0x7FF
        elif kind == 0x2:
            events.append(((high << 12) | low, pay & 0x7FF, y, pay >> 11))
        elif kind == 0x3:
            base, pol = pay & 0x7FF, pay >> 11
        elif kind in (0x4, 0x5):
            bits = 12 if kind == 0x4 else 8
            events += [((high << 12) | low, base + b, y, pol) for b in range(bits) if pay >> b & 1]
            base += bits
    return events


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evt3_random_streams_match_a_word_by_word_decoder(tmp_path, seed):
    """Random EVT 3.0 streams (rows, single and vector events with empty and full masks, bases, time words with
    a 24-bit wrap, CONTINUED/OTHERS/trigger words): the vectorised decoder, whole and in chunks, equals the
    reference loop."""
    rng = np.random.default_rng(seed)
    words, high = [0x8000 | 4090], 4090
    for _ in range(3000):
        r = rng.random()
        if r < 0.02:
            high = (high + 1) % 4096  # wraps 4095 -> 0 once in the stream
            words.append(0x8000 | high)
        elif r < 0.08:
            words.append(0x6000 | int(rng.integers(4096)))
        elif r < 0.2:
            words.append(0x0000 | int(rng.integers(480)))
        elif r < 0.3:
            words.append(0x3000 | int(rng.integers(2)) << 11 | int(rng.integers(500)))
        elif r < 0.4:
            mask = int(rng.choice([0, 0xFFF, rng.integers(4096)]))
            words.append((0x4000 if rng.random() < 0.5 else 0x5000) | mask)
        elif r < 0.42:
            words.append(int(rng.choice([0x7000, 0xE000, 0xF000, 0xA000 | 0x101])))
        else:
            words.append(0x2000 | int(rng.integers(2)) << 11 | int(rng.integers(640)))
    path = tmp_path / "random.raw"
    path.write_bytes(b"% evt 3.0\n% geometry 1280x720\n% end\n" + np.array(words, "<u2").tobytes())
    expected = np.array(_evt3_reference(words), EVENT_DTYPE)
    assert len(expected) > 1000 and np.array_equal(read_raw(path), expected)
    for chunk in (2, 34, 1002):
        got = np.concatenate([d.events for d in RawReader(path, chunk_bytes=chunk).chunks()])
        assert np.array_equal(got, expected), chunk


def test_evt2_triggers_and_other_words_between_events(tmp_path):
    """EXT_TRIGGER, OTHERS and CONTINUED words between CD words take nothing from the CD events' times."""
    words = [(0x8 << 28) | 10, (0x1 << 28) | (5 << 22) | (3 << 11) | 4, (0xA << 28) | (7 << 22) | (2 << 8) | 1,
             0xE << 28, (0x0 << 28) | (9 << 22) | (1 << 11) | 2, 0xF << 28, (0x8 << 28) | 11,
             (0x1 << 28) | (1 << 22) | (6 << 11) | 7]
    path = tmp_path / "t.raw"
    path.write_bytes(b"% evt 2.0\n% geometry 16x16\n% end\n" + np.array(words, "<u4").tobytes())
    for chunk in (4, 8, 12, 1 << 20):
        parts = list(RawReader(path, chunk_bytes=chunk).chunks())
        events = np.concatenate([d.events for d in parts])
        triggers = np.concatenate([d.triggers for d in parts])
        assert events.tolist() == [(10 << 6 | 5, 3, 4, 1), (10 << 6 | 9, 1, 2, 0), (11 << 6 | 1, 6, 7, 1)], chunk
        assert triggers.tolist() == [(10 << 6 | 7, 2, 1)], chunk


def test_evt3_vector_pixel_outside_the_sensor_names_its_word(tmp_path):
    words = [0x8000, 0x0003, 0x2000 | 5, 0x3000 | 10, 0x4000 | 0x800]  # the vector's last pixel: x = 10 + 11 = 21
    path = tmp_path / "o.raw"
    path.write_bytes(b"% evt 3.0\n% geometry 16x16\n% end\n" + np.array(words, "<u2").tobytes())
    with pytest.raises(EventFileError, match="event at x=21, y=3 is outside the 16x16 sensor") as e:
        read_raw(path)
    assert e.value.offset == len(b"% evt 3.0\n% geometry 16x16\n% end\n") + 4 * 2


@needs_raw
def test_interleaved_readers_and_threads_get_their_own_events(evt3):
    """The decoders reuse per-thread scratch memory between chunks: readers stepped in turn in one thread, and reads
    in concurrent threads, still each get exactly their file's events."""
    from concurrent.futures import ThreadPoolExecutor
    from itertools import zip_longest

    evt2 = read_raw(EVT2)
    parts = {EVT3: [], EVT2: []}
    readers = RawReader(EVT3, chunk_bytes=40_000), RawReader(EVT2, chunk_bytes=90_000)
    for d3, d2 in zip_longest(*(r.chunks() for r in readers)):
        for path, d in ((EVT3, d3), (EVT2, d2)):
            if d is not None:
                parts[path].append(d.events)
    assert len(parts[EVT3]) > 2 and len(parts[EVT2]) > 2
    assert np.array_equal(np.concatenate(parts[EVT3]), evt3) and np.array_equal(np.concatenate(parts[EVT2]), evt2)
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(read_raw, [EVT3, EVT2] * 3))
    assert all(np.array_equal(g, evt3 if i % 2 == 0 else evt2) for i, g in enumerate(got))


def test_evt2_pixel_outside_the_sensor_is_found_first_in_file_order_with_threads(tmp_path):
    """A chunk large enough to be decoded in pieces on several threads still reports the first bad event."""
    rng = np.random.default_rng(0)
    ev = np.zeros(300_000, EVENT_DTYPE)
    ev["t"] = np.sort(rng.integers(0, 2_000_000, ev.size))
    ev["x"], ev["y"], ev["p"] = rng.integers(0, 16, ev.size), rng.integers(0, 16, ev.size), rng.integers(0, 2, ev.size)
    ev["x"][[100_000, 250_000]] = 20  # both beyond a 16-pixel-wide sensor, in different pieces
    path = write_raw_evt2(tmp_path / "wide.raw", ev, 32, 32)
    data = path.read_bytes().replace(b"height=32;width=32", b"height=16;width=16").replace(b"32x32", b"16x16")
    path.write_bytes(data)
    head = read_raw_header(path)
    words = np.frombuffer(data[head.data_offset:], "<u4")
    cd = np.flatnonzero(words < 0x20000000)
    with pytest.raises(EventFileError, match="event at x=20, y=.* is outside the 16x16 sensor") as e:
        read_raw(path)
    assert e.value.offset == head.data_offset + int(cd[100_000]) * 4


def test_times_across_2_to_the_32_us_stay_exact(tmp_path):
    """Times are spread as uint32 while they fit (the first 71 minutes), as int64 past it: a chunk on each side and
    one straddling 2^32 us decode exactly, in EVT 2.0 and EVT 3.0 (256 wraps of the 24-bit time)."""
    ev = np.zeros(6, EVENT_DTYPE)
    ev["t"] = [(1 << 32) - 70, (1 << 32) - 1, 1 << 32, (1 << 32) + 64, (1 << 32) + 4096, (1 << 33) + 7]
    ev["x"], ev["y"], ev["p"] = [1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1], [0, 1, 0, 1, 0, 1]
    path = write_raw_evt2(tmp_path / "long.raw", ev, 16, 16)
    assert np.array_equal(read_raw(path), ev)
    for chunk in (4, 8, 12):
        assert np.array_equal(np.concatenate([d.events for d in RawReader(path, chunk_bytes=chunk).chunks()]), ev)
    words = [0x8000, 0x8801] * 256  # TIME_HIGH 0 and 2049 in each 24-bit period: 256 periods = 2^32 us
    words += [0x8000, 0x6005, 0x0003, 0x2000 | 7, 0x8001, 0x6000, 0x2800 | 9]
    path = tmp_path / "long3.raw"
    path.write_bytes(b"% evt 3.0\n% geometry 16x16\n% end\n" + np.array(words, "<u2").tobytes())
    assert read_raw(path).tolist() == [((1 << 32) | 5, 7, 3, 0), ((1 << 32) | 4096, 9, 3, 1)]
