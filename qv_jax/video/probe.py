"""Probe: one demux pass over a video, no frame decoding beyond the first, into a table of every decodable frame.

A frame's identity is its index in presentation order among the decodable frames of the stream. We get it from
the packets themselves (their timestamps and keyframe flags, sorted by pts), never from container metadata or
from interpolating pts, which break on non-zero start times, variable frame rates and MKV / MPEG-TS files.

Decodable means: at or after the first keyframe in decode order, not flagged for discard by the demuxer (edit
lists), and not a leading frame of the first keyframe (an open-GOP frame that references pictures before the
start of the file). The first frame is decoded once, to prove that the stream decodes and to read its rotation
and colour tags.

Damaged timestamps (segments joined with ``ffmpeg -f concat -c copy``: pts shared by several frames, or a keyframe
shown before frames decoded ahead of it) make pts order disagree with the order the decoder shows frames in. The
probe then decodes the stream once and takes the decoder's own output order; a frame is then known by its
packet's byte position, which the worker reads back from the decoded frame, never by its pts.
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
# Containers whose index lists every frame, so fewer packets than listed means the file was cut short. AVI's index
# also lists zero-length chunks (dropped frames, the placeholders packed-bitstream Xvid writes), which hold no frame.
_INDEXED_FORMATS = ("mov", "mp4", "m4a", "3gp", "3g2", "mj2")

# FFmpeg's text-art demuxers and codecs: they turn any .txt / .nfo / .ans file into an "ansi" video of its pages.
_TEXT_FORMATS = ("tty", "bin", "xbin", "adf", "idf")
_TEXT_CODECS = ("ansi", "bintext", "xbin", "idf")

# FFmpeg's enum values (libavutil/pixfmt.h) by name, for VideoInfo and `qv-jax decode --info`.
COLOR_SPACES = {
    0: "rgb",
    1: "bt709",
    2: "unspecified",
    4: "fcc",
    5: "bt470bg",
    6: "smpte170m",
    7: "smpte240m",
    8: "ycgco",
    9: "bt2020nc",
    10: "bt2020c",
}
COLOR_RANGES = {0: "unspecified", 1: "tv", 2: "pc"}
COLOR_TRANSFERS = {
    1: "bt709",
    2: "unspecified",
    4: "gamma22",
    5: "gamma28",
    6: "smpte170m",
    7: "smpte240m",
    8: "linear",
    13: "iec61966-2-1",
    14: "bt2020-10",
    15: "bt2020-12",
    16: "smpte2084",
    18: "arib-std-b67",
}
COLOR_PRIMARIES = {
    1: "bt709",
    2: "unspecified",
    4: "bt470m",
    5: "bt470bg",
    6: "smpte170m",
    7: "smpte240m",
    8: "film",
    9: "bt2020",
    11: "smpte431",
    12: "smpte432",
}


def _name(table: dict[int, str], value: int) -> str:
    return table.get(int(value), f"unknown ({int(value)})")


@dataclass(frozen=True)
class ColorTags:
    """The first frame's pixel format and colour tags, as FFmpeg names them."""

    pixel_format: str
    space: str
    range: str
    transfer: str
    primaries: str
    interlaced: bool

    @classmethod
    def of(cls, frame) -> ColorTags:
        return cls(
            pixel_format=frame.format.name,
            space=_name(COLOR_SPACES, frame.colorspace),
            range=_name(COLOR_RANGES, frame.color_range),
            transfer=_name(COLOR_TRANSFERS, frame.color_trc),
            primaries=_name(COLOR_PRIMARIES, frame.color_primaries),
            interlaced=bool(frame.interlaced_frame),
        )


@dataclass(frozen=True, eq=False)
class VideoInfo:
    """What a probe learns about a video's main stream. Frame counts and rates come from the packet scan, or from
    a decode pass where timestamps are damaged (``frames_counted_by``)."""

    path: str
    frame_count: int
    duration_s: float
    avg_fps: float
    width: int  # as displayed, after the rotation
    height: int
    codec: str
    start_time_s: float
    keyframe_indices: np.ndarray  # int64, presentation-order indices of the keyframes
    rotation: int  # counter-clockwise degrees in (-180, 180] from the display matrix, a multiple of 90
    container: str
    stream_index: int
    time_base: Fraction
    stored_width: int = 0  # as coded, before the rotation
    stored_height: int = 0
    color: ColorTags | None = None
    pts_unique: bool = True
    frames_counted_by: str = "packets"  # "packets" (demux scan) or "decoding" (damaged timestamps)


