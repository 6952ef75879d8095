"""Decoder worker process: ``python -m qv_jax.video._worker FD``.

A fresh interpreter (never a fork of a process that may run JAX) that imports only PyAV and numpy. It talks to
its parent over the socket ``FD`` with pickled messages:

    parent -> worker   ("decode", task)   decode one interval into the shared frame buffer
                       ("cancel", task_id) abandon that task if it is still running
                       ("stop",)          exit
    worker -> parent   ("ready", pid)
                       ("progress", task_id, slots)   slots written since the last message (also a heartbeat)
                       ("done", task_id, slots, stats)
                       ("error", task_id, message)
                       ("cancelled", task_id)

A task names the file, the seek targets of its keyframe, the pts (and occurrence number, for the rare frames that
share a pts) of every wanted frame, or for files with damaged timestamps its packet's byte position, and the
buffer slot each goes to. The worker seeks once, checks that the demuxer landed on or before its keyframe
(seeking earlier otherwise), decodes with one thread (skipping the unwanted H.264 / HEVC frames that nothing
references), converts, resizes and turns each wanted frame with one reused swscale context, writes it into its
slot of the memory-mapped buffer, and stops as soon as the last wanted frame is out.
"""

from __future__ import annotations

import itertools
import mmap
import os
import signal
import sys
import time
from multiprocessing.connection import Connection

import av
import numpy as np

SKIP_UNREFERENCED_CODECS = ("h264", "hevc")
PROGRESS_INTERVAL_S = 0.02  # batch progress messages: at most ~50 per second per worker
HEARTBEAT_S = 1.0  # a worker busy on frames it does not keep still reports this often

_INTERPOLATION = {
    "bicubic": av.video.reformatter.Interpolation.BICUBIC,
    "bilinear": av.video.reformatter.Interpolation.BILINEAR,
    "area": av.video.reformatter.Interpolation.AREA,
    "lanczos": av.video.reformatter.Interpolation.LANCZOS,
    "point": av.video.reformatter.Interpolation.POINT,
}


_COLOR_RANGES = {1: av.video.reformatter.ColorRange.MPEG, 2: av.video.reformatter.ColorRange.JPEG}


class Cancelled(Exception):
    """The parent asked to abandon the running task, or went away."""


def convert_frame(
    reformatter, frame, height: int, width: int, interpolation: str, out: np.ndarray, rotation: int = 0
) -> None:
    """Colour-convert, resize and rotate a decoded frame into ``out`` [height, width, 3], RGB24 as displayed.

    swscale with the frame's matrix and range tags (untagged matrix: BT.601, untagged range: by pixel format),
    one thread. At native size chroma is upsampled bilinearly, exactly as PyAV's ``to_ndarray(format="rgb24")``
    and so torchvision's ``read_video`` (one of qwen-vl-utils' readers) convert; a resize uses ``interpolation``.
    Then the frame is turned ``rotation`` degrees counter-clockwise (a multiple of 90). Tests run the same call on
    a sequential decode to compare bit for bit.
    """
    turns = rotation // 90 % 4
    stored_h, stored_w = (width, height) if turns % 2 else (height, width)
    native = (stored_h, stored_w) == (frame.height, frame.width)
    rgb = reformatter.reformat(
        frame,
        width=stored_w,
        height=stored_h,
        format="rgb24",
        src_color_range=_COLOR_RANGES.get(frame.color_range),
        interpolation=_INTERPOLATION["bilinear" if native else interpolation],
        threads=1,
    )
    plane = rgb.planes[0]
    rows = np.frombuffer(plane, np.uint8).reshape(stored_h, plane.line_size)
    image = rows[:, : stored_w * 3].reshape(stored_h, stored_w, 3)
    out[...] = np.rot90(image, turns) if turns else image


class _Source:
    """An open input file, kept across tasks of the same file to spare re-parsing its index."""

    def __init__(self, path: str, stream_index: int, identity: tuple):
        self.path, self.identity = path, identity
        self.container = av.open(path, mode="r", metadata_errors="replace")
        self.stream = self.container.streams[stream_index]
        ctx = self.stream.codec_context
        ctx.thread_count = 1  # one decoder thread per worker: the pool is the parallelism
        ctx.copy_opaque = True  # frames carry back what their packet carried: its byte position, when tagged
        # FFmpeg's H.264 / HEVC decoders read skip_frame per slice, so it can be switched packet by packet to skip
        # unwanted frames that no other frame references, without changing any other frame. dav1d applies it with
        # a delay, so switching it there changes which frames come out: only these two codecs qualify.
        self.skip_unreferenced = ctx.name in SKIP_UNREFERENCED_CODECS

    def close(self) -> None:
        self.container.close()


