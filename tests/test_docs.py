"""Every code block in docs/ runs, every fence says what it holds, and every relative link resolves.

The convention (stated for readers at the end of docs/guide.md):

- ```python blocks run in order, one namespace per page, in a scratch directory prepared by a hidden set-up: tiny
  random-weight models in the Hugging Face layout under the names the pages use, short generated videos, a
  DuoAttention pattern, plus the names a page uses without defining them (:data:`PAGE_SETUP`);
- ```bash blocks run line by line in the same directory: ``qv-jax`` lines through the CLI's entry point (in
  process, so compiled steps are shared), ``pip install`` lines checked but not run, anything else in ``bash``;
- ```text blocks (output, diagrams, formulas) are not code; any other fence, or an indented code block, fails.

A block that starts JAX's distributed runtime (:data:`MULTI_PROCESS`) runs as a script in several processes at
once, on one machine, each with two host devices, after a set-up of its own.

What CI lacks is substituted (:data:`SUBSTITUTIONS`), never skipped, and a substitution that no longer matches its
page fails. All pages run in one subprocess (this file run as a script) on the CPU with eight host devices, so
the mesh examples really shard; the tests below read its report.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
from process_helpers import free_port, run_ranks

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RUN_LANGS = ("python", "bash")
NOT_CODE_LANGS = ("text",)
HOST_DEVICES = 8  # the sharding page's mesh is data=2 x model=4

_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[^`\s]*)\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
    page: str  # path relative to docs/
    line: int  # 1-based line of the opening fence
    lang: str
    code: str

    @property
    def where(self) -> str:
        return f"docs/{self.page}:{self.line}"


def pages() -> list[str]:
    return sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))


def fenced_blocks(page: str) -> list[Block]:
    """The fenced blocks of ``page`` in order, dedented by their fence's indent."""
    blocks, open_fence, body = [], None, []
    for number, line in enumerate((DOCS / page).read_text().split("\n"), start=1):
        m = _FENCE.match(line)
        if open_fence is None:
            if m:
                open_fence, body = (number, m["indent"], m["lang"]), []
        elif m and not m["lang"]:
            start, indent, lang = open_fence
            code = "\n".join(b[len(indent) :] if b.startswith(indent) else b for b in body)
            blocks.append(Block(page, start, lang, code + "\n"))
            open_fence = None
        else:
            body.append(line)
    if open_fence is not None:
        raise AssertionError(f"docs/{page}:{open_fence[0]}: unclosed code fence")
    return blocks


def indented_code_lines(page: str) -> list[int]:
    """Lines that start an indented (unfenced) code block: 4+ spaces after a blank line, outside fences and
    lists."""
    found, in_fence, prev, in_list = [], False, "", False
    for number, line in enumerate((DOCS / page).read_text().split("\n"), start=1):
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            if re.match(r"^\s*([-*+]|\d+\.)\s", line):
                in_list = True
            elif not line.startswith(" ") and line.strip():
                in_list = False
            if line.startswith("    ") and line.strip() and not prev.strip() and not in_list:
                found.append(number)
        prev = line
    return found


# ---------------------------------------------------------------------------------------------------------------
# What the hidden set-up provides

# Names each page uses without defining them, made before its first block runs (in the page's scratch directory).
PAGE_SETUP = {
    "attention.md": """
import jax
import numpy as np
from qv_jax.model.tokenizer import Tokenizer

# queries for 8 heads over 4 KV heads (one pattern each), 512 positions
q = jax.random.normal(jax.random.key(0), (1, 8, 512, 64))
k = jax.random.normal(jax.random.key(1), (1, 4, 512, 64))
v = jax.random.normal(jax.random.key(2), (1, 4, 512, 64))
mask = np.array([[False, True], [True, False]])   # [layers, KV heads] of the tiny model
input_ids = np.array([Tokenizer.from_dir("Qwen2.5-VL-7B-Instruct").encode("A question about a long video?")])
""",
    "positions.md": """
import numpy as np
from qv_jax.model.tokenizer import Tokenizer

t, h, w = 3, 6, 8
sample_fps = 1.0
input_ids = Tokenizer.from_dir("Qwen2.5-VL-7B-Instruct").video_prompt("What happens?", (t, h, w)).input_ids[None]
mask = np.ones_like(input_ids)
cache_length = input_ids.shape[1]
""",
    "sharding.md": """
import jax.numpy as jnp
from qv_jax.converters.hf_config import config_from_hf
from qv_jax.model.preprocess import patchify
from qv_jax.model.tokenizer import Tokenizer
from qv_jax.video import VideoReader

with VideoReader("match.mp4") as reader:
    frames = reader.read(num_frames=4, size=(112, 112)).frames
pv, grid = patchify(jnp.asarray(frames), config_from_hf("Qwen2.5-VL-7B-Instruct").vision)
input_ids = Tokenizer.from_dir("Qwen2.5-VL-7B-Instruct").video_prompt("What happens?", grid[0]).input_ids[None]
""",
}