@dataclass(frozen=True, eq=False)
class FrameTable:
    """Per-frame timing in presentation order, and the keyframes the decoder can start from.

    ``pts[i]`` is frame i's timestamp in ``time_base`` units; ``occurrence[i]`` numbers frames that share a pts
    (0 for the first), so a worker can tell them apart; ``decode_pos[i]`` is the position of frame i's packet
    among all the stream's packets in decode order, ``pos[i]`` its byte position in the file. When
    ``by_position`` is set (damaged timestamps) workers know frames by ``pos`` instead of by pts, and
    ``occurrence`` numbers the frames of one packet. Decoding from keyframe k (packet ``key_decode_pos[k]``,
    found by seeking with ``key_pts[k]`` or ``key_dts[k]``) yields the frames from presentation index
    ``key_index[k]`` on; GOP k is the span from ``key_index[k]`` to ``key_index[k + 1]`` (empty when the demuxer
    discards all of it).
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
    pos: np.ndarray | None = None
    key_pos: np.ndarray | None = None
    by_position: bool = False


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
        return av.open(str(path), mode="r", metadata_errors="replace")  # damaged tags must not stop us
    except av.FFmpegError as e:
        raise VideoError(
            path, f"cannot be opened as a video: {_ffmpeg_cause(e)} (corrupt, truncated, or not a video file)"
        ) from e


def _is_image_format(name: str) -> bool:
    """Whether FFmpeg's demuxer ``name`` reads pictures (PNG, JPEG, ... through image2 or an image pipe, GIF)."""
    return name in ("image2", "image2pipe", "gif", "apng") or name.endswith("_pipe")


def _video_stream(path: Path, container) -> av.video.stream.VideoStream:
    formats = container.format.name.split(",")
    codecs = {s.codec_context.name for s in container.streams.video if s.codec_context is not None}
    if set(formats) & set(_TEXT_FORMATS) or codecs & set(_TEXT_CODECS):
        raise VideoError(path, f"is a text file ({container.format.name} format to FFmpeg), not a video")
    for stream in container.streams.video:
        # Cover art in audio files is a one-picture "video" stream; it is not a video.
        if not stream.disposition & av.stream.Disposition.attached_pic:
            if stream.codec_context is None:
                raise VideoError(path, f"video stream #{stream.index} has a codec this FFmpeg cannot decode")
            return stream
    kinds = sorted({s.type for s in container.streams}) or ["none"]
    raise VideoError(path, f"has no video stream (streams: {', '.join(kinds)})")


def _scan(path: Path, container, stream) -> tuple[dict[str, np.ndarray], av.VideoFrame]:
    """Demux every packet of ``stream``; decode only until the first frame appears. Returns the packet columns
    (decode order) and the first frame (for its rotation and colour tags)."""
    ctx = stream.codec_context
    ctx.thread_count = 1  # one frame is all we decode: frame threading would only delay it
    ts_col, dts_col, key_col, discard_col, corrupt_col, dur_col, pos_col = [], [], [], [], [], [], []
    first = None
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
            pos_col.append(packet.pos if packet.pos is not None else -1)
            if first is None and decode_error is None and (fed or packet.is_keyframe):
                try:
                    frames = ctx.decode(packet)
                except av.FFmpegError as e:
                    decode_error = e
                    continue
                fed += 1
                if frames:
                    first = frames[0]
                elif fed >= _FIRST_FRAME_PACKETS:
                    decode_error = RuntimeError(f"no frame after {fed} packets")
    except av.FFmpegError as e:
        raise VideoError(path, f"demuxing failed after {len(ts_col)} packets: {_ffmpeg_cause(e)}") from e
    except IndexError as e:  # PyAV's demux on a packet of a stream that FFmpeg found only mid-file
        raise VideoError(path, f"demuxing failed after {len(ts_col)} packets: a stream appeared mid-file") from e
    if first is None and decode_error is None and fed:
        try:
            frames = ctx.decode(None)  # short streams: the first frame may only come out on draining
            if frames:
                first = frames[0]
        except av.FFmpegError as e:
            decode_error = e
    if not ts_col:
        raise VideoError(path, "video stream holds no frames")
    if first is None:
        cause = _ffmpeg_cause(decode_error) if decode_error else "no frame came out of the decoder"
        raise VideoError(path, f"video stream ({ctx.name}) cannot be decoded: {cause}")
    if corrupt_col[-1]:
        raise VideoError(path, "file is truncated: its last video packet is incomplete")
    declared = stream.frames
    if declared and len(ts_col) < declared and set(container.format.name.split(",")) & set(_INDEXED_FORMATS):
        raise VideoError(
            path, f"file is truncated: the container lists {declared} video frames, it holds {len(ts_col)}"
        )
    columns = {
        "ts": np.asarray(ts_col, np.int64),
        "dts": np.asarray(dts_col, np.int64),
        "key": np.asarray(key_col, bool),
        "discard": np.asarray(discard_col, bool),
        "duration": np.asarray(dur_col, np.int64),
        "pos": np.asarray(pos_col, np.int64),
    }
    return columns, first


