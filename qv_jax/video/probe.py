"""Probe: one demux pass over a video, no frame decoding beyond the first, into a table of every decodable frame.

A frame's identity is its index in presentation order among the decodable frames of the stream. We get it from
the packets themselves (their timestamps and keyframe flags, sorted by pts), never from container metadata or
from interpolating pts, which break on non-zero start times, variable frame rates and MKV / MPEG-TS files.

Decodable means: at or after the first keyframe in decode order, not flagged for discard by the demuxer (edit
lists), and not a leading frame of the first keyframe (an open-GOP frame that references pictures before the
start of the file). The first frame is decoded once, to prove that the stream decodes and to read its rotation.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from qv_jax.errors import VideoError

# How many packets the probe feeds the decoder, at most, before it must have produced the first frame.
_FIRST_FRAME_PACKETS = 256


@dataclass(frozen=True, eq=False)
class VideoInfo:
    """What a probe learns about a video's main stream. Frame counts and rates come from the packet scan."""

    path: str
    frame_count: int
    duration_s: float
    avg_fps: float
    width: int
    height: int
    codec: str
    start_time_s: float
    keyframe_indices: np.ndarray  # int64, presentation-order indices of the keyframes
    rotation: int  # counter-clockwise degrees in (-180, 180] from the display matrix; frames come back unrotated
    container: str
    stream_index: int
    time_base: Fraction


@dataclass(frozen=True, eq=False)
class FrameTable:
    """Per-frame timing in presentation order, and the keyframes the decoder can start from.

    ``pts[i]`` is frame i's timestamp in ``time_base`` units; ``occurrence[i]`` numbers frames that share a pts
    (0 for the first), so a worker can tell them apart; ``decode_pos[i]`` is the position of frame i's packet
    among all the stream's packets in decode order. Decoding from keyframe k (packet ``key_decode_pos[k]``, found
    by seeking with ``key_pts[k]`` or ``key_dts[k]``) yields the frames from presentation index ``key_index[k]``
    on; GOP k is the span from ``key_index[k]`` to ``key_index[k + 1]`` (empty when the demuxer discards all of
    it).
    """

    pts: np.ndarray
    occurrence: np.ndarray
    decode_pos: np.ndarray
    key_index: np.ndarray
    key_decode_pos: np.ndarray
    key_pts: np.ndarray
    key_dts: np.ndarray
    time_base: Fraction
    file_size: int
    file_mtime_ns: int


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _check_file(path: Path) -> os.stat_result:
    if not path.exists():
        raise VideoError(path, "file not found")
    if path.is_dir():
        raise VideoError(path, "is a directory, not a video file")
    try:
        st = path.stat()
        with open(path, "rb"):
            pass
    except OSError as e:
        raise VideoError(path, f"cannot be read: {e.strerror or e}") from e
    if st.st_size == 0:
        raise VideoError(path, "file is empty (0 bytes)")
    return st


def _ffmpeg_cause(e: Exception) -> str:
    """FFmpeg's message without the file name PyAV appends (VideoError already names the file)."""
    text = getattr(e, "strerror", None) or str(e)
    return text.rstrip(".")


def _open_container(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), mode="r")
    except av.FFmpegError as e:
        raise VideoError(
            path, f"cannot be opened as a video: {_ffmpeg_cause(e)} (corrupt, truncated, or not a video file)"
        ) from e


def _video_stream(path: Path, container) -> av.video.stream.VideoStream:
    for stream in container.streams.video:
        # Cover art in audio files is a one-picture "video" stream; it is not a video.
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    kinds = sorted({s.type for s in container.streams}) or ["none"]
    raise VideoError(path, f"has no video stream (streams: {', '.join(kinds)})")