class Worker:
    def __init__(self, conn: Connection):
        self.conn = conn
        self.source: _Source | None = None
        self.reformatter = av.video.reformatter.VideoReformatter()

    def serve(self) -> None:
        self._send(("ready", os.getpid()))
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                return  # the parent is gone
            kind = message[0]
            if kind == "stop":
                return
            if kind == "decode":
                self._run(message[1])
            # A "cancel" for a task that has already finished needs nothing.

    def _run(self, task: dict) -> None:
        task_id = task["id"]
        try:
            slots, stats = self._decode(task)
        except Cancelled:
            self._send(("cancelled", task_id))
        except Exception as e:  # report everything: the parent turns it into a DecodeWorkerError
            self._send(("error", task_id, f"{type(e).__name__}: {e}"))
        else:
            self._send(("done", task_id, slots, stats))

    def _send(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except OSError:
            sys.exit(0)  # the parent is gone

    def _check_cancel(self, task_id: int) -> None:
        if self.conn.poll():
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                sys.exit(0)
            if message[0] == "stop":
                sys.exit(0)
            if message[0] == "cancel" and message[1] == task_id:
                raise Cancelled

    def _open(self, task: dict) -> _Source:
        identity = (task["path"], task["stream"], task["file_size"], task["file_mtime_ns"])
        if self.source is None or self.source.identity != identity:
            if self.source is not None:
                self.source.close()
                self.source = None
            self.source = _Source(task["path"], task["stream"], identity)
        return self.source

    def _seek(self, task: dict, stats: dict):
        """Packets from a keyframe at or before the task's keyframe. The demuxer may land late (MP4 seeks by one
        clock, MPEG-TS by another) or on a non-keyframe; we check the first keyframe it yields, and seek to an
        earlier target, or finally reopen the file and start from its beginning, when it is past ours."""
        key_pts, key_pos = task["key_pts"], task["key_pos"]
        source = self._open(task)
        for target in task["seek_targets"]:
            stats["seeks"] += 1
            try:
                source.container.seek(target, stream=source.stream, backward=True)
            except av.FFmpegError:
                continue
            packets = source.container.demux(source.stream)
            for packet in packets:
                if packet.size == 0:
                    break  # end of file before any keyframe
                if not packet.is_keyframe:
                    continue
                if key_pos is not None:
                    # Damaged timestamps: only the byte position says whether we are at or before our keyframe.
                    if packet.pos is not None and 0 <= packet.pos <= key_pos:
                        return itertools.chain((packet,), packets)
                    break
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is not None and ts <= key_pts:
                    return itertools.chain((packet,), packets)
                break
        stats["seeks"] += 1  # back to the start, the one position every demuxer gets right
        source.close()
        self.source = None
        source = self._open(task)
        packets = source.container.demux(source.stream)
        return itertools.dropwhile(lambda p: p.size and not p.is_keyframe, packets)

    def _decode(self, task: dict) -> tuple[np.ndarray, dict]:
        task_id, key_pts = task["id"], task["key_pts"]
        height, width, interpolation, rotation = task["height"], task["width"], task["interpolation"], task["rotation"]
        by_position = task["key_pos"] is not None
        if by_position:
            keys = task["pos"]
        else:
            keys = task["pts"]
        slot_of = {(int(k), int(o)): int(s) for k, o, s in zip(keys, task["occurrence"], task["slots"], strict=True)}
        wanted = {p for p, _ in slot_of}
        last_pts = int(task["pts"].max())
        stats = {"packets": 0, "frames_decoded": 0, "seeks": 0}
        seen: dict[int, int] = {}
        written: list[int] = []
        reported = 0
        last_message = time.monotonic()
        with open(task["buffer"], "r+b") as f:
            mapping = mmap.mmap(f.fileno(), task["buffer_bytes"])
        frames = np.frombuffer(mapping, np.uint8).reshape(-1, height, width, 3)
        try:
            packets = self._seek(task, stats)
            ctx = self.source.stream.codec_context
            skipping = self.source.skip_unreferenced
            mode = ctx.skip_frame = "DEFAULT"
            finished = False
            for packet in packets:
                self._check_cancel(task_id)
                stats["packets"] += packet.size > 0
                if by_position and packet.size:
                    packet.opaque = packet.pos
                if skipping and packet.size:
                    key = packet.pos if by_position else packet.pts
                    wanted_mode = "DEFAULT" if key is None or key in wanted else "NONREF"
                    if wanted_mode != mode:
                        ctx.skip_frame = mode = wanted_mode
                for frame in ctx.decode(packet):
                    stats["frames_decoded"] += 1
                    if by_position:
                        key = frame.opaque
                    else:
                        key = pts = frame.pts
                        if pts is None or pts < key_pts:
                            continue  # frames of an earlier GOP, decoded only to reach ours
                    occurrence = seen.get(key, 0)
                    seen[key] = occurrence + 1
                    slot = slot_of.pop((key, occurrence), None)
                    if slot is not None:
                        convert_frame(self.reformatter, frame, height, width, interpolation, frames[slot], rotation)
                        written.append(slot)
                    # The decoder emits in presentation order: past the last wanted pts nothing wanted is left.
                    if not slot_of or (not by_position and pts > last_pts):
                        finished = True
                        break
                if finished:
                    break
                now = time.monotonic()
                if now - last_message >= (PROGRESS_INTERVAL_S if len(written) > reported else HEARTBEAT_S):
                    self._send(("progress", task_id, np.asarray(written[reported:], np.int64)))
                    reported, last_message = len(written), now
        finally:
            del frames
            try:
                mapping.close()
            except BufferError:
                pass  # a traceback still holds a view of it; the mapping goes when that does
        if slot_of:
            missing = sorted(p for p, _ in slot_of)
            what = "at byte position" if by_position else "at pts"
            raise RuntimeError(
                f"the decoder produced no frame {what} {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                f"(time base {self.source.stream.time_base}): the stream is damaged there, or the file changed since "
                "it was probed"
            )
        return np.asarray(written[reported:], np.int64), stats


def main(argv: list[str]) -> None:
    # Ctrl-C in a terminal reaches the whole process group; the parent decides what the workers do.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    Worker(Connection(int(argv[1]))).serve()


if __name__ == "__main__":
    main(sys.argv)