def _timestamps_damaged(cols: dict[str, np.ndarray], container_format: str, reorders: bool) -> bool:
    """Whether pts order may disagree with the decoder's output order: AVI with a codec that reorders frames
    (AVI's timestamps count chunks, so B-frames and packed-bitstream MPEG-4 come out in another order), frames
    that share a pts, or a keyframe that pts would show before a frame decoded ahead of it (a join whose later
    part lost its reordering)."""
    if container_format == "avi" and reorders:
        return True
    ts = cols["ts"][~cols["discard"]]
    if np.unique(ts).size < ts.size:
        return True
    key_rows = np.flatnonzero(cols["key"])
    if key_rows.size < 2:
        return False
    shown_before = np.maximum.accumulate(cols["ts"])
    return bool(np.any(cols["ts"][key_rows[1:]] <= shown_before[key_rows[1:] - 1]))


def _decoded_order(path: Path, stream_index: int, rows: int) -> np.ndarray:
    """Decode the whole stream once; return, for each frame in output order, its packet's row (decode order).
    Packets carry their row to the frame they become (``copy_opaque``)."""
    container = _open_container(path)
    try:
        stream = container.streams[stream_index]
        ctx = stream.codec_context
        ctx.thread_type = "AUTO"  # frame threads keep the output order and hand each packet's opaque on
        ctx.copy_opaque = True
        frame_rows = []
        row = 0
        for packet in container.demux(stream):
            if packet.size:
                packet.opaque = row
                row += 1
            for frame in ctx.decode(packet):
                if frame.opaque is not None:
                    frame_rows.append(frame.opaque)
    except (av.FFmpegError, IndexError) as e:  # IndexError: as in _scan
        raise VideoError(path, f"decoding failed while ordering its frames: {_ffmpeg_cause(e)}") from e
    finally:
        container.close()
    if row != rows:
        raise VideoError(path, f"the file changed while it was probed ({row} packets, then {rows})")
    if not frame_rows:
        raise VideoError(path, "video stream holds no decodable frames")
    return np.asarray(frame_rows, np.int64)


