"""``qv-jax watch``: watch a live video (a file, or a byte stream on standard input) into a bounded memory of
semantic carriers and answer questions on a schedule or typed at the terminal. See docs/streaming.md."""

from __future__ import annotations

import argparse
import re
import sys
import threading
from pathlib import Path

from qv_jax.cli.options import DTYPES
from qv_jax.cli.report import add_output_options, print_json
from qv_jax.errors import InputError

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
# typed instead of a question, these stop watching (as the end of input does)
QUIT = ("quit", "exit")


def parse_duration(text: str) -> float:
    """``30s``, ``2m``, ``1h`` or plain seconds, as seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text)
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"a positive duration like 30s, 2m or 1h, got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "watch",
        help="watch a live video and answer questions as it plays",
        description="Watch SOURCE (a video file, or - for an MPEG-TS / Matroska byte stream on standard input, "
        "e.g. `ffmpeg -i CAMERA -f mpegts - | qv-jax watch - ...`) into a fixed-size memory of semantic carriers "
        "(VideoScan) and print each answer with its stream time; on exit a summary.",
    )
    parser.add_argument("source", help="video file, or - for standard input")
    parser.add_argument("--model", type=Path, required=True, help="model directory (HF or qv-jax checkpoint)")
    parser.add_argument("--dtype", choices=DTYPES, help="parameter dtype (default: bfloat16 on GPU/TPU, float32)")
    parser.add_argument(
        "--question",
        default="What is happening?",
        help="the question asked on the schedule and at the end (default: %(default)r)",
    )
    parser.add_argument(
        "--ask-every",
        type=parse_duration,
        metavar="DURATION",
        help="ask every DURATION of stream time, e.g. 30s, 2m (default: only at the end)",
    )
    parser.add_argument(
        "--interactive",
        action="store_true",
        help="read questions from the terminal while watching; quit, exit or Ctrl-D stops",
    )
    parser.add_argument("--carriers", type=int, default=64, help="carriers the memory holds (default 64)")
    parser.add_argument("--keep-visual", type=int, default=0, help="visual tokens kept per patch (default 0)")
    parser.add_argument("--fps", type=float, default=1.0, help="frames taken per second of stream (default 1)")
    parser.add_argument("--realtime", action="store_true", help="play a file at its own frame rate")
    parser.add_argument("--max-pixels", type=int, default=448 * 448, help="pixels per frame (default 448x448)")
    parser.add_argument("--format", default="mpegts", help="container of standard input (default mpegts)")
    parser.add_argument(
        "--stall-timeout",
        type=parse_duration,
        default=10.0,
        help="end when no frame comes for this long (default 10s)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens (default 64)")
    add_output_options(parser, bars=False)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qv_jax.video.live import file_source, pipe_source
    from qv_jax.videoqa import VideoQA

    if args.source == "-":
        source = pipe_source(
            sys.stdin.buffer, format=args.format, max_pixels=args.max_pixels, stall_timeout_s=args.stall_timeout
        )
        if args.interactive and not Path("/dev/tty").exists():
            raise InputError("--interactive with - needs a terminal for the questions (standard input is the video)")
    else:
        source = file_source(
            args.source, realtime=args.realtime, max_pixels=args.max_pixels, stall_timeout_s=args.stall_timeout
        )
    qa = VideoQA.from_pretrained(args.model, dtype=args.dtype)
    stream = qa.stream(carriers=args.carriers, keep_visual=args.keep_visual, fps=args.fps)
    asked = {"next": args.ask_every}
    printing = threading.Lock()  # typed questions are answered on their own thread: one whole line at a time

    def answer(question: str) -> None:
        """Answer and print with the stream time the answer saw up to."""
        reply = stream.ask(question, max_new_tokens=args.max_new_tokens)
        t = reply.stream_time_s
        with printing:
            if args.json:
                record = {"stream_time_s": t, "question": question, "answer": reply.text}
                record |= {"token_ids": reply.token_ids.tolist(), "kv_bytes": reply.kv_bytes}
                print_json({"command": "watch", **record})
            else:
                print(f"[{t:8.1f} s] {question} -> {reply.text}", flush=True)

    def on_schedule(t: float) -> None:
        if args.ask_every is not None and t >= asked["next"] and stream.patches:
            answer(args.question)
            asked["next"] += args.ask_every * (1 + int((t - asked["next"]) // args.ask_every))

    if args.interactive:
        questions = (args.source == "-", answer, source)
        threading.Thread(target=_questions, args=questions, name="qv-jax-watch-questions", daemon=True).start()
    try:
        report = stream.feed(source, after_frame=on_schedule)
    finally:
        print(
            f"watched {stream.frames_seen} frames ({source.dropped} dropped while the model was busy, "
            f"{stream.patches} patches), kv {stream.kv_bytes / 2**20:.2f} MiB",
            file=sys.stderr,
        )
    if stream.patches:
        answer(args.question)
    print(f"{report.message}; real-time factor {report.realtime_factor:.2f}", file=sys.stderr)
    if args.json:
        summary = {"frames_seen": stream.frames_seen, "dropped": source.dropped, "patches": stream.patches}
        summary |= {"kv_bytes": stream.kv_bytes, "realtime_factor": report.realtime_factor}
        summary |= {"ended": report.ended, "message": report.message}
        print_json({"command": "watch", "summary": summary})
    return 0


def _questions(from_tty: bool, answer, source) -> None:
    """Answer each line typed at the terminal (``/dev/tty`` when standard input carries the video); ``quit``,
    ``exit`` or the end of input (Ctrl-D) stops watching, and the run ends with its last answer and summary."""
    lines = open("/dev/tty") if from_tty else sys.stdin
    reason = "watching stopped: the questions ended"
    for line in lines:
        question = line.strip()
        if question.lower() in QUIT:
            reason = f"watching stopped ({question})"
            break
        if question:
            try:
                answer(question)
            except InputError as e:
                print(f"qv-jax watch: {e}", file=sys.stderr)
    source.close(reason)
