"""The README's examples run as written, and every relative link in README.md and docs/*.md resolves.

A README code block is run when the line right before its fence is ``<!-- runnable -->`` (an HTML
comment: invisible on GitHub). Every marked block runs, in README order, in one temporary working
directory that links ``configs/`` from the repository, so a later block uses the runs of an earlier one:

- a ``bash`` block: each line that starts with ``diffusekit`` (its ``# comment`` dropped) goes through
  ``diffusekit.cli.main`` and must exit 0 and leave the outputs it names (the run folder of ``train`` and
  ``demo``, the folder ``sample`` and ``restore`` print, ``<run>/eval/report.md``, ``<run>/grids.json``);
- a ``python`` block is executed as a script.

To keep this file under a minute on one thread the examples are shrunk, openly and only like this:
``train`` and ``demo`` lines get ``TINY`` appended (a two-step, 8-channel U-Net with T = 50; a later
``--set`` wins, so only the keys TINY names change), the Python block gets the same overrides after its
own in its ``load_config`` call, ``tune-grid`` lines get ``--examples 16 --max-evals 4``, and every
command line gets ``--no-progress``. Seeds, samplers and step counts are the README's own. After all
blocks ran, every ``runs/...`` path the README names must exist.

Left unmarked, and so not run here: the clone and install lines (``git clone``, ``make``, ``pip``) and
``diffusekit app``, which serves a page until Ctrl-C (tests/test_app.py covers it). The README has no
text-to-image or MNIST example; those live in docs/text2img.md and docs/vae.md, whose commands take
minutes and are covered by tests/test_text_latent.py and tests/test_vae.py on tiny settings.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from diffusekit.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARK = "<!-- runnable -->"

TINY = ["train.steps=2", "train.batch_size=8", "model.base_channels=8", "model.norm_groups=4", "diffusion.T=50",
        "train.sample_every=0", "train.n_sample=4", "train.log_every=1"]
TUNE_GRID_TINY = ["--examples", "16", "--max-evals", "4"]
PYTHON_OVERRIDES = '["train.steps=300"]'  # the Python quick start's overrides, extended by TINY


def runnable_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block whose fence follows a ``<!-- runnable -->`` line."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == MARK:
            fence = lines[i + 1].strip()
            assert fence.startswith("```"), f"README line {i + 2}: {MARK} must be followed by a code fence"
            end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
            blocks.append((fence[3:].strip(), "\n".join(lines[i + 2:end])))
            i = end
        i += 1
    return blocks


def command_lines(body: str) -> list[list[str]]:
    """The ``diffusekit ...`` lines of a bash block as argument lists (comments dropped)."""
    commands = []
    for line in body.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "diffusekit":
            commands.append(words[1:])
    return commands


def shrink(argv: list[str]) -> list[str]:
    """The rewriting the module docstring describes."""
    command = argv[0]
    extra = []
    if command in ("train", "demo"):
        extra = [arg for key in TINY for arg in ("--set", key)]
    elif command == "tune-grid":
        extra = list(TUNE_GRID_TINY)
    return [*argv, *extra, "--no-progress"]


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def check_outputs(argv: list[str], out: str) -> None:
    """The outputs a command line names exist."""
    command = argv[0]
    printed = re.findall(r"-> (\S+)$", out, flags=re.MULTILINE)
    if command == "train" and "--dry-run" not in argv:
        run = Path(flag(argv, "--out"))
        for name in ("config.toml", "checkpoints/latest.json", "samples.png", "log.jsonl"):
            assert (run / name).is_file(), f"train: {run / name} is missing"
    elif command == "demo":
        run = Path(flag(argv, "--out") or "runs/demo")
        for name in ("summary.txt", "eval/report.md", "samples.png"):
            assert (run / name).is_file(), f"demo: {run / name} is missing"
        verdict = (run / "summary.txt").read_text().splitlines()[:3]
        assert [line.split(":")[0] for line in verdict] == ["likelihood", "samples", "time"], verdict
    elif command == "sample":
        folder = Path(printed[-1])
        assert flag(argv, "--out") in (None, str(folder))
        for name in ("grid.png", "samples.npz", "settings.json"):
            assert (folder / name).is_file(), f"sample: {folder / name} is missing"
    elif command == "evaluate":
        for name in ("report.md", "metrics.json"):
            assert (Path(flag(argv, "--run")) / "eval" / name).is_file()
    elif command == "restore":
        for name in ("restore.png", "restored.npz", "settings.json"):
            assert (Path(printed[-1]) / name).is_file(), f"restore: {printed[-1]}/{name} is missing"
    elif command == "tune-grid":
        assert (Path(flag(argv, "--run")) / "grids.json").is_file()


@pytest.fixture
def workdir(tmp_path, monkeypatch, digits_cache):
    """An empty working directory with the repository's configs/, and the session's digits feature net."""
    (tmp_path / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(digits_cache.parent))
    return tmp_path


def test_the_readme_examples_run_as_written(workdir, capsys):
    text = README.read_text()
    blocks = runnable_blocks(text)
    assert {lang for lang, _ in blocks} == {"bash", "python"}, "the README marks its command and Python blocks"
    for lang, body in blocks:
        if lang == "python":
            assert body.count(PYTHON_OVERRIDES) == 1, f"the Python quick start passes {PYTHON_OVERRIDES}"
            script = body.replace(PYTHON_OVERRIDES, repr(["train.steps=300", *TINY]))
            exec(compile(script, "README.md (Python quick start)", "exec"), {"__name__": "readme"})  # noqa: S102 (the README's own code)
            capsys.readouterr()
            continue
        assert lang == "bash", f"a runnable block in {lang!r}"
        for argv in command_lines(body):
            argv = shrink(argv)
            code = main(argv)
            out, err = capsys.readouterr()
            assert code == 0, f"diffusekit {' '.join(argv)} exited {code}: {err.strip()}"
            check_outputs(argv, out)
    named = set(re.findall(r"\bruns/[\w./-]*\w", text))
    missing = sorted(p for p in named if not (workdir / p).exists())
    assert not missing, f"the README names outputs its examples did not write: {missing}"


# -- links --------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", flags=re.MULTILINE | re.DOTALL)


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file (lower case, punctuation dropped, spaces to
    hyphens, a repeated heading numbered -1, -2, ...)."""
    seen: dict[str, int] = {}
    result = set()
    for line in prose(path.read_text()).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        result.add(slug if n == 0 else f"{slug}-{n}")
    return result


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file(path):
    broken = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {broken}"


def test_every_docs_page_is_in_the_readme_index():
    text = README.read_text()
    unlisted = [p.name for p in (ROOT / "docs").glob("*.md") if f"(docs/{p.name})" not in text]
    assert not unlisted, f"docs pages missing from the README's documentation table: {unlisted}"