def _build_table(
    path: Path, cols: dict[str, np.ndarray], time_base: Fraction, st: os.stat_result, container, stream_index: int
) -> tuple[FrameTable, np.ndarray, int]:
    """The frame table, the presentation indices of the frames that are keyframes, and the packet duration of the
    last frame (0 if unknown)."""
    ts = cols["ts"]
    key = cols["key"].copy()
    if not key.any():
        key[0] = True  # streams without keyframe flags can only be decoded from their first packet
    first_key = int(np.argmax(key))
    reorders = bool(container.streams[stream_index].codec_context.has_b_frames)
    by_position = _timestamps_damaged(cols, container.format.name, reorders)
    if by_position:
        pos = cols["pos"]
        if np.any(pos < 0) or np.unique(pos).size < pos.size:
            raise VideoError(path, "its timestamps are damaged and its packets have no byte positions to go by")
        frame_rows = _decoded_order(path, stream_index, ts.size)
    else:
        # Decoding starts at a keyframe, even one the demuxer discards (an edit list that starts mid-GOP, as
        # cutting without re-encoding makes); the frames are the packets from there on that are shown: not
        # discarded, and not leading frames of the first keyframe, which reference pictures before the start.
        shown = ~cols["discard"]
        shown[:first_key] = False
        shown &= ts >= ts[first_key]
        rows = np.flatnonzero(shown)
        if rows.size == 0:
            raise VideoError(path, "video stream holds no decodable frames")
        frame_rows = rows[np.argsort(ts[rows], kind="stable")]  # packet row of each frame, in presentation order
    pts = ts[frame_rows]
    # Numbers the frames that share a pts, or by position a packet (packed-bitstream MPEG-4 packs two pictures
    # into one packet): 0 for the first in output order.
    shared = frame_rows if by_position else pts
    order = np.argsort(shared, kind="stable")
    occurrence = np.empty(shared.size, np.int64)
    occurrence[order] = np.arange(shared.size) - np.searchsorted(shared[order], shared[order], side="left")
    if by_position:
        # Output index of each packet's (first) frame. A keyframe the demuxer discards (an edit list) shows
        # nothing itself: decoding from it starts with the first frame of a later packet.
        shown_at = np.full(ts.size, -1, np.int64)
        shown_at[frame_rows[::-1]] = np.arange(frame_rows.size)[::-1]
        later = np.where(shown_at >= 0, shown_at, np.iinfo(np.int64).max)
        shown_from = np.minimum.accumulate(later[::-1])[::-1]
        key_rows = np.flatnonzero(key)
        key_index = np.where(shown_at[key_rows] >= 0, shown_at[key_rows], shown_from[key_rows])
        # A keyframe starts an interval only if everything decoded before it is shown before it.
        shown_before = np.maximum.accumulate(np.concatenate([[-1], shown_at]))[key_rows]
        starts = (key_index > shown_before) & (key_index < frame_rows.size)
        key_rows, key_index = key_rows[starts], key_index[starts]
    else:
        key_rows = np.flatnonzero(key)
        key_pts = ts[key_rows]
        # A keyframe shown no later than one decoded before it cannot start an interval of its own.
        shown_before = np.maximum.accumulate(np.concatenate([[np.iinfo(np.int64).min], key_pts[:-1]]))
        key_rows = key_rows[key_pts > shown_before]
        key_index = np.searchsorted(pts, ts[key_rows], side="left")
    table = FrameTable(
        pts=_readonly(pts),
        occurrence=_readonly(occurrence.astype(np.int64)),
        decode_pos=_readonly(frame_rows.astype(np.int64)),
        key_index=_readonly(key_index.astype(np.int64)),
        key_decode_pos=_readonly(key_rows.astype(np.int64)),
        key_pts=_readonly(ts[key_rows]),
        key_dts=_readonly(cols["dts"][key_rows]),
        time_base=time_base,
        file_size=st.st_size,
        file_mtime_ns=st.st_mtime_ns,
        pos=_readonly(cols["pos"][frame_rows]),
        key_pos=_readonly(cols["pos"][key_rows]),
        by_position=by_position,
    )
    keyframe_indices = np.flatnonzero(cols["key"][frame_rows]).astype(np.int64)
    return table, keyframe_indices, int(cols["duration"][frame_rows[-1]])