def _scan(path: Path, container, stream) -> tuple[dict[str, np.ndarray], int]:
    """Demux every packet of ``stream``; decode only until the first frame appears. Returns the packet columns
    (decode order) and the first frame's rotation."""
    ctx = stream.codec_context
    ctx.thread_count = 1  # one frame is all we decode: frame threading would only delay it
    ts_col, dts_col, key_col, discard_col, corrupt_col, dur_col = [], [], [], [], [], []
    rotation = None
    fed = 0
    decode_error = None
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # the demuxer's end-of-stream marker
            pts, dts = packet.pts, packet.dts
            ts = pts if pts is not None else dts
            if ts is None:
                raise VideoError(
                    path,
                    f"packet {len(ts_col)} of the video stream has no timestamp (a raw elementary stream? remux it "
                    "into MP4 or MKV first)",
                )
            ts_col.append(ts)
            dts_col.append(dts if dts is not None else ts)
            key_col.append(packet.is_keyframe)
            discard_col.append(packet.is_discard)
            corrupt_col.append(packet.is_corrupt)
            dur_col.append(packet.duration or 0)
            if rotation is None and decode_error is None and (fed or packet.is_keyframe):
                try:
                    frames = ctx.decode(packet)
                except av.FFmpegError as e:
                    decode_error = e
                    continue
                fed += 1
                if frames:
                    rotation = int(frames[0].rotation)
                elif fed >= _FIRST_FRAME_PACKETS:
                    decode_error = RuntimeError(f"no frame after {fed} packets")
    except av.FFmpegError as e:
        raise VideoError(path, f"demuxing failed after {len(ts_col)} packets: {_ffmpeg_cause(e)}") from e
    if rotation is None and decode_error is None and fed:
        try:
            frames = ctx.decode(None)  # short streams: the first frame may only come out on draining
            if frames:
                rotation = int(frames[0].rotation)
        except av.FFmpegError as e:
            decode_error = e
    if not ts_col:
        raise VideoError(path, "video stream holds no frames")
    if rotation is None:
        cause = _ffmpeg_cause(decode_error) if decode_error else "no frame came out of the decoder"
        raise VideoError(path, f"video stream ({ctx.name}) cannot be decoded: {cause}")
    if corrupt_col[-1]:
        raise VideoError(path, "file is truncated: its last video packet is incomplete")
    declared = stream.frames
    if declared and len(ts_col) < declared:
        raise VideoError(
            path, f"file is truncated: the container lists {declared} video frames, it holds {len(ts_col)}"
        )
    columns = {
        "ts": np.asarray(ts_col, np.int64),
        "dts": np.asarray(dts_col, np.int64),
        "key": np.asarray(key_col, bool),
        "discard": np.asarray(discard_col, bool),
        "duration": np.asarray(dur_col, np.int64),
    }
    return columns, rotation


def _build_table(
    path: Path, cols: dict[str, np.ndarray], time_base: Fraction, st: os.stat_result
) -> tuple[FrameTable, np.ndarray, int]:
    """The frame table, the presentation indices of the frames that are keyframes, and the packet duration of the
    last frame (0 if unknown)."""
    ts = cols["ts"]
    key = cols["key"].copy()
    if not key.any():
        key[0] = True  # streams without keyframe flags can only be decoded from their first packet
    first_key = int(np.argmax(key))
    # Decoding starts at a keyframe, even one the demuxer discards (an edit list that starts mid-GOP, as cutting
    # without re-encoding makes); the frames are the packets from there on that are shown: not discarded, and not
    # leading frames of the first keyframe, which reference pictures before the start of the file.
    shown = ~cols["discard"]
    shown[:first_key] = False
    shown &= ts >= ts[first_key]
    rows = np.flatnonzero(shown)
    if rows.size == 0:
        raise VideoError(path, "video stream holds no decodable frames")
    frame_rows = rows[np.argsort(ts[rows], kind="stable")]  # packet row of each frame, in presentation order
    pts = ts[frame_rows]
    occurrence = np.arange(pts.size) - np.searchsorted(pts, pts, side="left")
    key_rows = np.flatnonzero(key)
    key_pts = ts[key_rows]
    # A keyframe shown no later than one decoded before it cannot start an interval of its own.
    shown_before = np.maximum.accumulate(np.concatenate([[np.iinfo(np.int64).min], key_pts[:-1]]))
    rising = key_pts > shown_before
    key_rows, key_pts = key_rows[rising], key_pts[rising]
    table = FrameTable(
        pts=_readonly(pts),
        occurrence=_readonly(occurrence.astype(np.int64)),
        decode_pos=_readonly(frame_rows.astype(np.int64)),
        key_index=_readonly(np.searchsorted(pts, key_pts, side="left").astype(np.int64)),
        key_decode_pos=_readonly(key_rows.astype(np.int64)),
        key_pts=_readonly(key_pts),
        key_dts=_readonly(cols["dts"][key_rows]),
        time_base=time_base,
        file_size=st.st_size,
        file_mtime_ns=st.st_mtime_ns,
    )
    keyframe_indices = np.flatnonzero(cols["key"][frame_rows]).astype(np.int64)
    return table, keyframe_indices, int(cols["duration"][frame_rows[-1]])


