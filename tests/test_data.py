"""training.data / training.prepare on small MIDI files written here, window counts by hand."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from engine.tokens import HOLD, N_PITCHES, REST, Note, pitch_to_token, tokens_to_notes
from tests.midi_factory import Meter, Track, scale_melody, write_beat_file, write_midi
from training import data, prepare
from training import windows as win

# Quarter notes of a 4/4 bar -> tokens: pitch, hold, hold, hold.


def quarters(pitches: list[int]) -> list[int]:
    return [t for p in pitches for t in (pitch_to_token(p), HOLD, HOLD, HOLD)]


def scale_pitches(bars: int, low: int = 60) -> list[int]:
    return [p for p, _, _ in scale_melody(bars, low)]


# Beat times of the pop909-style file: tempo drifts, so a fixed-tempo grid would be wrong.
POP_BEATS = [0.3 + 0.5 * i + 0.002 * i * i for i in range(71)]
# 9 bars of 4 beats, one bar of 3, 8 bars of 4 (the last bar's closing downbeat is missing).
POP_DOWN = [i < 36 and i % 4 == 0 or i == 36 or i >= 39 and (i - 39) % 4 == 0 for i in range(71)]
POP_MELODY = [60 + (i * 5) % 24 for i in range(71)]  # one quarter note per beat, 60..83


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("midi")
    mix, pop = root / "mix", root / "pop"
    write_midi(mix / "four.mid", [Track(scale_melody(10), "Lead")])
    write_midi(mix / "waltz.mid", [Track(scale_melody(12))], meters=[Meter(3, 4)])
    chords = [(p + 12 * (i % 2), 8 * i, 8 * i + 8) for i in range(18) for p in (60, 64, 67)]
    write_midi(mix / "chords.mid", [Track(chords, "Piano")])  # 9 bars of half-note triads
    drums = [(36, 4 * i, 4 * i + 1) for i in range(32)]
    bass = [(36 + i % 8, 4 * i, 4 * i + 4) for i in range(32)]
    write_midi(mix / "band.mid", [Track(drums, "Kit", is_drum=True), Track(bass, "Bass"),
                                  Track(scale_melody(8), "Lead")])
    write_midi(mix / "high.mid", [Track(scale_melody(8, low=96))])  # 96..108: shifted -24
    wide = scale_melody(8)
    wide[5] = (97, wide[5][1], wide[5][2])  # one outlier above a 60..72 melody: folded to 73
    write_midi(mix / "wide.mid", [Track(wide)])
    # 14 bars; bars 8 and 9 (0-based) silent.
    rests = [n for n in scale_melody(14) if not 128 <= n[1] < 160]
    write_midi(mix / "rests.mid", [Track(rests)])
    # 9 bars of 4/4, 4 bars of 3/4, 8 bars of 4/4: quarter notes throughout (80 of them).
    write_midi(mix / "changes.mid", [Track(scale_melody(20))],
               meters=[Meter(4, 4, 0), Meter(3, 4, 144), Meter(4, 4, 192)])
    (mix / "broken.mid").write_bytes(b"MThd\x00\x00\x00\x06garbage")

    def at(step: float) -> float:  # beat grid, extrapolated past the last beat by its period
        beat = step / 4
        if beat <= 70:
            return float(np.interp(beat, np.arange(71), POP_BEATS))
        return POP_BEATS[70] + (beat - 70) * (POP_BEATS[70] - POP_BEATS[69])

    melody = [(p, 4 * i, 4 * i + 4) for i, p in enumerate(POP_MELODY[:70])]
    melody.append((POP_MELODY[70], 280, 283))  # the last beat: ends inside the known grid
    bridge = [(84, 2 * i, 2 * i + 1) for i in range(140)]
    piano = [(48, 4 * i, 4 * i + 4) for i in range(70)]
    write_midi(pop / "001.mid", [Track(melody, "MELODY"), Track(bridge, "BRIDGE"),
                                 Track(piano, "PIANO")], meters=[Meter(3, 4)], seconds=at)
    write_beat_file(pop / "001.beat_midi.txt", POP_BEATS, POP_DOWN)
    return mix, pop


def song_windows(ws: data.WindowSet, name: str) -> np.ndarray:
    return ws.windows[ws.song == ws.songs.index(name)]


def test_generic_folder_keeps_and_drops_exactly(folders: tuple[Path, Path]) -> None:
    mix, _ = folders
    ws = data.windows_from_midi_folder(mix, progress=False)
    per_song = {s: len(song_windows(ws, s)) for s in ws.songs}
    assert per_song == {"mix/four": 3, "mix/chords": 2, "mix/band": 1, "mix/high": 1,
                        "mix/wide": 1, "mix/rests": 2, "mix/changes": 3}
    assert ws.counts["files"] == 9 and ws.counts["files_kept"] == 7
    assert ws.counts["tracks"] == 10 and ws.counts["tracks_kept"] == 7
    assert ws.counts["windows"] == 13
    assert dict(ws.drops) == {
        "file:parse_error": 1, "file:no_window": 1, "track:no_8_bars_of_4_4": 1,
        "track:drum": 1, "track:bass": 1, "window:long_rest": 5}


def test_generic_windows_round_trip_to_expected_tokens(folders: tuple[Path, Path]) -> None:
    ws = data.windows_from_midi_folder(folders[0], progress=False)
    assert ws.windows.dtype == np.uint8 and ws.windows.shape == (13, 128)
    four = scale_pitches(10)
    for k, window in enumerate(song_windows(ws, "mix/four")):  # 1-bar stride
        assert window.tolist() == quarters(four[4 * k : 4 * k + 32])
    chords = song_windows(ws, "mix/chords")
    top = [67 + 12 * (i % 2) for i in range(18)]  # highest note of each half-note triad
    expected = [t for p in top for t in [pitch_to_token(p)] + [HOLD] * 7]
    assert [w.tolist() for w in chords] == [expected[:128], expected[16:144]]
    assert song_windows(ws, "mix/band")[0].tolist() == quarters(scale_pitches(8))
    assert song_windows(ws, "mix/high")[0].tolist() == quarters(scale_pitches(8, low=72))
    wide = scale_pitches(8)
    wide[5] = 73
    assert song_windows(ws, "mix/wide")[0].tolist() == quarters(wide)
    # Bar 8 silent, bar 9 not in the second window: exactly one bar of rest is allowed.
    second = song_windows(ws, "mix/rests")[1].tolist()
    assert second[:112] == quarters(scale_pitches(14)[4:32]) and second[112:] == [REST] * 16
    # The 3/4 bars are cut out: the 4/4 stretches are 9 bars and 8 bars.
    changes = [w.tolist() for w in song_windows(ws, "mix/changes")]
    notes = scale_pitches(20)
    assert changes == [quarters(notes[0:32]), quarters(notes[4:36]), quarters(notes[48:80])]


def test_pop909_style_uses_beat_file_and_melody_only(folders: tuple[Path, Path]) -> None:
    ws = data.windows_from_midi_folder(folders[1], progress=False)
    assert ws.songs == ["pop/001"]
    assert ws.counts["tracks"] == 3 and ws.counts["tracks_kept"] == 1
    assert dict(ws.drops) == {"track:not_melody_track": 2}
    # The 3-beat bar (beats 36..38) splits a 9-bar and an 8-bar stretch: 2 + 1 windows.
    assert [w.tolist() for w in ws.windows] == [
        quarters(POP_MELODY[0:32]), quarters(POP_MELODY[4:36]),
        quarters(POP_MELODY[39:70]) + [pitch_to_token(POP_MELODY[70]), HOLD, HOLD, REST]]


def test_prepare_cli_writes_a_cache_split_by_song(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "cache" / "w.npz"
    meta = prepare.main(["--data", str(folders[0]), "--data", str(folders[1]),
                         "--out", str(out), "--workers", "1", "--quiet"])
    printed = capsys.readouterr().out
    assert "mix: files 7/9 kept, tracks 7/10 kept, windows 13" in printed
    assert "pop: files 1/1 kept, tracks 1/3 kept, windows 3" in printed
    assert "dropped file:parse_error: 1" in printed
    cache = win.load_cache(out)
    assert cache["windows"].shape == (16, 128) and cache["windows"].dtype == np.uint8
    assert meta["windows"] == 16 and cache["meta"]["windows"] == 16
    for i in range(len(cache["songs"])):  # a song never lands in two splits
        assert len(set(cache["split"][cache["song"] == i].tolist())) == 1
    by_split = [win.load_windows(out, s) for s in win.SPLITS]
    assert sum(len(w) for w in by_split) == 16
    assert meta["windows_transposed"] == win.count_transpositions(cache["windows"])
    four = cache["windows"][cache["song"] == cache["songs"].index("mix/four")]
    assert four[0].tolist() == quarters(scale_pitches(10)[:32])
    with pytest.raises(ValueError, match="split must be one of"):
        win.load_windows(out, "training")


def test_two_workers_give_the_same_windows(folders: tuple[Path, Path]) -> None:
    one = data.windows_from_midi_folder(folders[0], workers=1, progress=False)
    two = data.windows_from_midi_folder(folders[0], workers=2, progress=False)
    assert one.songs == two.songs and np.array_equal(one.windows, two.windows)
    assert one.drops == two.drops


def test_split_proportions_are_seeded_and_by_song() -> None:
    songs = [f"set/{i:03d}" for i in range(200)]
    split = prepare.split_songs(songs, seed=0)
    counts = np.bincount(list(split.values()), minlength=len(win.SPLITS))
    assert counts.tolist() == [110, 10, 60, 10, 10]
    assert prepare.split_songs(list(reversed(songs)), seed=0) == split  # order does not matter
    assert prepare.split_songs(songs, seed=1) != split


def test_transpositions_stay_in_range() -> None:
    window = np.array(quarters([60, 72] * 16), np.uint8)  # tokens 5 and 17
    assert win.transpositions(window) == range(-5, 13)
    assert win.count_transpositions(np.stack([window, window])) == 36
    rng = np.random.default_rng(0)
    batch = win.random_transpositions(np.stack([window] * 400), rng)
    shifts = batch[:, 0] - 5
    assert set(shifts.tolist()) == set(range(-5, 13))  # every valid shift drawn, none other
    assert np.array_equal(batch[:, 1:4], np.full((400, 3), HOLD))
    assert np.array_equal(batch[:, 4] - batch[:, 0], np.full(400, 12))
    with pytest.raises(ValueError, match="leaves"):
        win.transpose(window, 13)
    rests = np.full(128, REST, np.uint8)
    assert win.transpositions(rests) == range(0, 1)


def test_window_sampler_is_seeded_and_covers_every_window() -> None:
    torch = pytest.importorskip("torch")
    windows = np.stack([np.array(quarters([55 + i] * 32), np.uint8) for i in range(10)])
    a, b = win.WindowSampler(windows, 5, seed=3), win.WindowSampler(windows, 5, seed=3)
    first, second = a.batch(), a.batch()
    assert first.dtype == torch.int64 and first.shape == (5, 128)
    assert torch.equal(first, b.batch()) and torch.equal(second, b.batch())
    assert int(first[first < N_PITCHES].max()) < N_PITCHES
    plain = win.WindowSampler(windows, 5, seed=3, transpose=False)
    epoch = torch.cat([plain.batch(), plain.batch()])
    assert sorted(epoch[:, 0].tolist()) == list(range(10))  # one epoch = each window once
    with pytest.raises(ValueError):
        win.WindowSampler(windows[:0], 5)


def test_window_starting_inside_a_note_starts_with_its_pitch() -> None:
    long_note = [pitch_to_token(60)] + [HOLD] * 23  # 1.5 bars
    tokens = long_note + quarters(scale_pitches(8))[: 9 * 16 - 24]
    drops: Counter = Counter()
    windows = data.cut_windows(tokens, drops)
    assert len(windows) == 2 and not drops
    assert windows[0].tolist() == tokens[:128]
    assert windows[1].tolist() == [pitch_to_token(60)] + tokens[17:144]
    assert tokens_to_notes(windows[1])[0] == Note(60, 0, 8)


def test_bad_files_raise_one_error_type(tmp_path: Path) -> None:
    (tmp_path / "x.mid").write_bytes(b"not a midi file")
    with pytest.raises(data.MidiParseError, match="x.mid"):
        data.read_midi(tmp_path / "x.mid")
    for text in ("0.5 1 1\n0.4 0 0\n", "0.5 1\n1.0 0\n", "a b c\n"):
        (tmp_path / "b.txt").write_text(text)
        with pytest.raises(data.MidiParseError):
            data.read_beat_file(tmp_path / "b.txt")
    # A pop909-style file whose beat file is broken is skipped and counted, not raised.
    write_midi(tmp_path / "s" / "002.mid", [Track(scale_melody(8), "MELODY")])
    (tmp_path / "s" / "002.beat_midi.txt").write_text("garbage\n")
    result = data.extract_file(tmp_path / "s" / "002.mid", "s/002")
    assert len(result.windows) == 0 and result.drops == Counter({"file:parse_error": 1})