def _frame_interval(table: FrameTable, last_duration: int, stream) -> int:
    """The duration of the last frame, in time_base units: its packet's duration, else the median frame step,
    else the container's nominal rate (the only use of metadata, for single-frame videos without durations)."""
    if last_duration > 0:
        return last_duration
    steps = np.diff(np.sort(table.pts))
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
        cols, first = _scan(path, container, stream)
        if cols["ts"].size == 1 and _is_image_format(container.format.name):
            # One picture is an image, not a video; an image sequence or an animated GIF is read as a video.
            raise VideoError(path, f"is a still image ({container.format.name}), not a video")
        table, keyframe_indices, last_packet_duration = _build_table(path, cols, time_base, st, container, stream.index)
        rotation = _normalized_degrees(90 * round(first.rotation / 90))  # the display matrix, to whole turns
        n = table.pts.size
        last_duration = _frame_interval(table, last_packet_duration, stream)
        duration_s = float((int(table.pts.max()) - int(table.pts.min()) + last_duration) * time_base)
        avg_fps = n / duration_s if duration_s > 0 else 0.0
        ctx = stream.codec_context
        sideways = rotation in (90, -90)
        info = VideoInfo(
            path=str(path),
            frame_count=n,
            duration_s=duration_s,
            avg_fps=avg_fps,
            width=ctx.height if sideways else ctx.width,
            height=ctx.width if sideways else ctx.height,
            codec=ctx.name,
            start_time_s=float(table.pts.min() * time_base),
            keyframe_indices=_readonly(keyframe_indices),
            rotation=rotation,
            container=container.format.name,
            stream_index=stream.index,
            time_base=time_base,
            stored_width=ctx.width,
            stored_height=ctx.height,
            color=ColorTags.of(first),
            pts_unique=bool(np.unique(table.pts).size == n),
            frames_counted_by="decoding" if table.by_position else "packets",
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


def _conversion(color: ColorTags) -> str:
    """How :func:`qv_jax.video._worker.convert_frame` turns this stream into RGB, in words."""
    if color.pixel_format.startswith(("rgb", "bgr", "argb", "abgr", "pal", "gray")):
        return "RGB / palette / grey input, copied to RGB24"
    matrix = {"bt709": "BT.709", "bt2020nc": "BT.2020", "bt2020c": "BT.2020", "smpte240m": "SMPTE 240M"}
    full = color.range == "pc" or color.pixel_format.startswith("yuvj")
    words = f"{matrix.get(color.space, 'BT.601')} matrix, {'full' if full else 'limited'} range"
    if color.transfer in ("smpte2084", "arib-std-b67"):
        words += ", HDR transfer kept as coded (no tone mapping)"
    return words


def describe(path: str | os.PathLike) -> str:
    """What the probe found in ``path``, for ``qv-jax decode --info``: streams, the one decoded, its codec, pixel
    format, colour tags, rotation, frame count and how it was counted, keyframes, and whether pts are unique."""
    info, table = probe(path)
    container = _open_container(Path(path))
    try:
        streams = []
        for s in container.streams:
            extra = ""
            if s.type == "video":
                extra = f" {s.codec_context.width}x{s.codec_context.height}"
                if s.disposition & av.stream.Disposition.attached_pic:
                    extra += " (cover art)"
            mark = "  <- decoded" if s.index == info.stream_index else ""
            codec = s.codec_context.name if s.codec_context is not None else "unknown"
            streams.append(f"  #{s.index} {s.type} {codec}{extra}{mark}")
    finally:
        container.close()
    color = info.color
    shared = int(table.pts.size - np.unique(table.pts).size)
    keys = info.keyframe_indices
    shown = ", ".join(map(str, keys[:12])) + (" ..." if keys.size > 12 else "")
    counted = (
        "decoding (damaged timestamps: frames are ordered as the decoder outputs them and known by byte position)"
        if table.by_position
        else "packets (one demux pass)"
    )
    lines = [
        f"file: {info.path}",
        f"container: {info.container}",
        "streams:",
        *streams,
        f"codec: {info.codec}, pixel format {color.pixel_format}{', interlaced' if color.interlaced else ''}",
        f"colour: matrix {color.space}, range {color.range}, transfer {color.transfer}, primaries {color.primaries}",
        f"  converted with: {_conversion(color)}",
        f"size: {info.stored_width}x{info.stored_height} stored, rotation {info.rotation} degrees counter-clockwise, "
        f"{info.width}x{info.height} as read",
        f"frames: {info.frame_count}, counted by {counted}",
        f"duration: {info.duration_s:.3f} s at {info.avg_fps:.3f} fps on average, start {info.start_time_s:.3f} s, "
        f"time base {info.time_base}",
        f"keyframes: {keys.size} at frames {shown}",
        f"pts unique: {'yes' if shared == 0 else f'no ({shared} frames share a pts with an earlier one)'}",
    ]
    return "\n".join(lines)