# Blocks that start jax.distributed (before anything touches a device) run in their own processes: page, a text
# that marks the block, the number of processes, and the set-up each process runs first (no device work).
MULTI_PROCESS = {
    ("sharding.md", "jax.distributed.initialize("): (
        2,
        """
import numpy as np
from qv_jax.model.tokenizer import Tokenizer

input_ids = np.array([Tokenizer.from_dir("Qwen2.5-VL-7B-Instruct").encode("A question about a long video?")])
""",
    ),
}
DEVICES_PER_PROCESS = 2


@dataclasses.dataclass(frozen=True)
class Substitution:
    page: str
    old: str
    new: str
    why: str
    cpu_only: bool = False  # applies only when JAX runs on the CPU


SUBSTITUTIONS = (
    Substitution(
        "attention.md",
        'backend="pallas"',
        'backend="interpret"',
        "no TPU / GPU in CI: the same Pallas kernels run in the interpreter",
        cpu_only=True,
    ),
    Substitution(
        "sharding.md",
        '"10.0.0.1:1234"',
        '"127.0.0.1:{port}"',
        "the processes run on one machine: the coordinator on localhost, at a free port",
    ),
    Substitution(
        "sharding.md",
        '"/shared/Qwen2.5-VL-7B-ckpt"',
        '"Qwen2.5-VL-7B-ckpt"',
        "the shared checkpoint is the tiny model's, converted by the set-up",
    ),
    Substitution(
        "guide.md",
        "from huggingface_hub import snapshot_download",
        "snapshot_download = HUB_STAND_IN",
        "no hub in CI: the stand-in checks the call against huggingface_hub and returns the local tiny model",
    ),
)

HUB_MODELS = ("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct")


def hub_stand_in(repo_id: str, *args, **kwargs) -> str:
    """``huggingface_hub.snapshot_download`` for CI: the same signature, the tiny model of that name."""
    from huggingface_hub import snapshot_download

    inspect.signature(snapshot_download).bind(repo_id, *args, **kwargs)
    if repo_id not in HUB_MODELS:
        raise AssertionError(f"the docs download {repo_id!r}; the set-up provides {HUB_MODELS}")
    local = Path(kwargs.get("local_dir") or repo_id.split("/")[1])
    if not (local / "config.json").is_file():
        raise AssertionError(f"{local}: the set-up has no tiny model there")
    return str(local.absolute())


def make_fixtures(root: Path) -> Path:
    """The shared scratch files: tiny models named like the real ones, videos, a DuoAttention pattern."""
    from qv_jax.converters.qwen2_5_vl import convert
    from qv_jax.testing import make_sample_video, tiny_config, write_hf_dir

    shared = root / "shared"
    write_hf_dir(shared / "Qwen2.5-VL-7B-Instruct", seed=0)
    write_hf_dir(shared / "Qwen2.5-VL-3B-Instruct", seed=1)  # another model: memories do not transfer
    convert(shared / "Qwen2.5-VL-7B-Instruct", shared / "Qwen2.5-VL-7B-ckpt", dtype="float32")
    make_sample_video(shared / "match.mp4", seconds=4, fps=24, size=(240, 320), gop=24)
    make_sample_video(shared / "movie.mp4", seconds=6, fps=24, size=(360, 640), gop=48, bframes=2)
    # one DuoAttention gate per layer and KV head, all different
    layers, heads = tiny_config().text.num_layers, tiny_config().text.num_kv_heads
    gates = [[0.9 - 0.3 * head + 0.1 * layer for head in range(heads)] for layer in range(layers)]
    (shared / "pattern_dir").mkdir()
    (shared / "pattern_dir" / "full_attention_heads.tsv").write_text(
        "\n".join("\t".join(f"{g:.2f}" for g in row) for row in gates) + "\n"
    )
    return shared