def _frame_interval(table: FrameTable, last_duration: int, stream) -> int:
    """The duration of the last frame, in time_base units: its packet's duration, else the median frame step,
    else the container's nominal rate (the only use of metadata, for single-frame videos without durations)."""
    if last_duration > 0:
        return last_duration
    steps = np.diff(table.pts)
    steps = steps[steps > 0]
    if steps.size:
        return int(np.median(steps))
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if rate and table.time_base:
        return max(1, round(1 / (rate * table.time_base)))
    return 0


def _normalized_degrees(degrees: int) -> int:
    degrees %= 360
    return degrees - 360 if degrees > 180 else degrees


def probe_uncached(path: str | os.PathLike) -> tuple[VideoInfo, FrameTable]:
    """Scan ``path`` and return its :class:`VideoInfo` and :class:`FrameTable`; raises VideoError on bad input."""
    path = Path(path)
    st = _check_file(path)
    container = _open_container(path)
    try:
        stream = _video_stream(path, container)
        time_base = stream.time_base
        if not time_base:
            raise VideoError(path, "video stream has no time base")
        cols, rotation = _scan(path, container, stream)
        table, keyframe_indices, last_packet_duration = _build_table(path, cols, time_base, st)
        n = table.pts.size
        last_duration = _frame_interval(table, last_packet_duration, stream)
        duration_s = float((int(table.pts[-1]) - int(table.pts[0]) + last_duration) * time_base)
        avg_fps = n / duration_s if duration_s > 0 else 0.0
        ctx = stream.codec_context
        info = VideoInfo(
            path=str(path),
            frame_count=n,
            duration_s=duration_s,
            avg_fps=avg_fps,
            width=ctx.width,
            height=ctx.height,
            codec=ctx.name,
            start_time_s=float(table.pts[0] * time_base),
            keyframe_indices=_readonly(keyframe_indices),
            rotation=_normalized_degrees(rotation),
            container=container.format.name,
            stream_index=stream.index,
            time_base=time_base,
        )
        if info.width <= 0 or info.height <= 0:
            raise VideoError(path, f"video stream has no frame size ({info.width}x{info.height})")
        return info, table
    finally:
        container.close()


_CACHE: OrderedDict[tuple, tuple[VideoInfo, FrameTable]] = OrderedDict()
_CACHE_SIZE = 16
_CACHE_LOCK = threading.Lock()


def probe(path: str | os.PathLike) -> tuple[VideoInfo, FrameTable]:
    """:func:`probe_uncached`, remembered for the last few files (keyed by path, size and modification time), so
    reopening a video does not scan it again."""
    resolved = Path(path).resolve()
    try:
        st = resolved.stat()
        key = (str(resolved), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key is not None:
        with _CACHE_LOCK:
            hit = _CACHE.get(key)
            if hit is not None:
                _CACHE.move_to_end(key)
                info, table = hit
                return (info if info.path == str(path) else replace(info, path=str(path))), table
    info, table = probe_uncached(path)
    if key is not None:
        with _CACHE_LOCK:
            _CACHE[key] = (info, table)
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return info, table


def clear_probe_cache() -> None:
    """Forget every remembered probe (benchmarks use it to time cold opens)."""
    with _CACHE_LOCK:
        _CACHE.clear()