# ---------------------------------------------------------------------------------------------------------------
# Running blocks (in the subprocess)


def substituted(block: Block, *, cpu: bool) -> tuple[str, list[Substitution]]:
    code, used = block.code, []
    for s in SUBSTITUTIONS:
        if s.page == block.page and s.old in code and (cpu or not s.cpu_only):
            code, used = code.replace(s.old, s.new), [*used, s]
    return code, used


def bash_lines(code: str) -> list[str]:
    """Logical command lines: backslash continuations joined, blank and comment-only lines dropped."""
    joined = re.sub(r"\\\n", " ", code)
    return [line for line in joined.split("\n") if line.strip() and not line.lstrip().startswith("#")]


def check_pip_install(args: list[str]) -> None:
    """A ``pip install`` line, checked rather than run: requirements parse (PEP 508) and the extras asked of
    qv-jax (``.[x]``, ``qv-jax[x] @ ...``) exist in pyproject.toml."""
    import tomllib

    from packaging.requirements import Requirement

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    targets = [a for a in args if not a.startswith("-")]
    if not targets:
        raise AssertionError(f"pip install {' '.join(args)}: nothing to install")
    for target in targets:
        m = re.fullmatch(r"\.(?:\[(?P<extras>[^\]]*)\])?", target)
        if m:
            asked = {e.strip() for e in (m["extras"] or "").split(",") if e.strip()}
        else:
            req = Requirement(target)
            asked = set(req.extras) if req.name == "qv-jax" else set()
        missing = asked - extras
        if missing:
            raise AssertionError(
                f"pip install {target}: qv-jax has no extra {sorted(missing)} (it has {sorted(extras)})"
            )


def run_bash(code: str, cwd: Path) -> None:
    from qv_jax.cli import main

    for line in bash_lines(code):
        words = shlex.split(line, comments=True)
        print(f"$ {line.strip()}", flush=True)
        if words[0] == "qv-jax":
            try:
                status = main(words[1:])
            except SystemExit as e:  # argparse rejects the command line
                status = e.code
            if status != 0:
                raise AssertionError(f"`{line.strip()}` exited with {status}")
        elif words[:2] == ["pip", "install"]:
            check_pip_install(words[2:])
        else:
            subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=cwd, check=True)


def run_in_processes(code: str, setup: str, processes: int, cwd: Path) -> None:
    """Run ``setup`` then ``code`` as one script in ``processes`` processes at once (``RANK`` = 0, 1, ...), each
    with its own host devices; every one must exit 0."""
    script = cwd / f"_block_{free_port()}.py"
    script.write_text(setup + "\n" + code.replace("{port}", str(free_port())))
    logs = cwd / f"{script.stem}_logs"
    logs.mkdir()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}")
    run_ranks(lambda rank: [sys.executable, str(script)], processes, logs, env=env, cwd=cwd)


def run_pages(names: list[str], report: Path) -> None:
    import jax

    cpu = jax.default_backend() == "cpu"
    root = Path(tempfile.mkdtemp(prefix="qv-jax-docs-"))
    started = time.perf_counter()
    shared = make_fixtures(root)
    results = [{"block": "set-up", "status": "ok", "seconds": time.perf_counter() - started}]
    for name in names:
        cwd = root / "pages" / name.replace("/", "_")
        cwd.mkdir(parents=True)
        for item in shared.iterdir():
            (cwd / item.name).symlink_to(item, target_is_directory=item.is_dir())
        os.chdir(cwd)
        namespace = {"__name__": "__docs__", "HUB_STAND_IN": hub_stand_in}
        failed = None
        try:
            exec(compile(PAGE_SETUP.get(name, ""), f"<set-up of {name}>", "exec"), namespace)
        except Exception:
            failed = f"the set-up of {name}"
            results.append({"block": failed, "status": "failed", "error": traceback.format_exc()})
        for block in fenced_blocks(name):
            if block.lang not in RUN_LANGS:
                continue
            entry = {"page": name, "line": block.line, "lang": block.lang}
            if failed is not None:
                results.append({**entry, "status": "not reached", "error": f"an earlier block failed ({failed})"})
                continue
            code, used = substituted(block, cpu=cpu)
            entry["substitutions"] = [s.why for s in used]
            print(f"--- {block.where} ({block.lang})", flush=True)
            t0 = time.perf_counter()
            try:
                multi = [v for (page, mark), v in MULTI_PROCESS.items() if page == name and mark in code]
                if multi:
                    run_in_processes(code, multi[0][1], multi[0][0], cwd)
                elif block.lang == "python":
                    exec(compile(code, block.where, "exec"), namespace)
                else:
                    run_bash(code, cwd)
            except BaseException:
                failed = block.where
                results.append({**entry, "status": "failed", "error": traceback.format_exc()})
            else:
                results.append({**entry, "status": "ok", "seconds": time.perf_counter() - t0})
        os.chdir(root)
    report.write_text(json.dumps(results, indent=1))


# ---------------------------------------------------------------------------------------------------------------
# The tests


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[tuple[str, int], dict]:
    out = tmp_path_factory.mktemp("docs") / "report.json"
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={HOST_DEVICES}",
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
        XDG_CACHE_HOME=str(out.parent / "cache"),  # where `qv-jax decode` / `demo` keep their sample video
    )
    proc = subprocess.run(
        [sys.executable, __file__, str(out), *pages()], env=env, capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"the docs runner crashed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    entries = json.loads(out.read_text())
    return {(e["page"], e["line"]): e for e in entries if "page" in e}


@pytest.mark.parametrize("page", pages())
def test_every_fence_is_tagged_and_no_code_is_indented(page):
    langs = {(b.line, b.lang) for b in fenced_blocks(page)}
    bad = [f"docs/{page}:{line} ```{lang}" for line, lang in sorted(langs) if lang not in RUN_LANGS + NOT_CODE_LANGS]
    assert not bad, f"fences must say python, bash (run) or text (not code): {bad}"
    indented = indented_code_lines(page)
    assert not indented, f"docs/{page}: indented code blocks at lines {indented}; use a fence"


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in pages() if any(b.lang in RUN_LANGS for b in fenced_blocks(p))])
def test_code_blocks_run(page, report):
    blocks = [b for b in fenced_blocks(page) if b.lang in RUN_LANGS]
    for block in blocks:
        entry = report.get((page, block.line))
        assert entry is not None, f"{block.where}: the runner did not run this block"
        assert entry["status"] == "ok", f"{block.where} ({block.lang}) {entry['status']}:\n{entry.get('error')}"


def test_every_substitution_matches_its_page():
    for s in SUBSTITUTIONS:
        assert (DOCS / s.page).is_file(), s
        assert any(s.old in b.code for b in fenced_blocks(s.page) if b.lang in RUN_LANGS), (
            f"substitution {s.old!r} no longer occurs in a code block of docs/{s.page}: remove or update it"
        )
    for page in PAGE_SETUP:
        assert (DOCS / page).is_file(), f"PAGE_SETUP names docs/{page}, which does not exist"
    for page, mark in MULTI_PROCESS:
        assert any(mark in b.code for b in fenced_blocks(page)), f"no block of docs/{page} contains {mark!r}"


def test_the_guide_lists_every_subcommand_with_options_it_has():
    """The guide's CLI table has a row per subcommand, and every option it names exists on that subcommand."""
    import argparse

    from qv_jax.cli import COMMANDS, build_parser

    parser = build_parser()
    (subparsers,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = (DOCS / "guide.md").read_text()
    rows = dict(re.findall(r"^\| `qv-jax ([\w-]+)[^`]*` \|(.*)$", text, flags=re.M))
    assert sorted(rows) == sorted(COMMANDS), "the guide's command table and qv_jax.cli.COMMANDS differ"
    shared = re.search(r"^`demo`, `ask` and `encode` share .*?\.", text, flags=re.M | re.S).group(0)
    for name, row in rows.items():
        options = set(subparsers.choices[name]._option_string_actions)
        named = set(re.findall(r"`(--[a-z-]+)", row))
        if name in ("demo", "ask", "encode"):
            named |= set(re.findall(r"`(--[a-z-]+)`", shared))
        assert named <= options, f"qv-jax {name} has no {sorted(named - options)}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but hyphens dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {_slug(m) for m in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}


@pytest.mark.parametrize("page", pages())
def test_relative_links_resolve(page):
    source = DOCS / page
    text = re.sub(r"^```.*?^```", "", source.read_text(), flags=re.S | re.M)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        resolved = (source.parent / path).resolve() if path else source
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(target)
    assert not broken, f"docs/{page}: broken links {broken}"


if __name__ == "__main__":
    run_pages(sys.argv[2:], Path(sys.argv[1]))
